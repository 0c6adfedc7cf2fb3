//! Snapshots end to end, on the simulated VMM: a Snapshot object captures
//! a running VM, new VMs start from it on its node with network identities
//! of their own, a crash at any step of a snapshot ends in Ready or Failed,
//! and nothing is left behind.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nexus_api::snapshot::SnapshotPhase;
use nexus_api::{SnapshotSpec, Vm, VmPhase, VmSpec};
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::{Cluster, ClusterOptions, in_private_netns, wait_until};
use serde_json::Value;

fn vm_yaml(name: &str, mem_mib: u32) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  vcpu: 1\n  memMib: {mem_mib}\n  \
         kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n  network:\n    ip: auto\n"
    )
}

async fn vm(client: &nexus_client::Client, name: &str) -> Option<Vm> {
    client.get::<VmSpec>("default", name).await.ok()
}

async fn phase(client: &nexus_client::Client, name: &str) -> Option<VmPhase> {
    vm(client, name).await.map(|v| v.status_or_default().phase)
}

async fn snap_phase(client: &nexus_client::Client, name: &str) -> Option<SnapshotPhase> {
    client.get::<SnapshotSpec>("default", name).await.ok().map(|s| s.status_or_default().phase)
}

/// Links on the bridge of a node namespace: (name, MAC).
fn bridge_ports(ns: &nexus_e2e::multinode::NodeNs) -> Vec<(String, String)> {
    let out = ns.ip(&["-j", "link", "show", "master", "nxbr0"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .map(|l| (l["ifname"].as_str().unwrap_or("").to_string(), l["address"].as_str().unwrap_or("").to_string()))
        .collect()
}

#[test]
fn a_snapshot_restores_into_three_vms_on_its_node_each_with_its_own_identity_and_nothing_is_left() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = MultiNode::start(dir.path(), 2, 10).await;
        let client = fleet.client();
        let file = dir.path().join("src.yaml");
        std::fs::write(&file, vm_yaml("src", 512)).unwrap();
        let (ok, _, err) = fleet.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        wait_until(Duration::from_secs(30), "the source VM to run", || async {
            phase(&client, "src").await == Some(VmPhase::Running)
        })
        .await;
        let src = vm(&client, "src").await.unwrap();
        let node = src.spec.node_name.clone().unwrap();
        let src_mac = src.status_or_default().runtime.unwrap().mac.unwrap();
        let index: usize = node.trim_start_matches("node-").parse().unwrap();
        let run = dir.path().join(format!("run-{index}"));

        // Snapshot, resuming after.
        let started = Instant::now();
        let (ok, out, err) = fleet.nexusctl(&["snapshot", "src", "warm", "--wait"]);
        let took = started.elapsed();
        assert!(ok, "{err}\n{out}");
        println!("snapshot of a Running 512 MiB VM: {out}took {} ms (nexusctl snapshot --wait)", took.as_millis());
        let snap = client.get::<SnapshotSpec>("default", "warm").await.unwrap();
        let st = snap.status_or_default();
        assert_eq!(st.phase, SnapshotPhase::Ready);
        assert_eq!(st.node_name.as_deref(), Some(node.as_str()));
        assert_eq!(st.vm_uid.as_deref(), Some(src.uid()));
        assert_eq!(st.config.as_ref().map(|c| c.mem_mib), Some(512));
        let files: Vec<(String, u64)> = st.files.iter().map(|f| (f.name.clone(), f.bytes)).collect();
        println!(
            "files: {files:?}; {} bytes in all; the VM was paused {} ms",
            st.size_bytes.unwrap(),
            st.paused_millis.unwrap()
        );
        assert_eq!(files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), ["state", "memory", "disk"]);
        let snap_dir = run.join("snapshots").join(snap.uid());
        assert!(snap_dir.join("mem").exists());
        assert_eq!(std::fs::metadata(snap_dir.join("mem")).unwrap().len(), 512 << 20);
        assert_eq!(phase(&client, "src").await, Some(VmPhase::Running), "running again after the snapshot");
        let (_, got, _) = fleet.nexusctl(&["get", "snapshots"]);
        println!("{got}");
        assert!(got.contains("warm") && got.contains("Ready") && got.contains(&node), "{got}");
        let (_, described, _) = fleet.nexusctl(&["describe", "snapshot", "warm"]);
        assert!(described.contains("memory") && described.contains("bytes"), "{described}");
        let (_, selected, _) =
            fleet.nexusctl(&["get", "snapshots", "--field-selector", "spec.vmName=src", "-o", "name"]);
        assert_eq!(selected.trim(), "snapshot/warm");

        // A snapshot that leaves its VM paused: the VM's desired state says
        // so first, and the VM controller keeps it that way.
        let (ok, out, err) = fleet.nexusctl(&["snapshot", "src", "cold", "--stay-paused", "--wait"]);
        assert!(ok, "{err}\n{out}");
        let paused = vm(&client, "src").await.unwrap();
        assert_eq!(paused.spec.state, nexus_api::PowerState::Paused);
        wait_until(Duration::from_secs(10), "the VM to be Paused", || async {
            phase(&client, "src").await == Some(VmPhase::Paused)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(phase(&client, "src").await, Some(VmPhase::Paused), "still paused: nobody resumed it");
        let (ok, _, err) = fleet.nexusctl(&["resume", "vm", "src"]);
        assert!(ok, "{err}");
        wait_until(Duration::from_secs(10), "the VM to run again", || async {
            phase(&client, "src").await == Some(VmPhase::Running)
        })
        .await;
        let (ok, _, err) = fleet.nexusctl(&["delete", "snapshot", "cold", "--wait"]);
        assert!(ok, "{err}");

        // Three VMs from it, on its node: the first ones adopt the VMMs its
        // agent started ahead.
        let warm: BTreeSet<u32> = nexus_e2e::host::warm_vmms_under(&run).into_iter().map(|(pid, _)| pid).collect();
        assert!(!warm.is_empty(), "the agent keeps VMMs started ahead");
        let restored_at = Instant::now();
        for c in ["c1", "c2", "c3"] {
            let (ok, _, err) = fleet.nexusctl(&["restore", "warm", c]);
            assert!(ok, "{err}");
        }
        let mut ready_ms = Vec::new();
        for c in ["c1", "c2", "c3"] {
            wait_until(Duration::from_secs(30), "a restored VM to run", || async {
                phase(&client, c).await == Some(VmPhase::Running)
            })
            .await;
            ready_ms.push(restored_at.elapsed().as_millis());
        }
        println!("restore → Running of 3 VMs from one 512 MiB snapshot: {ready_ms:?} ms after the first restore");
        let mut ips = BTreeSet::new();
        for c in ["c1", "c2", "c3"] {
            let v = vm(&client, c).await.unwrap();
            assert_eq!(v.spec.node_name.as_deref(), Some(node.as_str()), "{c} runs on the snapshot's node");
            let rt = v.status_or_default().runtime.unwrap();
            assert_eq!(rt.mac.as_deref(), Some(src_mac.as_str()), "{c}'s guest has its source's MAC, and says so");
            ips.insert(rt.ip.clone().unwrap());
            assert!(run.join("vms").join(v.uid()).join("rootfs.ext4").exists(), "{c} has a disk of its own");
        }
        let mut adopted = 0;
        for c in ["c1", "c2", "c3"] {
            let v = vm(&client, c).await.unwrap();
            let pid = v.status_or_default().runtime.unwrap().pid.unwrap();
            if warm.contains(&pid) {
                adopted += 1;
                let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
                assert_eq!(
                    root,
                    run.join("vms").join(v.uid()).join("root"),
                    "{c}'s VMM is jailed in its own directory"
                );
                let log = std::fs::read_to_string(run.join("vms").join(v.uid()).join("fc.log")).unwrap();
                assert!(log.contains("Running Firecracker"), "{c}'s VMM log moved with it: {log}");
            }
        }
        println!("restored VMs that adopted a warm VMM: {adopted} of 3 ({} were warm)", warm.len());
        assert!(adopted >= 1, "a restore adopts a warm VMM");
        wait_until(Duration::from_secs(10), "the warm VMMs to be made again", || async {
            nexus_e2e::host::warm_vmms_under(&run).len() == warm.len()
        })
        .await;
        ips.insert(src.status_or_default().runtime.unwrap().ip.unwrap());
        assert_eq!(ips.len(), 4, "four distinct addresses on the bridge: {ips:?}");
        let ports = bridge_ports(&fleet.nodes[index - 1]);
        println!("bridge ports on {node}: {ports:?}");
        let macs: BTreeSet<&String> = ports.iter().map(|p| &p.1).collect();
        assert_eq!(ports.len(), 4, "the source's TAP and one veth per restored VM");
        assert_eq!(macs.len(), 4, "no MAC twice on the bridge");
        assert!(!macs.contains(&src_mac) || ports.iter().filter(|p| p.1 == src_mac).count() <= 1);

        // Deleting the snapshot removes its files; its VMs run on.
        let (ok, _, err) = fleet.nexusctl(&["delete", "snapshot", "warm", "--wait"]);
        assert!(ok, "{err}");
        assert!(!snap_dir.exists(), "the files are gone");
        for c in ["c1", "c2", "c3"] {
            assert_eq!(phase(&client, c).await, Some(VmPhase::Running));
        }

        // Everything deleted: nothing left on either node.
        for name in ["src", "c1", "c2", "c3"] {
            let (ok, _, err) = fleet.nexusctl(&["delete", "vm", name, "--wait"]);
            assert!(ok, "{err}");
        }
        let snapshots_left: usize = (1..=2)
            .map(|i| std::fs::read_dir(dir.path().join(format!("run-{i}/snapshots"))).map(|d| d.count()).unwrap_or(0))
            .sum();
        let veths: usize = fleet.nodes.iter().map(|n| bridge_ports(n).len()).sum();
        let sockets: usize =
            (1..=2).map(|i| nexus_e2e::host::sockets_under(&dir.path().join(format!("run-{i}"))).len()).sum();
        println!(
            "left: {} TAPs, {sockets} sockets, {} VMMs, {} run dirs, {snapshots_left} snapshots, {veths} bridge ports",
            fleet.taps(),
            fleet.vmms(),
            fleet.run_dirs()
        );
        assert_eq!((fleet.taps(), sockets, fleet.vmms(), fleet.run_dirs(), snapshots_left, veths), (0, 0, 0, 0, 0, 0));
        fleet.stop();
    });
}

/// How one interrupted snapshot ended.
async fn interrupted(what: &str) -> (SnapshotPhase, VmPhase, u128) {
    let dir = tempfile::tempdir().unwrap();
    // Writing the guest's memory takes 1.5 s: time to interrupt it.
    let opts = ClusterOptions { agent_env: &[("FIRECRACKER_SIM_SNAPSHOT_MS", "1500")], ..Default::default() };
    let mut cluster = Cluster::start_opts(dir.path(), "node-a", &opts).await;
    let client = cluster.client();
    let file = dir.path().join("vm.yaml");
    std::fs::write(&file, vm_yaml("busy", 128)).unwrap();
    assert!(cluster.nexusctl(&["apply", "-f", &file.display().to_string()]).0);
    wait_until(Duration::from_secs(30), "the VM to run", || async {
        phase(&client, "busy").await == Some(VmPhase::Running)
    })
    .await;
    let (ok, _, err) = cluster.nexusctl(&["snapshot", "busy", "mid"]);
    assert!(ok, "{err}");
    wait_until(Duration::from_secs(10), "the snapshot to be Creating", || async {
        snap_phase(&client, "mid").await == Some(SnapshotPhase::Creating)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let hit = Instant::now();
    match what {
        "controller" => {
            cluster.controller.kill();
            cluster.controller = cluster.spawn_controller("127.0.0.1:7445", "controller-2.log");
        }
        "agent" => {
            cluster.agent.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            cluster.restart_agent();
        }
        "vmm" => {
            let pid = vm(&client, "busy").await.unwrap().status_or_default().runtime.unwrap().pid.unwrap();
            nexus_e2e::host::sigkill(pid);
        }
        other => panic!("{other}"),
    }
    wait_until(Duration::from_secs(60), "the snapshot to finish", || async {
        matches!(snap_phase(&client, "mid").await, Some(SnapshotPhase::Ready | SnapshotPhase::Failed))
    })
    .await;
    wait_until(Duration::from_secs(30), "the VM to be Running", || async {
        phase(&client, "busy").await == Some(VmPhase::Running)
    })
    .await;
    let took = hit.elapsed().as_millis();
    let snap = client.get::<SnapshotSpec>("default", "mid").await.unwrap().status_or_default();
    let reason = snap.conditions.iter().find(|c| c.type_ == "Ready").map(|c| format!("{}: {}", c.reason, c.message));
    println!(
        "killing the {what} mid-snapshot: snapshot {:?} ({}), VM Running, {took} ms after the kill",
        snap.phase,
        reason.unwrap_or_default()
    );
    let final_vm = phase(&client, "busy").await.unwrap();
    let spec_state = vm(&client, "busy").await.unwrap().spec.state;
    assert_eq!(spec_state, nexus_api::PowerState::Running, "the VM's desired state is untouched");
    assert!(cluster.nexusctl(&["delete", "snapshot", "mid", "--wait"]).0);
    assert!(cluster.nexusctl(&["delete", "vm", "busy", "--wait"]).0);
    let left = std::fs::read_dir(cluster.run_dir.join("snapshots")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "no snapshot files left");
    cluster.stop();
    (snap.phase, final_vm, took)
}

#[test]
fn a_controller_agent_or_vmm_killed_mid_snapshot_leaves_it_ready_or_failed_and_the_vm_running() {
    for what in ["controller", "agent", "vmm"] {
        in_private_netns(move || async move {
            let (snap, vm, _) = interrupted(what).await;
            assert!(matches!(snap, SnapshotPhase::Ready | SnapshotPhase::Failed), "{what}: {snap:?}");
            assert_eq!(vm, VmPhase::Running, "{what}");
        });
    }
}

#[test]
fn a_restore_from_files_removed_by_hand_fails_with_the_reason_and_leaves_nothing() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        let file = dir.path().join("vm.yaml");
        std::fs::write(&file, vm_yaml("orig", 128)).unwrap();
        assert!(cluster.nexusctl(&["apply", "-f", &file.display().to_string()]).0);
        wait_until(Duration::from_secs(30), "the VM to run", || async {
            phase(&client, "orig").await == Some(VmPhase::Running)
        })
        .await;
        let (ok, _, err) = cluster.nexusctl(&["snapshot", "orig", "gone", "--wait"]);
        assert!(ok, "{err}");
        let snap = client.get::<SnapshotSpec>("default", "gone").await.unwrap();
        let files = cluster.run_dir.join("snapshots").join(snap.uid());
        std::fs::remove_dir_all(&files).unwrap();
        let before = (nexus_e2e::host::taps().len(), nexus_e2e::host::run_dirs(&cluster.run_dir).len());
        let (ok, _, err) = cluster.nexusctl(&["restore", "gone", "clone"]);
        assert!(ok, "{err}");
        wait_until(Duration::from_secs(30), "the restored VM to fail", || async {
            phase(&client, "clone").await == Some(VmPhase::Failed)
        })
        .await;
        let failed = vm(&client, "clone").await.unwrap();
        let error = failed.status_or_default().last_error.unwrap();
        println!(
            "restore from deleted files: Failed: {} / hint: {}",
            error.message,
            error.suggestion.clone().unwrap_or_default()
        );
        assert!(error.message.contains("is not on this node"), "{}", error.message);
        let after = (nexus_e2e::host::taps().len(), nexus_e2e::host::run_dirs(&cluster.run_dir).len());
        assert_eq!(after, before, "no TAP and no run directory made for it");
        assert!(!Path::new(&cluster.run_dir.join("vms").join(failed.uid())).exists());
        for (kind, name) in [("vm", "clone"), ("vm", "orig"), ("snapshot", "gone")] {
            assert!(cluster.nexusctl(&["delete", kind, name, "--wait"]).0, "{kind} {name}");
        }
        cluster.stop();
    });
}
