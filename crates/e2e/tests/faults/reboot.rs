//! A host that reboots: its agent, every VMM, TAP, VM namespace, the bridge
//! and the NAT table gone at once; the run directory kept (on disk) or gone
//! (on tmpfs).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use nexus_api::meta::find_condition;
use nexus_api::{ConditionStatus, Vm, VmPhase, VmSpec};
use nexus_client::{Client, ListParams};
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::{in_private_netns, run_ok, wait_until};

use super::vm_yaml;

/// What a reboot of node `i` (0-based) takes away: the agent and every VMM
/// (SIGKILL), every link but the uplink, the agent's nftables table, and
/// with `wipe` the run directory.
fn reboot(fleet: &mut MultiNode, i: usize, wipe: bool) {
    fleet.agents[i].kill();
    let run = fleet.dir.join(format!("run-{}", i + 1));
    nexus_e2e::kill_vmms_under(&run);
    let ns = &fleet.nodes[i];
    let uplink = format!("nxn{}", ns.index);
    let links: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show"])).unwrap();
    for name in links.as_array().unwrap().iter().filter_map(|l| l["ifname"].as_str()) {
        if name != "lo" && name != uplink {
            // A veth's peer goes with it: ignore "cannot find device".
            let _ = Command::new("ip").args(["-n", &ns.name, "link", "del", name]).status();
        }
    }
    run_ok(Command::new("ip").args(["netns", "exec", &ns.name, "nft", "delete", "table", "ip", "nexus"]));
    if wipe {
        std::fs::remove_dir_all(&run).unwrap();
    }
}

fn phase_and_ready(vm: &Vm) -> (VmPhase, Option<ConditionStatus>, u32) {
    let s = vm.status_or_default();
    let ready = find_condition(&s.conditions, "Ready").map(|c| c.status);
    (s.phase, ready, s.runtime.and_then(|r| r.pid).unwrap_or(0))
}

async fn vms(client: &Client) -> BTreeMap<String, Vm> {
    let list = client.list::<VmSpec>(Some("default"), &ListParams::default()).await.unwrap();
    list.items.into_iter().map(|v| (v.name().to_string(), v)).collect()
}

#[test]
fn after_a_reboot_the_vms_that_should_run_run_again_and_nothing_stale_is_left() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = MultiNode::start(dir.path(), 1, 10).await;
        let client = fleet.client();
        let rootfs = "/var/lib/nexus/images/rootfs.ext4";
        let mut file = String::new();
        for (name, extra) in [
            ("always-0", ""),
            ("always-1", ""),
            ("on-failure", "  restartPolicy: OnFailure\n"),
            ("never", "  restartPolicy: Never\n"),
            ("off", "  state: Stopped\n"),
        ] {
            file.push_str(&vm_yaml(name, rootfs).replace("spec:\n", &format!("spec:\n{extra}")));
            file.push_str("---\n");
        }
        let path = dir.path().join("vms.yaml");
        std::fs::write(&path, file).unwrap();
        let (ok, out, err) = fleet.nexusctl(&["apply", "-f", &path.display().to_string()]);
        assert!(ok, "{out}{err}");
        let should_run = ["always-0", "always-1", "on-failure"];
        for name in should_run.iter().chain(&["never"]) {
            let (ok, out, err) =
                fleet.nexusctl(&["wait", "vm", name, "--for=jsonpath={.status.phase}=Running", "--timeout", "60"]);
            assert!(ok, "{name}: {out}{err}");
        }
        wait_until(Duration::from_secs(30), "off Stopped", || async {
            vms(&client).await["off"].status_or_default().phase == VmPhase::Stopped
        })
        .await;

        for wipe in [false, true] {
            let before = vms(&client).await;
            let what = if wipe { "run directory gone (tmpfs)" } else { "run directory kept (disk)" };
            reboot(&mut fleet, 0, wipe);
            let down = Instant::now();
            // The host is down long enough for the node to be noticed.
            wait_until(Duration::from_secs(20), "node-1 NotReady", || async {
                client.get::<nexus_api::NodeSpec>("", "node-1").await.is_ok_and(|n| {
                    find_condition(&n.status_or_default().conditions, "Ready")
                        .is_some_and(|c| c.status != ConditionStatus::True)
                })
            })
            .await;
            let down_for = down.elapsed();
            fleet.restart_agent(0);
            let started = Instant::now();
            wait_until(Duration::from_secs(30), "every VM that should run Running with a new VMM", || async {
                let now = vms(&client).await;
                should_run.iter().all(|n| {
                    let (phase, ready, pid) = phase_and_ready(&now[*n]);
                    phase == VmPhase::Running
                        && ready == Some(ConditionStatus::True)
                        && pid != phase_and_ready(&before[*n]).2
                })
            })
            .await;
            let took = started.elapsed();
            let now = vms(&client).await;
            let never = now["never"].status_or_default();
            let off = now["off"].status_or_default();
            println!(
                "reboot, {what}: down {} ms; {} VMs Running again {} ms after the agent started; never: {:?} ({}), \
                 off: {:?}",
                down_for.as_millis(),
                should_run.len(),
                took.as_millis(),
                never.phase,
                find_condition(&never.conditions, "Ready").map(|c| c.message.clone()).unwrap_or_default(),
                off.phase
            );
            assert!(matches!(never.phase, VmPhase::Failed | VmPhase::Stopped), "{:?}", never.phase);
            assert_eq!(off.phase, VmPhase::Stopped);
            // Nothing stale: one VMM and one TAP per running VM.
            let run = fleet.dir.join("run-1");
            wait_until(Duration::from_secs(10), "nothing stale", || async {
                nexus_e2e::host::vmm_processes_under(&run).len() == should_run.len()
                    && fleet.nodes[0].taps().len() == should_run.len()
            })
            .await;
            println!(
                "  left: {} VMMs, {} TAPs, {} VM directories for {} running VMs",
                nexus_e2e::host::vmm_processes_under(&run).len(),
                fleet.nodes[0].taps().len(),
                nexus_e2e::host::run_dirs(&run).len(),
                should_run.len()
            );
            let bridge = run_ok(Command::new("ip").args(["-n", &fleet.nodes[0].name, "-j", "link", "show", "nxbr0"]));
            assert!(bridge.contains("nxbr0"), "the bridge is back");
        }
        fleet.stop();
    });
}
