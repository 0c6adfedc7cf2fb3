//! Several nodes, many VMs, and faults: scheduling spread and capacity,
//! convergence after killing each process, and no leaks.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nexus_api::meta::find_condition;
use nexus_api::{VmPhase, VmSpec};
use nexus_client::ListParams;
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::{in_private_netns, wait_until};

fn vms_yaml(names: &[String]) -> String {
    names
        .iter()
        .map(|n| {
            format!(
                "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {n}\n  labels:\n    fleet: \"yes\"\nspec:\n  vcpu: 1\n  memMib: 128\n  \
                 kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn nexusctl(fleet: &MultiNode, args: &[&str]) -> String {
    let (ok, out, err) = fleet.nexusctl(args);
    assert!(ok, "nexusctl {args:?}: {err}");
    out
}

async fn running_count(fleet: &MultiNode) -> usize {
    let params = ListParams { label_selector: Some("fleet=yes".into()), ..Default::default() };
    match fleet.client().list::<VmSpec>(Some("default"), &params).await {
        Ok(l) => l
            .items
            .iter()
            .filter(|v| {
                let s = v.status_or_default();
                s.phase == VmPhase::Running
                    && find_condition(&s.conditions, "Ready")
                        .is_some_and(|c| c.status == nexus_api::ConditionStatus::True)
            })
            .count(),
        Err(_) => 0,
    }
}

async fn delete_all_and_check_nothing_left(fleet: &mut MultiNode) {
    nexusctl(fleet, &["delete", "vm", "-l", "fleet=yes", "--wait", "--timeout", "120"]);
    let leftovers = (fleet.vmms(), fleet.taps(), fleet.run_dirs());
    println!(
        "after deleting every VM: {} VMM processes, {} TAPs, {} run directories",
        leftovers.0, leftovers.1, leftovers.2
    );
    assert_eq!(leftovers, (0, 0, 0));
    fleet.stop();
}

#[test]
fn fifty_vms_spread_over_three_agents_within_capacity_and_the_overflow_waits_with_a_reason() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = MultiNode::start(dir.path(), 3, 17).await;
        let names: Vec<String> = (0..50).map(|i| format!("ci-{i:02}")).collect();
        let file = dir.path().join("fleet.yaml");
        std::fs::write(&file, vms_yaml(&names)).unwrap();
        let started = Instant::now();
        nexusctl(&fleet, &["apply", "-f", &file.display().to_string()]);
        wait_until(Duration::from_secs(180), "50 VMs Running", || async { running_count(&fleet).await == 50 }).await;
        println!("50 VMs from apply to Running on 3 agents in {} ms", started.elapsed().as_millis());

        let vms = fleet.client().list::<VmSpec>(Some("default"), &ListParams::default()).await.unwrap().items;
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for v in &vms {
            *per_node.entry(v.spec.node_name.clone().unwrap()).or_default() += 1;
        }
        println!("VMs per node: {per_node:?}");
        let (min, max) = (per_node.values().min().copied().unwrap(), per_node.values().max().copied().unwrap());
        assert_eq!(per_node.len(), 3);
        assert!(max - min <= 1 && max <= 17, "{per_node:?}");
        assert_eq!(fleet.vmms(), 50);
        assert_eq!(fleet.taps(), 50);

        // 51 places in all: one more fits, the next waits with the reason.
        let extra = dir.path().join("extra.yaml");
        std::fs::write(&extra, vms_yaml(&["ci-50".to_string()])).unwrap();
        nexusctl(&fleet, &["apply", "-f", &extra.display().to_string()]);
        wait_until(Duration::from_secs(60), "the 51st VM Running", || async { running_count(&fleet).await == 51 })
            .await;
        std::fs::write(&extra, vms_yaml(&["ci-51".to_string()])).unwrap();
        nexusctl(&fleet, &["apply", "-f", &extra.display().to_string()]);
        let client = fleet.client();
        wait_until(Duration::from_secs(30), "the 52nd VM to be Unschedulable", || async {
            client.get::<VmSpec>("default", "ci-51").await.is_ok_and(|v| {
                let s = v.status_or_default();
                s.phase == VmPhase::Pending
                    && find_condition(&s.conditions, "Scheduled")
                        .is_some_and(|c| c.reason == "Unschedulable" && c.message.contains("already runs 17 of 17 VMs"))
            })
        })
        .await;
        let reason = client.get::<VmSpec>("default", "ci-51").await.unwrap().status.unwrap();
        println!("ci-51: {}", find_condition(&reason.conditions, "Scheduled").unwrap().message);
        delete_all_and_check_nothing_left(&mut fleet).await;
    });
}

#[test]
fn killing_each_process_during_churn_converges_and_leaks_nothing() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = MultiNode::start(dir.path(), 3, 20).await;
        let first: Vec<String> = (0..12).map(|i| format!("churn-{i:02}")).collect();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, vms_yaml(&first)).unwrap();
        nexusctl(&fleet, &["apply", "-f", &file.display().to_string()]);
        wait_until(Duration::from_secs(120), "12 VMs Running", || async { running_count(&fleet).await == 12 }).await;
        let mut report = Vec::new();

        // The apiserver, killed while more VMs are being applied.
        let more: Vec<String> = (12..18).map(|i| format!("churn-{i:02}")).collect();
        let file_b = dir.path().join("b.yaml");
        std::fs::write(&file_b, vms_yaml(&more)).unwrap();
        nexusctl(&fleet, &["apply", "-f", &file_b.display().to_string()]);
        fleet.apiserver.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        fleet.restart_apiserver();
        let back = Instant::now();
        wait_until(Duration::from_secs(120), "18 VMs Running after the apiserver restart", || async {
            running_count(&fleet).await == 18
        })
        .await;
        report.push(("apiserver", back.elapsed()));

        // An agent: gone long enough for its node to be NotReady.
        fleet.agents[1].kill();
        wait_until(Duration::from_secs(30), "the node's VMs to notice", || async { running_count(&fleet).await < 18 })
            .await;
        fleet.restart_agent(1);
        let back = Instant::now();
        wait_until(Duration::from_secs(60), "all Ready after the agent restart", || async {
            running_count(&fleet).await == 18
        })
        .await;
        report.push(("agent", back.elapsed()));

        // The leading controller, killed while VMs are being applied: the
        // standby takes the lease and carries on.
        let mut standby = nexus_e2e::spawn_controller(
            &fleet.server,
            &fleet.ca,
            &dir.path().join("controller.token"),
            "127.0.0.1:7446",
            &dir.path().join("controller-2.log"),
        );
        let client = fleet.client();
        let holder = || async {
            client.get::<nexus_api::LeaseSpec>("", "nexus-controller").await.ok().and_then(|l| l.spec.holder_identity)
        };
        let leader = holder().await.unwrap();
        let churned = dir.path().join("c.yaml");
        std::fs::write(&churned, vms_yaml(&["churn-18".to_string()])).unwrap();
        nexusctl(&fleet, &["apply", "-f", &churned.display().to_string()]);
        if leader.ends_with(&format!("-{}", fleet.controller.pid())) {
            fleet.controller.kill()
        } else {
            standby.kill()
        }
        let back = Instant::now();
        wait_until(Duration::from_secs(20), "the standby to lead", || async {
            holder().await.is_some_and(|h| h != leader)
        })
        .await;
        wait_until(Duration::from_secs(60), "a VM applied as the leader died to run", || async {
            running_count(&fleet).await == 19
        })
        .await;
        report.push(("leading controller", back.elapsed()));

        // A VMM.
        let vm = fleet.client().get::<VmSpec>("default", "churn-03").await.unwrap();
        let pid = vm.status.unwrap().runtime.unwrap().pid.unwrap();
        nexus_e2e::host::sigkill(pid);
        let back = Instant::now();
        let client = fleet.client();
        wait_until(Duration::from_secs(60), "the VMM replaced", || async {
            client.get::<VmSpec>("default", "churn-03").await.is_ok_and(|v| {
                let s = v.status_or_default();
                s.phase == VmPhase::Running && s.runtime.and_then(|r| r.pid).is_some_and(|p| p != pid)
            })
        })
        .await;
        report.push(("VMM", back.elapsed()));

        for (what, took) in &report {
            let when = match *what {
                "VMM" | "leading controller" => "was killed",
                _ => "was running again",
            };
            println!("all VMs Ready {} ms after the {what} {when}", took.as_millis());
        }
        assert_eq!(fleet.vmms(), 19, "one VMM per VM, no duplicates");
        assert_eq!(fleet.taps(), 19);
        delete_all_and_check_nothing_left(&mut fleet).await;
    });
}

#[test]
fn vms_of_a_deleted_node_are_placed_again_and_what_they_left_there_is_collected() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = MultiNode::start(dir.path(), 2, 10).await;
        let client = fleet.client();
        let names: Vec<String> = (0..4).map(|i| format!("move-{i}")).collect();
        let file = dir.path().join("vms.yaml");
        let pinned = vms_yaml(&["pinned".to_string()]).replace("spec:\n", "spec:\n  nodeName: node-1\n");
        std::fs::write(&file, format!("{}---\n{pinned}", vms_yaml(&names))).unwrap();
        nexusctl(&fleet, &["apply", "-f", &file.display().to_string()]);
        wait_until(Duration::from_secs(60), "5 VMs Running", || async { running_count(&fleet).await == 5 }).await;
        let on_node_1: Vec<nexus_api::Vm> = client
            .list::<VmSpec>(Some("default"), &ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|v| v.spec.node_name.as_deref() == Some("node-1") && v.name() != "pinned")
            .collect();
        assert_eq!(on_node_1.len(), 2, "spread 2/2 plus the pinned one");
        let pinned_pid = client.get::<VmSpec>("default", "pinned").await.unwrap().status.unwrap().runtime.unwrap().pid;

        // node-1's agent dies and an operator deletes the Node for good.
        fleet.agents[0].kill();
        nexusctl(&fleet, &["delete", "node", "node-1"]);
        let deleted = Instant::now();
        wait_until(Duration::from_secs(30), "the placed VMs to run on node-2", || async {
            let mut all = true;
            for v in &on_node_1 {
                all &= client.get::<VmSpec>("default", v.name()).await.is_ok_and(|v| {
                    v.spec.node_name.as_deref() == Some("node-2") && v.status_or_default().phase == VmPhase::Running
                });
            }
            all
        })
        .await;
        println!(
            "2 VMs placed again and Running on node-2 {} ms after node-1 was deleted",
            deleted.elapsed().as_millis()
        );
        let pinned = client.get::<VmSpec>("default", "pinned").await.unwrap();
        assert_eq!(pinned.spec.node_name.as_deref(), Some("node-1"), "a pinned VM is not moved");
        let ready = find_condition(&pinned.status_or_default().conditions, "Ready").cloned().unwrap();
        assert_eq!(ready.reason, "NodeNotFound", "{ready:?}");
        // Events go out in batches, a moment after what they record.
        let rescheduled = || async {
            let events = client.list::<nexus_api::EventSpec>(None, &ListParams::default()).await.unwrap().items;
            events.iter().filter(|e| e.spec.reason == "Rescheduled").count()
        };
        wait_until(Duration::from_secs(5), "two Rescheduled events", || async { rescheduled().await >= 2 }).await;
        assert_eq!(rescheduled().await, 2, "one Rescheduled event per moved VM");

        // node-1 comes back: the pinned VM is adopted there, and what the
        // moved VMs left on node-1 is collected.
        fleet.restart_agent(0);
        let back = Instant::now();
        wait_until(Duration::from_secs(30), "the pinned VM Ready on node-1", || async {
            client.get::<VmSpec>("default", "pinned").await.is_ok_and(|v| {
                let s = v.status_or_default();
                s.phase == VmPhase::Running
                    && find_condition(&s.conditions, "Ready")
                        .is_some_and(|c| c.status == nexus_api::ConditionStatus::True)
            })
        })
        .await;
        let now = client.get::<VmSpec>("default", "pinned").await.unwrap().status.unwrap().runtime.unwrap().pid;
        assert_eq!(now, pinned_pid, "adopted, not restarted");
        let run_1 = dir.path().join("run-1");
        wait_until(Duration::from_secs(30), "the moved VMs' leftovers on node-1 to be collected", || async {
            nexus_e2e::host::vmm_processes_under(&run_1).len() == 1 && nexus_e2e::host::run_dirs(&run_1).len() == 1
        })
        .await;
        println!(
            "leftovers on node-1 collected {} ms after its agent returned (GC grace 3 s)",
            back.elapsed().as_millis()
        );
        assert_eq!(fleet.nodes[0].taps().len(), 1, "only the pinned VM's TAP remains on node-1");
        assert_eq!(fleet.vmms(), 5);
        delete_all_and_check_nothing_left(&mut fleet).await;
    });
}
