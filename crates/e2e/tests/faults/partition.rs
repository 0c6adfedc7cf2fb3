//! A node cut off from the control plane for 20 s while every process on
//! it keeps running.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nexus_api::meta::find_condition;
use nexus_api::{ConditionStatus, VmPhase, VmSpec};
use nexus_client::{Client, ListParams};
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::{in_private_netns, wait_until};

use super::vm_yaml;

/// How long the node is cut off.
const PARTITION: Duration = Duration::from_secs(20);

/// The VMM pids of each VM uid on the fleet's nodes (a VM with two VMMs
/// has two pids).
fn vmms_by_uid(fleet: &MultiNode) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for i in 1..=fleet.nodes.len() {
        let vms = fleet.dir.join(format!("run-{i}")).join("vms");
        for (pid, _) in nexus_e2e::host::vmm_processes_under(&fleet.dir.join(format!("run-{i}"))) {
            let Ok(root) = std::fs::read_link(format!("/proc/{pid}/root")) else { continue };
            let Ok(rest) = root.strip_prefix(&vms) else { continue };
            let uid = rest.components().next().map(|c| c.as_os_str().to_string_lossy().to_string()).unwrap_or_default();
            out.entry(uid).or_default().push(pid);
        }
    }
    out
}

async fn node_ready(client: &Client, node: &str) -> bool {
    client.get::<nexus_api::NodeSpec>("", node).await.is_ok_and(|n| {
        find_condition(&n.status_or_default().conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
    })
}

/// Every VM Running, Ready True, on the node and with the pid `want` names.
async fn converged(client: &Client, want: &BTreeMap<String, (String, u32)>) -> bool {
    let Ok(list) = client.list::<VmSpec>(Some("default"), &ListParams::default()).await else { return false };
    list.items.len() == want.len()
        && list.items.iter().all(|vm| {
            let s = vm.status_or_default();
            let ready = find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True);
            let pid = s.runtime.as_ref().and_then(|r| r.pid);
            want.get(vm.name())
                .is_some_and(|(node, p)| vm.spec.node_name.as_deref() == Some(node.as_str()) && pid == Some(*p))
                && s.phase == VmPhase::Running
                && ready
        })
}

#[test]
fn a_cut_off_node_keeps_its_vms_gets_no_second_vmm_and_converges_when_it_returns() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = MultiNode::start(dir.path(), 2, 10).await;
        let client = fleet.client();
        let rootfs = "/var/lib/nexus/images/rootfs.ext4";
        let mut file = String::new();
        for (name, node) in [("cut-0", "node-1"), ("cut-1", "node-1"), ("cut-2", "node-1"), ("away-0", "node-2")] {
            file.push_str(&vm_yaml(name, rootfs).replace("spec:\n", &format!("spec:\n  nodeName: {node}\n")));
            file.push_str("---\n");
        }
        let path = dir.path().join("vms.yaml");
        std::fs::write(&path, file).unwrap();
        let (ok, out, err) = fleet.nexusctl(&["apply", "-f", &path.display().to_string()]);
        assert!(ok, "{out}{err}");
        wait_until(Duration::from_secs(60), "4 VMs Running", || async {
            client.list::<VmSpec>(Some("default"), &ListParams::default()).await.is_ok_and(|l| {
                l.items.len() == 4 && l.items.iter().all(|v| v.status_or_default().phase == VmPhase::Running)
            })
        })
        .await;
        let mut want: BTreeMap<String, (String, u32)> = BTreeMap::new();
        for vm in client.list::<VmSpec>(Some("default"), &ListParams::default()).await.unwrap().items {
            let pid = vm.status_or_default().runtime.and_then(|r| r.pid).unwrap();
            want.insert(vm.name().to_string(), (vm.spec.node_name.clone().unwrap(), pid));
        }
        let uids: BTreeMap<String, String> = client
            .list::<VmSpec>(Some("default"), &ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|v| (v.uid().to_string(), v.name().to_string()))
            .collect();

        // The cut: node-1's link drops everything for 20 s.
        fleet.nodes[0].partition();
        let began = Instant::now();
        let mut not_ready_after = None;
        let mut most_vmms = 0;
        let mut statuses = BTreeMap::new();
        // Meanwhile a new VM is made: it must go to node-2, the only Ready node.
        let mut made_during = false;
        while began.elapsed() < PARTITION {
            let vmms = vmms_by_uid(&fleet);
            most_vmms = most_vmms.max(vmms.values().map(Vec::len).max().unwrap_or(0));
            for (uid, pids) in &vmms {
                if let Some(name) = uids.get(uid) {
                    assert_eq!(pids, &vec![want[name].1], "{name} keeps its one VMM");
                }
            }
            if not_ready_after.is_none() && !node_ready(&client, "node-1").await {
                not_ready_after = Some(began.elapsed());
            }
            if not_ready_after.is_some() && !made_during {
                let new = dir.path().join("new.yaml");
                std::fs::write(&new, vm_yaml("new-0", rootfs)).unwrap();
                let (ok, out, err) = fleet.nexusctl(&["apply", "-f", &new.display().to_string()]);
                assert!(ok, "{out}{err}");
                made_during = true;
            }
            if let Ok(vm) = client.get::<VmSpec>("default", "cut-0").await
                && let Some(c) = find_condition(&vm.status_or_default().conditions, "Ready")
            {
                statuses.insert(format!("{:?} {}: {}", c.status, c.reason, c.message), ());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let not_ready_after = not_ready_after.expect("node-1 went NotReady during the partition");
        println!(
            "partition of node-1 for {} ms: NotReady after {} ms; cut-0 said {:?}; at most {most_vmms} VMM per VM",
            PARTITION.as_millis(),
            not_ready_after.as_millis(),
            statuses.keys().collect::<Vec<_>>()
        );
        assert_eq!(most_vmms, 1, "no VM ever had two VMMs");
        let new = client.get::<VmSpec>("default", "new-0").await.unwrap();
        assert_eq!(new.spec.node_name.as_deref(), Some("node-2"), "a VM made meanwhile goes to the Ready node");

        // Healed: everything converges without restarting what kept running.
        fleet.nodes[0].heal();
        let healed = Instant::now();
        wait_until(Duration::from_secs(20), "new-0 Running", || async {
            client
                .get::<VmSpec>("default", "new-0")
                .await
                .is_ok_and(|v| v.status_or_default().phase == VmPhase::Running)
        })
        .await;
        let new_pid = client.get::<VmSpec>("default", "new-0").await.unwrap().status.unwrap().runtime.unwrap().pid;
        want.insert("new-0".into(), ("node-2".into(), new_pid.unwrap()));
        wait_until(Duration::from_secs(20), "every VM Ready on its node with its first VMM", || async {
            node_ready(&client, "node-1").await && converged(&client, &want).await
        })
        .await;
        let took = healed.elapsed();
        println!("healed: node-1 Ready and every VM Ready with its first VMM {} ms later", took.as_millis());
        let vmms = vmms_by_uid(&fleet);
        assert_eq!(vmms.len(), want.len(), "one VMM per VM: {vmms:?}");
        assert!(vmms.values().all(|p| p.len() == 1), "{vmms:?}");
        assert_eq!(fleet.taps(), want.len(), "one TAP per VM");
        fleet.stop();
    });
}
