//! The node agent as a real process in a network namespace the test owns,
//! driving simulated VMMs: idempotence, crash recovery, the guarded proxy,
//! logs and metrics, and a path-traversal corpus.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nexus_api::PowerState;
use nexus_api::agent::{EnsureVm, Inventory, ObservedState, VmReport};
use nexus_e2e::{Proc, bin, host, in_private_netns, wait_until};
use serde_json::Value;

const ADDR: &str = "127.0.0.1:7444";

struct Agent {
    proc: Proc,
    dir: PathBuf,
    http: reqwest::Client,
    /// The CA the agent's certificate is signed by.
    ca: PathBuf,
    /// The agent's own credential, which it made in its state directory.
    token: String,
}

impl Agent {
    async fn start(dir: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::start_with(dir, env, &["--process-manager", "direct"]).await
    }

    async fn start_with(dir: &Path, env: &[(&str, &str)], extra: &[&str]) -> Agent {
        let s = |p: PathBuf| p.display().to_string();
        // No apiserver answers at 127.0.0.1:9: the agent serves its API all
        // the same, with the credential it keeps in its state directory.
        let mut args: Vec<String> = ["--apiserver", "http://127.0.0.1:9", "--node-name", "n1", "--listen", ADDR]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(["--state-dir".into(), s(dir.join("state")), "--run-dir".into(), s(dir.join("run"))]);
        args.extend(["--firecracker".into(), s(bin("firecracker-sim"))]);
        // The agent serves HTTPS, as it does in a cluster.
        let pki = dir.join("pki");
        let ca = nexus_e2e::init_pki(&pki);
        let (cert, key) = nexus_e2e::issue_cert(&pki, "agent", &["127.0.0.1"]);
        args.extend(["--tls-cert".into(), s(cert), "--tls-key".into(), s(key)]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The environment reaches the agent and the VMMs it starts.
        let proc = nexus_e2e::spawn_env("nodeagent", &bin("nexus-nodeagent"), &args, &dir.join("agent.log"), env);
        let http = nexus_e2e::https_client(&ca);
        let cred = dir.join("state/agent.credential");
        wait_until(Duration::from_secs(10), "the agent's credential", || async { cred.exists() }).await;
        let token = std::fs::read_to_string(&cred).unwrap().trim().to_string();
        let agent = Agent { proc, dir: dir.to_path_buf(), http, ca, token };
        wait_until(Duration::from_secs(10), "the agent to answer", || async {
            agent.http.get(format!("https://{ADDR}/healthz")).bearer_auth(&agent.token).send().await.is_ok()
        })
        .await;
        agent
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("https://{ADDR}{path}")).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Sends the request line exactly as given (no client-side `..`
    /// resolution or escaping, as a URL library would do).
    async fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let tcp = tokio::net::TcpStream::connect(ADDR).await.unwrap();
        let mut stream = nexus_e2e::tls_connect(tcp, &self.ca, "127.0.0.1").await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {ADDR}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.token,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    async fn ensure(&self, req: &EnsureVm) -> VmReport {
        let (status, body) =
            self.call("PUT", &format!("/v1/vms/{}", req.uid), Some(&serde_json::to_value(req).unwrap())).await;
        assert_eq!(
            status,
            200,
            "ensure: {body}\n{}",
            std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
        );
        serde_json::from_str(&body).unwrap()
    }

    async fn inventory(&self) -> Inventory {
        let (status, body) = self.call("GET", "/v1/inventory?vms=true", None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // VMMs outlive their agent by design; a finished test takes them
        // down, after the agent, which would start them again.
        self.proc.stop();
        nexus_e2e::kill_vmms_under(&self.run_dir());
    }
}

fn request(uid: &str) -> EnsureVm {
    EnsureVm {
        uid: uid.into(),
        display_name: "test/vm".into(),
        state: PowerState::Running,
        vcpu: 1,
        mem_mib: 128,
        kernel_path: "/var/lib/nexus/images/vmlinux".into(),
        rootfs_path: "/var/lib/nexus/images/rootfs.ext4".into(),
        boot_args: "console=ttyS0".into(),
        mac: "06:00:ac:10:00:02".into(),
        ip: None,
        restore: None,
        restart_policy: Default::default(),
        kernel_sha256: None,
        rootfs_sha256: None,
        kernel_source: None,
        rootfs_source: None,
        initrd_path: None,
        initrd_sha256: None,
        initrd_source: None,
        probe: None,
    }
}

const UID: &str = "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11";

/// What the agent has on the host: TAPs, sockets, VMMs, run directories.
fn host_state(run: &Path) -> (Vec<String>, Vec<String>, Vec<u32>, Vec<String>) {
    let taps: Vec<String> = host::taps().into_iter().map(|l| l.name).collect();
    let vmms: Vec<u32> = host::vmm_processes_under(run).into_iter().map(|(p, _)| p).collect();
    (taps, host::sockets_under(run), vmms, host::run_dirs(run))
}

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

        let (status, body) = agent.call("DELETE", &format!("/v1/vms/{UID}"), None).await;
        assert_eq!(status, 200, "{body}");
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
                    let (s, b) = agent.call("DELETE", &format!("/v1/vms/{uid}"), None).await;
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

#[test]
fn the_proxy_passes_allowed_calls_and_logs_and_metrics_are_served() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        agent.ensure(&request(UID)).await;
        let (s, body) = agent.call("GET", &format!("/v1/vms/{UID}/proxy/"), None).await;
        assert_eq!(s, 200, "{body}");
        assert!(body.contains("\"state\":\"Running\""), "{body}");
        let (s, body) = agent.call("GET", &format!("/v1/vms/{UID}/proxy/vm/config"), None).await;
        assert_eq!(s, 200, "{body}");
        let paused = serde_json::json!({"state": "Paused"});
        assert_eq!(agent.call("PATCH", &format!("/v1/vms/{UID}/proxy/vm"), Some(&paused)).await.0, 204);
        // Firecracker's own refusal comes back as it was.
        let (s, body) = agent
            .call("PATCH", &format!("/v1/vms/{UID}/proxy/vm"), Some(&serde_json::json!({"state": "Sleeping"})))
            .await;
        assert_eq!(s, 400);
        assert!(body.contains("fault_message") && body.contains("Sleeping"), "{body}");
        let (s, body) = agent
            .call(
                "PUT",
                &format!("/v1/vms/{UID}/proxy/machine-config"),
                Some(&serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64})),
            )
            .await;
        assert_eq!(s, 403, "not allow-listed: {body}");

        let (s, console) = agent.call("GET", &format!("/v1/vms/{UID}/logs?file=console&tail=50"), None).await;
        assert_eq!(s, 200);
        assert!(console.contains("Linux version"), "{console}");
        let (s, log) = agent.call("GET", &format!("/v1/vms/{UID}/logs?tail=3"), None).await;
        assert_eq!((s, log.lines().count()), (200, 3), "{log}");
        let (s, m) = agent.call("GET", &format!("/v1/vms/{UID}/metrics?flush=true"), None).await;
        assert_eq!(s, 200, "{m}");
        assert!(m.contains("utc_timestamp_ms"), "{m}");
        // follow: existing lines, then new ones as the guest writes them.
        assert_eq!(
            agent
                .call("PATCH", &format!("/v1/vms/{UID}/proxy/vm"), Some(&serde_json::json!({"state": "Resumed"})))
                .await
                .0,
            204
        );
        let resp = agent
            .http
            .get(format!("https://{ADDR}/v1/vms/{UID}/logs?file=console&tail=1&follow=true"))
            .bearer_auth(&agent.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
        let mut stream = resp.bytes_stream();
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lines().count() < 3 && Instant::now() < deadline {
            use futures::StreamExt;
            if let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(3), stream.next()).await {
                seen.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
        assert!(seen.lines().count() >= 3, "the tail line and two new ones: {seen}");
        assert!(seen.contains("guest alive"), "{seen}");

        // Nothing of the caller's request but method, path and body reaches
        // the VMM: not its Host, not its credential.
        let rec_uid = "00000000-0000-4000-8000-000000000002";
        let rec_dir = agent.run_dir().join("vms").join(rec_uid).join("root/run");
        std::fs::create_dir_all(&rec_dir).unwrap();
        let recorder = tokio::net::UnixListener::bind(rec_dir.join("fc.sock")).unwrap();
        let captured = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut conn, _) = recorder.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap();
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let (s, _) = agent.call("GET", &format!("/v1/vms/{rec_uid}/proxy/version"), None).await;
        assert_eq!(s, 200);
        let seen = captured.await.unwrap();
        assert!(seen.starts_with("GET /version HTTP/1.1\r\n"), "{seen}");
        assert!(seen.to_lowercase().contains("host: localhost\r\n"), "{seen}");
        assert!(
            !seen.contains(ADDR) && !seen.contains(&agent.token) && !seen.to_lowercase().contains("authorization"),
            "{seen}"
        );

        // A VMM that accepts but never answers: 504.
        let mute_uid = "00000000-0000-4000-8000-000000000001";
        let mute_dir = agent.run_dir().join("vms").join(mute_uid).join("root/run");
        std::fs::create_dir_all(&mute_dir).unwrap();
        let _mute = tokio::net::UnixListener::bind(mute_dir.join("fc.sock")).unwrap();
        let t = Instant::now();
        let (s, body) = agent.call("GET", &format!("/v1/vms/{mute_uid}/proxy/"), None).await;
        assert_eq!(s, 504, "{body}");
        assert!(t.elapsed() < Duration::from_secs(10));
    });
}

#[test]
fn a_path_traversal_corpus_is_refused_and_nothing_outside_the_run_dir_is_touched() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        agent.ensure(&request(UID)).await;
        // Bait outside the run directory: a file and a listening socket.
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "untouched").unwrap();
        let bait = tokio::net::UnixListener::bind(outside.join("fc.sock")).unwrap();
        // A VM directory whose socket is a symlink to the bait (as a
        // VMM could leave in its jail's run/).
        let sym_uid = "00000000-0000-4000-8000-00000000000a";
        let sym_dir = agent.run_dir().join("vms").join(sym_uid).join("root/run");
        std::fs::create_dir_all(&sym_dir).unwrap();
        std::os::unix::fs::symlink(outside.join("fc.sock"), sym_dir.join("fc.sock")).unwrap();
        // A VM directory that is itself a symlink to the outside.
        let dirlink_uid = "00000000-0000-4000-8000-00000000000b";
        std::os::unix::fs::symlink(&outside, agent.run_dir().join("vms").join(dirlink_uid)).unwrap();
        let before: Vec<(PathBuf, std::time::SystemTime)> = walk(dir.path(), &agent.run_dir());

        let long = "a".repeat(5000);
        let uids = [
            "..",
            "..%2F..",
            "%2e%2e",
            "%2e%2e%2fetc",
            "..%252f",
            "%00",
            "abc%00def",
            "/etc/passwd",
            "%2Fetc%2Fpasswd",
            "7F0C9A52-3A43-4D1B-9D44-0C3F0E7D1A11",
            "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11%00",
            &long,
            "~root",
            "*",
        ];
        let mut cases: Vec<(String, String, u16)> = Vec::new();
        for u in uids {
            for (m, p) in [
                ("GET", format!("/v1/vms/{u}")),
                ("PUT", format!("/v1/vms/{u}")),
                ("DELETE", format!("/v1/vms/{u}")),
                ("GET", format!("/v1/vms/{u}/proxy/")),
                ("GET", format!("/v1/vms/{u}/logs")),
                ("GET", format!("/v1/vms/{u}/metrics")),
            ] {
                cases.push((m.to_string(), p, 0));
            }
        }
        for fc in [
            "..",
            "../..",
            "..%2F..%2Fetc%2Fpasswd",
            "%2e%2e/%2e%2e",
            "vm/..",
            "vm/%2e%2e",
            "drives/..%2f..%2fetc",
            "snapshot/create",
            "snapshot/load",
            "vm%2Fconfig",
            "./vm",
            "vm//config",
            "%00",
            &long,
            "boot-source",
            "logger",
        ] {
            cases.push(("GET".into(), format!("/v1/vms/{UID}/proxy/{fc}"), 0));
            cases.push(("PUT".into(), format!("/v1/vms/{UID}/proxy/{fc}"), 0));
        }
        cases.push(("PUT".into(), format!("/v1/vms/{UID}/proxy/machine-config"), 403));
        cases.push(("GET".into(), format!("/v1/vms/{sym_uid}/proxy/"), 403));
        cases.push(("GET".into(), format!("/v1/vms/{dirlink_uid}/proxy/"), 403));
        cases.push(("GET".into(), format!("/v1/vms/{dirlink_uid}"), 403));
        cases.push(("DELETE".into(), format!("/v1/vms/{dirlink_uid}"), 403));
        cases.push(("GET".into(), format!("/v1/vms/{dirlink_uid}/logs?file=console"), 403));
        for name in ["..", "..%2F..%2Fetc", "%2e%2e", "a%00b", "Bad_Name", "x%2Fy", &long] {
            cases.push(("PUT".into(), format!("/v1/snapshots/{name}"), 0));
            cases.push(("DELETE".into(), format!("/v1/snapshots/{name}"), 0));
        }
        for q in [
            "file=..%2F..%2Fetc%2Fpasswd",
            "file=%2Fetc%2Fpasswd",
            "file=console&tail=99999999",
            "tail=-1",
            "file=fc.sock",
            "path=/etc/passwd",
        ] {
            cases.push(("GET".into(), format!("/v1/vms/{UID}/logs?{q}"), 0));
        }
        let mut refused = 0;
        // Names and paths in bodies: restores, and the garbage collector's lists.
        for snap in ["..", "../../outside", "/etc", "a/b", ""] {
            let mut r = request("00000000-0000-4000-8000-0000000000e5");
            r.mac = "06:00:ac:10:00:0e".into();
            r.restore = Some(nexus_api::agent::RestoreFrom { snapshot_uid: snap.into() });
            let (status, answer) = agent
                .raw("PUT", "/v1/vms/00000000-0000-4000-8000-0000000000e5", Some(&serde_json::to_value(&r).unwrap()))
                .await;
            assert!((400..500).contains(&status), "restore from {snap:?} was not refused: {status} {answer}");
            refused += 1;
        }
        for vm_uid in ["..", "../../outside", "/etc"] {
            let body = serde_json::json!({"vmUid": vm_uid});
            let (status, answer) =
                agent.raw("PUT", "/v1/snapshots/00000000-0000-4000-8000-0000000000f6", Some(&body)).await;
            assert!((400..500).contains(&status), "a snapshot of VM {vm_uid:?} was not refused: {status} {answer}");
            refused += 1;
        }
        let outside_secret = outside.join("secret").display().to_string();
        let outside_sock = outside.join("fc.sock").display().to_string();
        let via_dotdot = format!("{}/../outside/fc.sock", agent.run_dir().display());
        for body in [
            serde_json::json!({"uids": [".."]}),
            serde_json::json!({"uids": ["../../outside"]}),
            serde_json::json!({"taps": ["eth0"]}),
            serde_json::json!({"taps": ["nxbr0"]}),
            serde_json::json!({"sockets": [outside_secret]}),
            serde_json::json!({"sockets": [outside_sock]}),
            serde_json::json!({"sockets": [via_dotdot]}),
            serde_json::json!({"sockets": ["/etc/passwd"]}),
        ] {
            let (status, answer) = agent.raw("POST", "/v1/gc", Some(&body)).await;
            assert!((400..500).contains(&status), "gc {body} was not refused: {status} {answer}");
            refused += 1;
        }
        assert!(host::links().iter().any(|l| l.name == "nxbr0"), "the bridge survives");
        let drive = serde_json::json!({"drive_id": "rootfs", "path_on_host": outside.join("secret")});
        let start = serde_json::json!({"action_type": "InstanceStart"});
        let snapshot = serde_json::json!({"snapshot_path": outside.join("snap"), "mem_file_path": outside.join("mem")});
        let mut planted = serde_json::to_value(request(dirlink_uid)).unwrap();
        let (status, answer) = agent.raw("PUT", &format!("/v1/vms/{dirlink_uid}"), Some(&planted)).await;
        assert_eq!(status, 403, "ensure through a planted symlink: {answer}");
        planted["uid"] = serde_json::json!(UID);
        let (status, _) = agent.raw("PUT", &format!("/v1/vms/{dirlink_uid}"), Some(&planted)).await;
        assert_eq!(status, 422, "body and path uids differ");
        refused += 3;
        for (method, path, want) in &cases {
            let body = (method == "PUT").then(|| serde_json::json!({}));
            let body = if path.contains("/snapshots/") { Some(serde_json::json!({"resumeAfter": true})) } else { body };
            let (status, answer) = agent.raw(method, path, body.as_ref()).await;
            assert!((400..500).contains(&status), "{method} {path} was not refused: {status} {answer}");
            if *want != 0 {
                assert_eq!(status, *want, "{method} {path}: {answer}");
            }
            refused += 1;
        }
        for (method, path, body) in [
            ("PATCH", format!("/v1/vms/{UID}/proxy/drives/rootfs"), &drive),
            ("PUT", format!("/v1/vms/{UID}/proxy/actions"), &start),
            ("PUT", format!("/v1/vms/{UID}/proxy/snapshot/create"), &snapshot),
        ] {
            let (status, answer) = agent.raw(method, &path, Some(body)).await;
            assert!((400..500).contains(&status), "{method} {path} with {body} was not refused: {status} {answer}");
            refused += 1;
        }
        println!("{refused} requests refused");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), bait.accept()).await.is_err(),
            "nothing connected to a socket outside the run dir"
        );
        assert_eq!(std::fs::read_to_string(outside.join("secret")).unwrap(), "untouched");
        assert!(!outside.join("snap").exists() && !outside.join("mem").exists());
        assert_eq!(walk(dir.path(), &agent.run_dir()), before, "nothing outside the run directory changed");
    });
}

/// Every path under `root` but outside `run`, with its modification time.
fn walk(root: &Path, run: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.starts_with(run) || p.file_name().is_some_and(|n| n == "agent.log") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            out.push((p.clone(), meta.modified().unwrap()));
            if meta.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn guests_that_ask_get_an_address_from_the_node_subnet_on_the_kernel_command_line() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        let mut a = request(UID);
        a.ip = Some("auto".into());
        let ra = agent.ensure(&a).await;
        let ip: std::net::Ipv4Addr = ra.runtime.ip.clone().expect("an address").parse().unwrap();
        let o = ip.octets();
        assert!(o[0..3] == [172, 30, 0] && o[3] != 0 && o[3] != 1 && o[3] != 255, "{ip}");
        let console = std::fs::read_to_string(agent.run_dir().join("vms").join(UID).join("console.log")).unwrap();
        assert!(console.contains(&format!("ip={ip}::172.30.0.1:255.255.255.0::eth0:off")), "{console}");
        // The same address asked for explicitly by another VM: refused, permanently.
        let other = "00000000-0000-4000-8000-0000000000c1";
        let mut b = request(other);
        b.mac = "06:00:ac:10:00:03".into();
        b.ip = Some(ip.to_string());
        let (status, body) =
            agent.call("PUT", &format!("/v1/vms/{other}"), Some(&serde_json::to_value(&b).unwrap())).await;
        assert_eq!(status, 422, "{body}");
        assert!(body.contains("already used by another VM"), "{body}");
        b.ip = Some("10.9.9.9".into());
        let (status, body) =
            agent.call("PUT", &format!("/v1/vms/{other}"), Some(&serde_json::to_value(&b).unwrap())).await;
        assert_eq!(status, 422);
        assert!(body.contains("172.30.0.0/24"), "{body}");
        b.ip = Some("auto".into());
        let rb = agent.ensure(&b).await;
        assert_ne!(rb.runtime.ip, ra.runtime.ip);
        // Restarting keeps the address.
        let again = agent.ensure(&a).await;
        assert_eq!(again.runtime.ip, ra.runtime.ip);
    });
}

/// systemd's manager, as far as the agent uses it: records the calls.
struct FakeManager {
    calls: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl FakeManager {
    async fn start_transient_unit(
        &self,
        name: String,
        mode: String,
        properties: Vec<(String, zbus::OwnedVariant)>,
        _aux: Vec<(String, Vec<(String, zbus::OwnedVariant)>)>,
    ) -> zbus::OwnedObjectPath {
        let pids = properties
            .iter()
            .find(|(k, _)| k == "PIDs")
            .and_then(|(_, v)| Vec::<u32>::try_from(v.try_clone().unwrap()).ok())
            .unwrap_or_default();
        let keys: Vec<&str> = properties.iter().map(|(k, _)| k.as_str()).collect();
        self.calls.lock().unwrap().push(format!("start {name} {mode} pids={pids:?} props={keys:?}"));
        zbus::OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/1").unwrap()
    }

    async fn stop_unit(&self, name: String, mode: String) -> zbus::OwnedObjectPath {
        self.calls.lock().unwrap().push(format!("stop {name} {mode}"));
        zbus::OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/2").unwrap()
    }
}

#[test]
fn with_systemd_each_vmm_is_placed_in_its_own_transient_scope() {
    assert!(
        std::process::Command::new("dbus-daemon").arg("--version").output().is_ok(),
        "no dbus-daemon to run a fake systemd peer on: install it (hack/test.sh does)"
    );
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let bus = dir.path().join("bus");
        let address = format!("unix:path={}", bus.display());
        let mut daemon = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", &format!("--address={address}")])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        nexus_e2e::wait_unix_listening(&bus, Duration::from_secs(5)).await;
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let _peer = zbus::connection::Builder::address(address.as_str())
            .name("org.freedesktop.systemd1")
            .serve_at("/org/freedesktop/systemd1", FakeManager { calls: calls.clone() })
            .build()
            .await
            .unwrap();
        let agent =
            Agent::start_with(dir.path(), &[], &["--process-manager", "systemd", "--systemd-bus", &address]).await;
        let report = agent.ensure(&request(UID)).await;
        let pid = report.runtime.pid.unwrap();
        let (status, _) = agent.call("DELETE", &format!("/v1/vms/{UID}"), None).await;
        assert_eq!(status, 200);
        let seen = calls.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                format!("start fc-{UID}.scope fail pids=[{pid}] props=[\"PIDs\", \"Description\", \"CollectMode\"]"),
                format!("stop fc-{UID}.scope fail"),
            ]
        );
        let _ = daemon.kill();
        let _ = daemon.wait();
    });
}

#[test]
fn a_snapshot_restores_into_a_new_vm_that_sees_its_own_disk_at_the_same_path() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        let a = agent.ensure(&request(UID)).await;
        let snap_uid = "00000000-0000-4000-8000-00000000000a";
        let take = serde_json::json!({"vmUid": UID});
        let (s, body) = agent.call("PUT", &format!("/v1/snapshots/{snap_uid}"), Some(&take)).await;
        assert_eq!(s, 200, "{body}");
        let snap: Value = serde_json::from_str(&body).unwrap();
        let files: Vec<&Value> = snap["files"].as_array().unwrap().iter().collect();
        let path_of =
            |name: &str| files.iter().find(|f| f["name"] == name).unwrap()["path"].as_str().unwrap().to_string();
        let snap_dir = agent.run_dir().join("snapshots").join(snap_uid);
        for name in ["state", "memory", "disk"] {
            assert!(Path::new(&path_of(name)).starts_with(&snap_dir), "{name} lives apart from the VM");
        }
        assert_eq!(std::fs::metadata(path_of("memory")).unwrap().len(), 128 << 20, "memory file of the guest's size");
        assert_eq!(snap["mac"], a.runtime.mac.clone().unwrap(), "the guest's MAC is recorded");
        println!("snapshot takes {} bytes on disk; the VM was paused {} ms", snap["sizeBytes"], snap["pausedMillis"]);
        let (_, again) = agent.call("PUT", &format!("/v1/snapshots/{snap_uid}"), Some(&take)).await;
        assert_eq!(serde_json::from_str::<Value>(&again).unwrap(), snap, "repeating returns the snapshot made");
        let (_, info) = agent.call("GET", &format!("/v1/vms/{UID}/proxy/"), None).await;
        assert!(info.contains("\"state\":\"Running\""), "resumed after the snapshot: {info}");

        // Restore into a new VM while the source runs on.
        let b_uid = "00000000-0000-4000-8000-0000000000b2";
        let mut b = request(b_uid);
        b.mac = "06:00:ac:10:00:09".into();
        b.restore = Some(nexus_api::agent::RestoreFrom { snapshot_uid: snap_uid.into() });
        let rb = agent.ensure(&b).await;
        assert_eq!(rb.state, ObservedState::Running);
        assert_eq!(rb.runtime.mac, a.runtime.mac, "the restored guest has its source's MAC, and the report says so");
        assert!(rb.runtime.tap_name.is_some());
        let pid = rb.runtime.pid.unwrap();
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_ne!(std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(), ours, "in a namespace of its own");
        assert!(
            !host::taps().iter().any(|t| Some(&t.name) == rb.runtime.tap_name.as_ref()),
            "its TAP is not on the host's bridge"
        );
        // Each VMM sees its own disk at /rootfs.ext4 in its jail.
        let view = "/rootfs.ext4";
        for uid in [UID, b_uid] {
            let (_, cfg) = agent.call("GET", &format!("/v1/vms/{uid}/proxy/vm/config"), None).await;
            let cfg: Value = serde_json::from_str(&cfg).unwrap();
            assert_eq!(cfg["drives"][0]["path_on_host"], view, "each VMM names its disk by the shared path");
        }
        assert!(agent.run_dir().join("vms").join(b_uid).join("rootfs.ext4").exists(), "the new VM has its own disk");
        let log = std::fs::read_to_string(agent.run_dir().join("vms").join(b_uid).join("fc.log")).unwrap();
        assert!(log.contains("Snapshot loaded"), "{log}");
        assert_eq!(host::vmm_processes_under(&agent.run_dir()).len(), 2);

        // A missing snapshot is refused before anything is made for the VM.
        let (taps_before, _, _, dirs_before) = host_state(&agent.run_dir());
        let mut c = request("00000000-0000-4000-8000-0000000000c3");
        c.mac = "06:00:ac:10:00:0a".into();
        c.restore = Some(nexus_api::agent::RestoreFrom { snapshot_uid: "00000000-0000-4000-8000-00000000dead".into() });
        let (s, body) = agent
            .call("PUT", "/v1/vms/00000000-0000-4000-8000-0000000000c3", Some(&serde_json::to_value(&c).unwrap()))
            .await;
        assert_eq!(s, 404, "{body}");
        let (taps_after, _, _, dirs_after) = host_state(&agent.run_dir());
        assert_eq!((taps_after, dirs_after), (taps_before, dirs_before), "no TAP, no run directory left");
        let (s, _) = agent
            .call(
                "PUT",
                "/v1/snapshots/00000000-0000-4000-8000-0000000000d4",
                Some(&serde_json::json!({"vmUid": "00000000-0000-4000-8000-0000000000d5"})),
            )
            .await;
        assert_eq!(s, 404, "no such VM");

        // Deleting the snapshot removes its files; the VM restored from it runs on.
        let (s, body) = agent.call("DELETE", &format!("/v1/snapshots/{snap_uid}"), None).await;
        assert_eq!((s, body.as_str()), (200, "{\"removed\":true}"));
        assert!(!snap_dir.exists());
        assert_eq!(agent.call("GET", &format!("/v1/snapshots/{snap_uid}"), None).await.0, 404);
        assert_eq!(agent.ensure(&b).await.state, ObservedState::Running);
    });
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks_free() * st.fragment_size()
}

/// Writes `data_mib` MiB of non-zero data at the start of a sparse file of
/// `size` bytes: an image that costs a plain copy real work.
fn image_with_data(path: &Path, size: u64, data_mib: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..data_mib {
        f.write_all(&chunk).unwrap();
    }
    f.set_len(size).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn on_a_reflink_filesystem_a_4_gib_disk_is_cloned_as_fast_as_a_16_mib_one_and_takes_no_new_blocks() {
    in_private_netns(|| async {
        // An XFS filesystem (reflinks on) in a file, mounted in a mount
        // namespace of this test's own, so it goes when the test does.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
        nexus_e2e::run_ok(std::process::Command::new("mount").args(["--make-rprivate", "/"]));
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let fs_file = dir.path().join("xfs.img");
        std::fs::File::create(&fs_file).unwrap().set_len(8 << 30).unwrap();
        nexus_e2e::run_ok(std::process::Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&fs_file));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        nexus_e2e::run_ok(std::process::Command::new("mount").args(["-o", "loop"]).arg(&fs_file).arg(&mnt));
        let images = mnt.join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::copy("/var/lib/nexus/images/vmlinux", images.join("vmlinux")).unwrap();
        image_with_data(&images.join("small.ext4"), 16 << 20, 16);
        image_with_data(&images.join("big.ext4"), 4 << 30, 512);

        let root = mnt.join("agent");
        let image_root = images.display().to_string();
        let agent = Agent::start_with(&root, &[], &["--process-manager", "direct", "--image-root", &image_root]).await;
        let start = |uid: &'static str, image: &str| {
            let mut req = request(uid);
            req.kernel_path = images.join("vmlinux").display().to_string();
            req.rootfs_path = images.join(image).display().to_string();
            req
        };
        let mut timings = Vec::new();
        for (uid, image, mib) in [
            ("2b0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11", "small.ext4", 16u64),
            ("3b0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11", "big.ext4", 4096),
        ] {
            let free = free_bytes(&mnt);
            let began = Instant::now();
            let report = agent.ensure(&start(uid, image)).await;
            let took = began.elapsed();
            assert_eq!(report.state, ObservedState::Running);
            let used = free.saturating_sub(free_bytes(&mnt));
            let disk = agent.run_dir().join("vms").join(uid).join("rootfs.ext4");
            assert_eq!(std::fs::metadata(&disk).unwrap().len(), mib << 20, "the VM's disk has its image's size");
            println!("{mib:>5} MiB image: ensure -> Running in {:.1} ms, {} KiB of new blocks", ms(took), used >> 10);
            // The clone shares every block with the image: the VM's start
            // costs its directory's small files, not its disk.
            assert!(used < 4 << 20, "{used} bytes used by a VM on a {mib} MiB image");
            timings.push(took);
        }
        let log = std::fs::read_to_string(root.join("agent.log")).unwrap();
        let disks: Vec<&str> = log.lines().filter(|l| l.contains("\"disk ready\"")).collect();
        assert_eq!(disks.len(), 2, "{log}");
        assert!(disks.iter().all(|l| l.contains("\"method\":\"Reflink\"")), "{disks:?}");

        // The guest's first write is what takes a block.
        let disk = agent.run_dir().join("vms/3b0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11/rootfs.ext4");
        let free = free_bytes(&mnt);
        {
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
            f.write_all(&[0xAB; 1 << 20]).unwrap();
            f.sync_all().unwrap();
        }
        let used = free.saturating_sub(free_bytes(&mnt));
        println!("a 1 MiB write to the 4 GiB VM's disk took {} KiB of new blocks", used >> 10);
        assert!(used >= 1 << 20, "copy-on-write allocates on the first write ({used} bytes)");
        let mut image = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(images.join("big.ext4")).unwrap(),
            &mut image,
            1 << 20,
        )
        .unwrap();
        assert_ne!(image, [0xAB; 16], "the image itself is untouched");
        drop(agent);
        // Lazily: a VMM just killed may not have let go of its files yet.
        nexus_e2e::run_ok(std::process::Command::new("umount").arg("--lazy").arg(&mnt));
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The confinement of a jailed VMM, as `/proc` shows it: (uid, gid, root,
/// the capability sets, no_new_privs).
fn confinement(pid: u32) -> (u32, u32, PathBuf, Vec<String>, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default()
    };
    let ids = |name: &str| -> Vec<u32> { field(name).split_whitespace().map(|v| v.parse().unwrap()).collect() };
    let (uids, gids) = (ids("Uid:"), ids("Gid:"));
    assert!(
        uids.iter().all(|u| *u == uids[0]) && gids.iter().all(|g| *g == gids[0]),
        "real, effective, saved, fs ids agree"
    );
    let caps =
        ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"].iter().map(|c| format!("{c} {}", field(c))).collect();
    let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    (uids[0], gids[0], root, caps, field("NoNewPrivs:"))
}

#[test]
fn each_vmm_runs_jailed_as_its_own_user_without_capabilities_and_cannot_open_host_files() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        // A host file any host user could read: only the jail keeps it from the VMM.
        let secret = dir.path().join("host-secret");
        std::fs::write(&secret, "host only").unwrap();
        let secret_s = secret.display().to_string();
        let agent = Agent::start(dir.path(), &[("FIRECRACKER_SIM_TRY_OPEN", &secret_s)]).await;
        let a = agent.ensure(&request(UID)).await;
        assert_eq!(a.state, ObservedState::Running);
        let pid = a.runtime.pid.unwrap();
        let (uid, gid, root, caps, nnp) = confinement(pid);
        println!("VMM {pid}: uid {uid} gid {gid} root {} {caps:?} NoNewPrivs {nnp}", root.display());
        assert!(uid >= 1_000_000 && gid == uid, "its own unprivileged user: {uid}:{gid}");
        assert_eq!(root, agent.run_dir().join("vms").join(UID).join("root"), "chrooted into its VM's jail");
        for c in &caps {
            assert!(c.ends_with(" 0000000000000000"), "no capabilities: {c}");
        }
        assert_eq!(nnp, "1");
        let console = std::fs::read_to_string(a.runtime.console_path.as_ref().unwrap()).unwrap();
        assert!(
            console.contains(&format!("firecracker-sim: cannot open {secret_s}: No such file or directory")),
            "the host file is out of its sight: {console}"
        );
        // Its jail holds only its own files, and the jail belongs to root.
        let jail = agent.run_dir().join("vms").join(UID).join("root");
        let list = |dir: &std::path::Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let names = list(&jail);
        println!("jail: {names:?}");
        assert_eq!(names, ["fc.log", "metrics.json", "rootfs.ext4", "run"], "only the VM's own files");
        // What the VMM sees at / is the node's shared skeleton, with the
        // jail at /vm.
        let seen = list(&std::path::PathBuf::from(format!("/proc/{pid}/root")));
        println!("the VMM's /: {seen:?}");
        for want in ["dev", "fc.log", "firecracker", "kernel", "metrics.json", "rootfs.ext4", "run", "vm"] {
            assert!(seen.iter().any(|n| n == want), "{want} in the VMM's root: {seen:?}");
        }
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&jail).unwrap().uid(), 0, "the VMM cannot rename what is in its jail");
        assert_eq!(std::fs::metadata(jail.join("rootfs.ext4")).unwrap().uid(), uid, "its disk is its own");

        // A kernel the VMM's user could not read is refused up front, saying so.
        use std::os::unix::fs::PermissionsExt;
        let private =
            std::path::PathBuf::from(format!("/var/lib/nexus/images/jail-test-{}-vmlinux", std::process::id()));
        std::fs::copy("/var/lib/nexus/images/vmlinux", &private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut unreadable = request("00000000-0000-4000-8000-0000000000a7");
        unreadable.mac = "06:00:ac:10:00:0d".into();
        unreadable.kernel_path = private.display().to_string();
        let (s, body) = agent
            .call("PUT", &format!("/v1/vms/{}", unreadable.uid), Some(&serde_json::to_value(&unreadable).unwrap()))
            .await;
        std::fs::remove_file(&private).unwrap();
        assert_eq!(s, 422, "{body}");
        assert!(body.contains("ImageUnreadable") && body.contains("chmod a+r"), "{body}");
        agent.call("DELETE", &format!("/v1/vms/{}", unreadable.uid), None).await;

        // A second VM gets another user.
        let b_uid = "00000000-0000-4000-8000-0000000000b7";
        let mut b = request(b_uid);
        b.mac = "06:00:ac:10:00:0b".into();
        let rb = agent.ensure(&b).await;
        let (uid_b, ..) = confinement(rb.runtime.pid.unwrap());
        assert_ne!(uid_b, uid, "one user per VMM");

        // The whole lifecycle works jailed: pause, resume, stop, start,
        // snapshot and restore.
        for state in [PowerState::Paused, PowerState::Running, PowerState::Stopped, PowerState::Running] {
            let mut r = request(UID);
            r.state = state;
            let got = agent.ensure(&r).await;
            let want = match state {
                PowerState::Paused => ObservedState::Paused,
                PowerState::Stopped => ObservedState::Stopped,
                _ => ObservedState::Running,
            };
            assert_eq!(got.state, want, "{state:?}");
        }
        let again = agent.ensure(&request(UID)).await;
        assert_eq!(confinement(again.runtime.pid.unwrap()).0, uid, "a VM keeps its user across restarts");
        let snap_uid = "00000000-0000-4000-8000-0000000000c7";
        let (s, body) =
            agent.call("PUT", &format!("/v1/snapshots/{snap_uid}"), Some(&serde_json::json!({"vmUid": UID}))).await;
        assert_eq!(s, 200, "{body}");
        let mut c = request("00000000-0000-4000-8000-0000000000d7");
        c.mac = "06:00:ac:10:00:0c".into();
        c.restore = Some(nexus_api::agent::RestoreFrom { snapshot_uid: snap_uid.into() });
        let rc = agent.ensure(&c).await;
        assert_eq!(rc.state, ObservedState::Running);
        let (uid_c, _, root_c, caps_c, _) = confinement(rc.runtime.pid.unwrap());
        assert!(uid_c != uid && uid_c != uid_b && uid_c >= 1_000_000);
        assert!(root_c.ends_with("00000000-0000-4000-8000-0000000000d7/root"));
        assert!(caps_c.iter().all(|c| c.ends_with(" 0000000000000000")));
        for u in [UID, b_uid, "00000000-0000-4000-8000-0000000000d7"] {
            agent.call("DELETE", &format!("/v1/vms/{u}"), None).await;
        }
        assert!(host::vmm_processes_under(&agent.run_dir()).is_empty());
    });
}

#[test]
fn a_vmm_an_earlier_agent_started_unjailed_is_adopted_then_restarts_jailed() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        // The VM's directory and configuration, with no VMM yet.
        let mut stopped = request(UID);
        stopped.state = PowerState::Stopped;
        agent.ensure(&stopped).await;
        // Its VMM, started as agents did before jails: unjailed, its VM
        // directory bind-mounted at <run>/vm, configured and booted.
        let run = agent.run_dir().canonicalize().unwrap();
        let vm_dir = run.join("vms").join(UID);
        std::fs::create_dir_all(run.join("vm")).unwrap();
        std::fs::copy("/var/lib/nexus/images/rootfs.ext4", vm_dir.join("rootfs.ext4")).unwrap();
        let script = format!(
            "mount --bind {} {} && exec {} --api-sock {}/vm/fc.sock --id {UID}",
            vm_dir.display(),
            run.join("vm").display(),
            bin("firecracker-sim").display(),
            run.display()
        );
        let old = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = old.id();
        let socket = vm_dir.join("fc.sock");
        wait_until(Duration::from_secs(5), "the unjailed VMM's socket", || async {
            host::fc_get_root(&socket).await.is_ok()
        })
        .await;
        for (path, body) in [
            ("/boot-source", r#"{"kernel_image_path":"/var/lib/nexus/images/vmlinux"}"#.to_string()),
            ("/machine-config", r#"{"vcpu_count":1,"mem_size_mib":128}"#.to_string()),
            (
                "/drives/rootfs",
                format!(
                    r#"{{"drive_id":"rootfs","path_on_host":"{}/vm/rootfs.ext4","is_root_device":true,"is_read_only":false}}"#,
                    run.display()
                ),
            ),
            ("/actions", r#"{"action_type":"InstanceStart"}"#.to_string()),
        ] {
            let (s, answer) = host::fc_request(&socket, "PUT", path, Some(&body)).await.unwrap();
            assert_eq!(s, 204, "{path}: {answer}");
        }
        std::fs::write(vm_dir.join("pid"), pid.to_string()).unwrap();
        std::fs::write(vm_dir.join("started"), format!("{}\n5\n", chrono::Utc::now().to_rfc3339())).unwrap();

        // The upgraded agent adopts it: same process, Running, in the inventory.
        let adopted = agent.ensure(&request(UID)).await;
        assert_eq!((adopted.runtime.pid, adopted.state), (Some(pid), ObservedState::Running), "adopted, not restarted");
        assert!(agent.inventory().await.vmms.iter().any(|v| v.pid == pid && v.uid == UID));
        let (s, body) = agent
            .call("PUT", "/v1/snapshots/00000000-0000-4000-8000-0000000000e8", Some(&serde_json::json!({"vmUid": UID})))
            .await;
        assert_eq!(s, 422, "a snapshot of an unjailed VMM is refused with a way out: {body}");
        assert!(body.contains("stop and start the VM"), "{body}");

        // Stopped, it goes; started again, it runs jailed.
        agent.ensure(&stopped).await;
        let mut old = old;
        assert!(old.try_wait().unwrap().is_some(), "the unjailed VMM was stopped");
        let again = agent.ensure(&request(UID)).await;
        let new_pid = again.runtime.pid.unwrap();
        assert_ne!(new_pid, pid);
        assert_eq!(std::fs::read_link(format!("/proc/{new_pid}/root")).unwrap(), vm_dir.join("root"));
        assert!(!vm_dir.join("fc.sock").exists());
    });
}
