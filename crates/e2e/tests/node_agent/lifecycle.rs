//! Ensure and delete, repeated and interrupted: idempotence, late reaping,
//! stops, killed VMMs, slow guests, a killed agent and one that restarts.

use super::*;

#[test]
fn ensure_twice_changes_nothing_and_delete_removes_exactly_what_was_made() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        let bridge = host::links().into_iter().find(|l| l.name == "nxbr0").expect("bridge");
        assert!(bridge.up && bridge.kind.as_deref() == Some("bridge"));
        let addrs = nexus_e2e::run_ok(std::process::Command::new("ip").args(["-j", "addr", "show", "nxbr0"]));
        assert!(addrs.contains("\"local\":\"172.30.0.1\"") && addrs.contains("\"prefixlen\":24"), "{addrs}");

        // NAT from the VM subnet to the uplink, in the agent's own nftables table.
        let nat = nexus_e2e::run_ok(std::process::Command::new("nft").args(["list", "table", "ip", "nexus"]));
        assert!(nat.contains("ip saddr 172.30.0.0/24 oifname != \"nxbr0\" masquerade"), "{nat}");

        let first = agent.ensure(&request(UID)).await;
        assert_eq!(first.state, ObservedState::Running);
        let tap = first.runtime.tap_name.clone().unwrap();
        let link = host::links().into_iter().find(|l| l.name == tap).unwrap();
        assert_eq!(link.master.as_deref(), Some("nxbr0"));
        let before = host_state(&agent.run_dir());
        assert_eq!(before.0, vec![tap.clone()]);
        assert_eq!(before.2.len(), 1);

        let (s, cap) = agent.call("GET", "/v1/capacity", None).await;
        assert_eq!(s, 200, "{cap}");
        let cap: Value = serde_json::from_str(&cap).unwrap();
        assert_eq!(cap["allocated"], serde_json::json!({"vcpu": 1, "memMib": 128, "vms": 1}));
        assert_eq!(cap["subnet"], "172.30.0.0/24");
        assert!(cap["capacity"]["vcpu"].as_u64().unwrap() >= 1);

        let second = agent.ensure(&request(UID)).await;
        assert_eq!(second, first, "the same report, the same VMM");
        assert_eq!(host_state(&agent.run_dir()), before, "a repeated ensure changes nothing on the host");

        // A removal is answered at once (202) and done on the agent's time.
        let (status, body) = agent.call("DELETE", &format!("/v1/vms/{UID}"), None).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(serde_json::from_str::<VmReport>(&body).unwrap().state, ObservedState::Removing);
        let (status, body, _) = agent.remove(UID).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(serde_json::from_str::<VmReport>(&body).unwrap().state, ObservedState::Absent);
        assert_eq!(host_state(&agent.run_dir()), (vec![], vec![], vec![], vec![]));
        let (status, _) = agent.call("DELETE", &format!("/v1/vms/{UID}"), None).await;
        assert_eq!(status, 200, "deleting twice is fine");
        assert!(host::links().iter().any(|l| l.name == "nxbr0"), "the bridge stays");
        let nat_after = nexus_e2e::run_ok(std::process::Command::new("nft").args(["list", "table", "ip", "nexus"]));
        assert_eq!(nat_after, nat, "the node's NAT rule is shared by all VMs and stays");
        // Nothing is anonymous.
        let anon = agent.http.get(format!("https://{ADDR}/v1/inventory")).send().await.unwrap();
        assert_eq!(anon.status().as_u16(), 401);
        let wrong = agent.http.get(format!("https://{ADDR}/v1/capacity")).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(wrong.status().as_u16(), 401);
        // Probes and Prometheus need no secret.
        let open = agent.http.get(format!("https://{ADDR}/readyz")).send().await.unwrap();
        assert_eq!(open.status().as_u16(), 200);
        // Taking the node's networking down removes the bridge and NAT too.
        let mut agent = agent;
        agent.proc.stop();
        let s = |p: PathBuf| p.display().to_string();
        let teardown = std::process::Command::new(bin("nexus-nodeagent"))
            .args([
                "--teardown-network",
                "--state-dir",
                &s(dir.path().join("state")),
                "--run-dir",
                &s(dir.path().join("run")),
            ])
            .output()
            .unwrap();
        assert!(teardown.status.success(), "{}", String::from_utf8_lossy(&teardown.stderr));
        assert!(!host::links().iter().any(|l| l.name == "nxbr0"), "the bridge is gone");
        let nat_gone = std::process::Command::new("nft").args(["list", "table", "ip", "nexus"]).output().unwrap();
        assert!(!nat_gone.status.success(), "the NAT table is gone");
    });
}

#[test]
fn two_hundred_create_delete_cycles_with_vmms_reaped_late_fail_no_call() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        // VMMs that end as a multi-threaded Firecracker does: a zombie to
        // /proc for a moment before their parent can reap them. The agent
        // must not take "zombie" for "gone" and remove the VM directory
        // while its reaper is about to record the exit there.
        let env = [("FIRECRACKER_SIM_SHUTDOWN_MS", "0"), ("FIRECRACKER_SIM_REAP_DELAY_MS", "20")];
        let agent = std::sync::Arc::new(Agent::start_with(dir.path(), &env, &["--process-manager", "direct"]).await);
        let started = Instant::now();
        let mut workers = Vec::new();
        for w in 0..4u8 {
            let agent = agent.clone();
            workers.push(tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in 0..50u8 {
                    let uid = format!("{w:02x}{i:06x}-0000-4000-8000-000000000001");
                    let mut req = request(&uid);
                    req.mac = format!("06:00:ac:10:{w:02x}:{i:02x}");
                    let body = serde_json::to_value(&req).unwrap();
                    let (s, b) = agent.call("PUT", &format!("/v1/vms/{uid}"), Some(&body)).await;
                    if s != 200 {
                        failed.push(format!("ensure {uid}: {s} {b}"));
                        continue;
                    }
                    let pid = serde_json::from_str::<VmReport>(&b).ok().and_then(|r| r.runtime.pid).unwrap_or_default();
                    let (s, b, _) = agent.remove(&uid).await;
                    if s != 200 {
                        failed.push(format!("delete {uid}: {s} {b}"));
                    }
                    // Done means done: the VMM reaped, its directory gone
                    // (and not written to again by anything of the agent's).
                    if Path::new(&format!("/proc/{pid}")).exists() {
                        failed.push(format!("delete {uid} answered while VMM {pid} was still exiting"));
                    }
                }
                failed
            }));
        }
        let mut failed = Vec::new();
        for w in workers {
            failed.extend(w.await.unwrap());
        }
        println!("200 create/delete cycles in {} ms: {} failed calls", started.elapsed().as_millis(), failed.len());
        assert!(failed.is_empty(), "{}", failed.join("\n"));
        let (taps, sockets, vmms, dirs) = host_state(&agent.run_dir());
        assert_eq!((taps.len(), sockets.len(), vmms.len(), dirs.len()), (0, 0, 0, 0), "nothing left");
    });
}

#[test]
fn a_stop_ends_the_vmm_whether_or_not_the_guest_honours_ctrl_alt_del() {
    for (guest, env) in [
        ("honours Ctrl+Alt+Del", vec![]),
        ("ignores Ctrl+Alt+Del", vec![("FIRECRACKER_SIM_GUEST_IGNORES_CTRL_ALT_DEL", "1")]),
    ] {
        let env: Vec<(&'static str, &'static str)> = env;
        in_private_netns(move || async move {
            let dir = tempfile::tempdir().unwrap();
            let agent =
                Agent::start_with(dir.path(), &env, &["--process-manager", "direct", "--stop-grace-secs", "1"]).await;
            let running = agent.ensure(&request(UID)).await;
            let pid = running.runtime.pid.unwrap();
            let mut stop = request(UID);
            stop.state = PowerState::Stopped;
            let asked = Instant::now();
            let stopped = agent.ensure(&stop).await;
            let took = asked.elapsed();
            let log = std::fs::read_to_string(agent.run_dir().join("vms").join(UID).join("fc.log")).unwrap_or_default();
            let how = if log.contains("Vmm is stopping.") { "powered off" } else { "signalled" };
            println!("a guest that {guest}: Stopped after {} ms ({how})", took.as_millis());
            assert_eq!(stopped.state, ObservedState::Stopped);
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the VMM is gone");
            assert!(took < Duration::from_secs(4), "{took:?}");
            assert_eq!(how == "signalled", !env.is_empty(), "{log}");
        });
    }
}

#[test]
fn a_killed_vmm_is_reported_and_ensure_brings_it_back() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        let first = agent.ensure(&request(UID)).await;
        let pid = first.runtime.pid.unwrap();
        nexus_e2e::host::sigkill(pid);
        wait_until(Duration::from_secs(5), "the VMM to die", || async {
            host::vmm_processes_under(&agent.run_dir()).is_empty()
        })
        .await;
        let (status, body) = agent.call("GET", "/v1/inventory", None).await;
        assert_eq!(status, 200, "{body}");
        let bare: Inventory = serde_json::from_str(&body).unwrap();
        assert_eq!((bare.vms.len(), bare.run_dirs.len()), (0, 1), "reports only when asked for");
        let inv = agent.inventory().await;
        assert_eq!(inv.vms.len(), 1);
        assert_eq!(inv.vms[0].state, ObservedState::Stopped, "{inv:?}");
        assert_eq!(inv.vms[0].runtime.pid, None);
        let t = Instant::now();
        let again = agent.ensure(&request(UID)).await;
        println!("VMM restarted {} ms after ensure", t.elapsed().as_millis());
        assert_eq!(again.state, ObservedState::Running);
        assert_ne!(again.runtime.pid, Some(pid));
        let (taps, sockets, vmms, dirs) = host_state(&agent.run_dir());
        assert_eq!((taps.len(), sockets.len(), vmms.len(), dirs.len()), (1, 1, 1, 1), "one of each, nothing stale");
    });
}

#[test]
fn a_guest_powering_off_slowly_is_left_to_finish_and_its_exit_reaches_the_restart_policy() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        // A guest that takes two seconds to power off after Ctrl+Alt+Del.
        let agent = Agent::start(dir.path(), &[("FIRECRACKER_SIM_SHUTDOWN_MS", "2000")]).await;
        let mut req = request(UID);
        req.restart_policy = nexus_api::vm::RestartPolicy::OnFailure;
        let first = agent.ensure(&req).await;
        assert_eq!(first.state, ObservedState::Running);
        let pid = first.runtime.pid.unwrap();
        let socket = first.runtime.socket_path.clone().unwrap();
        assert_eq!(host::fc_ctrl_alt_del(Path::new(&socket)).await.unwrap(), 204);
        // Reconciles while it powers off: the VMM is left alone.
        let pressed = Instant::now();
        let mut during = Vec::new();
        while pressed.elapsed() < Duration::from_millis(1500) {
            let (status, body) =
                agent.call("PUT", &format!("/v1/vms/{UID}"), Some(&serde_json::to_value(&req).unwrap())).await;
            let report: Option<VmReport> = serde_json::from_str(&body).ok();
            during.push((status, report.and_then(|r| r.runtime.pid)));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "{} ensures while the guest powered off: {:?}",
            during.len(),
            during.iter().map(|d| d.0).collect::<Vec<_>>()
        );
        assert!(during.iter().all(|(s, p)| *s == 200 && *p == Some(pid)), "{during:?}");
        wait_until(Duration::from_secs(5), "the VMM to exit", || async {
            !Path::new(&format!("/proc/{pid}")).exists()
        })
        .await;
        let after = agent.ensure(&req).await;
        println!("after the guest powered off: {:?}, exit {:?}", after.state, after.runtime.exit);
        assert_eq!(after.state, ObservedState::Exited, "OnFailure keeps a clean shutdown down");
        assert_eq!(after.runtime.exit.and_then(|e| e.code), Some(0));
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
        assert!(!log.contains("SIGTERM"), "the agent never signalled the VMM:\n{log}");
    });
}

#[test]
fn an_agent_killed_mid_create_and_restarted_ends_with_one_vm_and_no_orphans() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        // VMMs that take 1.5 s to open their socket: the agent dies while waiting.
        let mut agent = Agent::start(dir.path(), &[("FIRECRACKER_SIM_STARTUP_DELAY_MS", "1500")]).await;
        let body = serde_json::to_value(request(UID)).unwrap();
        let url = format!("https://{ADDR}/v1/vms/{UID}");
        let call = tokio::spawn(agent.http.put(&url).bearer_auth(&agent.token).json(&body).send());
        wait_until(Duration::from_secs(5), "the VMM to be launched", || async {
            !host::vmm_processes_under(&agent.run_dir()).is_empty()
        })
        .await;
        agent.proc.kill();
        assert!(call.await.unwrap().is_err(), "the caller sees the agent die");
        let orphan: Vec<u32> = host::vmm_processes_under(&agent.run_dir()).into_iter().map(|(p, _)| p).collect();
        assert_eq!(orphan.len(), 1, "the half-made VMM outlives the agent");

        let agent = Agent::start(dir.path(), &[]).await;
        let report = agent.ensure(&request(UID)).await;
        assert_eq!(report.state, ObservedState::Running);
        let (taps, sockets, vmms, dirs) = host_state(&agent.run_dir());
        assert_eq!(taps.len(), 1, "{taps:?}");
        assert_eq!(sockets.len(), 1, "{sockets:?}");
        assert_eq!(vmms, vec![report.runtime.pid.unwrap()], "exactly one VMM, the configured one");
        assert_eq!(dirs, vec![UID.to_string()]);
    });
}

#[test]
fn a_restarted_agent_adopts_running_vms() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Agent::start(dir.path(), &[]).await;
        let first = agent.ensure(&request(UID)).await;
        agent.proc.kill();
        assert!(
            host::vmm_processes_under(&agent.run_dir()).iter().any(|(p, _)| Some(*p) == first.runtime.pid),
            "the VM keeps running"
        );
        let agent = Agent::start(dir.path(), &[]).await;
        let again = agent.ensure(&request(UID)).await;
        assert_eq!(again.runtime.pid, first.runtime.pid, "adopted, not restarted");
        assert_eq!(again.state, ObservedState::Running);
    });
}
