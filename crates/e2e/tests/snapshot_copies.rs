//! Restores on a node that did not take the snapshot, on three nodes of
//! two VMs each: the snapshot's node is full, so a clone runs on another
//! after its agent copied the files from the origin (with its own node
//! token) and checked them against the sha256 the origin recorded; a copy
//! damaged on disk is found before use and copied again; a file that
//! arrives different from what the origin recorded is refused, and copied
//! again once it is right; deleting the Snapshot removes every copy, and the
//! collector removes a copy no Snapshot claims.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nexus_api::snapshot::SnapshotPhase;
use nexus_api::{SnapshotSpec, VmPhase, VmSpec};
use nexus_client::Client;
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::{in_private_netns, wait_until};

fn vm_yaml(name: &str, node: Option<&str>) -> String {
    let pin = node.map(|n| format!("  nodeName: {n}\n")).unwrap_or_default();
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n{pin}  vcpu: 1\n  memMib: 64\n  kernel: \
         /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n"
    )
}

fn clone_yaml(name: &str) -> String {
    format!("apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  restoreFrom:\n    snapshot: snap\n")
}

fn apply(fleet: &MultiNode, name: &str, yaml: &str) {
    let file = fleet.dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let (ok, _, err) = fleet.nexusctl(&["apply", "-f", &file.display().to_string()]);
    assert!(ok, "{err}");
}

async fn running_on(client: &Client, name: &str) -> Option<String> {
    let vm = client.get::<VmSpec>("default", name).await.ok()?;
    (vm.status_or_default().phase == VmPhase::Running).then(|| vm.spec.node_name.clone().unwrap_or_default())
}

async fn wait_running(client: &Client, name: &str) -> (String, Duration) {
    let began = Instant::now();
    wait_until(Duration::from_secs(60), &format!("{name} to run"), || async {
        running_on(client, name).await.is_some()
    })
    .await;
    (running_on(client, name).await.unwrap(), began.elapsed())
}

fn snapshot_dir(fleet: &MultiNode, node: usize, uid: &str) -> PathBuf {
    fleet.dir.join(format!("run-{node}")).join("snapshots").join(uid)
}

/// Flips one byte of `path` in place, at `at`; returns what was there.
fn flip(path: &Path, at: u64) -> u8 {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
    byte[0]
}

fn agent_log(fleet: &MultiNode, node: usize) -> String {
    std::fs::read_to_string(fleet.dir.join(format!("agent-{node}.log"))).unwrap_or_default()
}

#[test]
fn a_clone_runs_on_another_node_from_a_checked_copy_and_every_copy_goes_with_the_snapshot() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = MultiNode::start(dir.path(), 3, 2).await;
        let client = fleet.client();
        // node-1 holds the source and a filler: it is full.
        apply(&fleet, "src", &vm_yaml("src", Some("node-1")));
        apply(&fleet, "filler", &vm_yaml("filler", Some("node-1")));
        wait_running(&client, "src").await;
        wait_running(&client, "filler").await;
        apply(&fleet, "snap", "apiVersion: nexus/v1\nkind: Snapshot\nmetadata:\n  name: snap\nspec:\n  vmName: src\n");
        wait_until(Duration::from_secs(30), "the snapshot to be Ready", || async {
            client
                .get::<SnapshotSpec>("default", "snap")
                .await
                .is_ok_and(|s| s.status_or_default().phase == SnapshotPhase::Ready)
        })
        .await;
        let snap = client.get::<SnapshotSpec>("default", "snap").await.unwrap();
        let uid = snap.uid().to_string();
        let origin = snapshot_dir(&fleet, 1, &uid);
        wait_until(Duration::from_secs(10), "the origin to record the files' sha256", || async {
            origin.join("sha256.json").exists()
        })
        .await;

        // 1. The snapshot's node is full: the clone runs elsewhere, on a copy.
        apply(&fleet, "c1", &clone_yaml("c1"));
        let (node, took) = wait_running(&client, "c1").await;
        assert_ne!(node, "node-1", "node-1 is full");
        let first = node.trim_start_matches("node-").parse::<usize>().unwrap();
        let copy = snapshot_dir(&fleet, first, &uid);
        assert!(copy.join("copy.json").exists() && copy.join("done.json").exists(), "a checked copy on {node}");
        let size = |f: &str| std::fs::metadata(copy.join(f)).unwrap();
        let bytes: u64 = ["state", "mem", "rootfs.ext4"].iter().map(|f| size(f).len()).sum();
        let on_disk: u64 = ["state", "mem", "rootfs.ext4"].iter().map(|f| size(f).blocks() * 512).sum();
        let copied = agent_log(&fleet, first);
        assert!(copied.contains("snapshot copied and checked"), "{copied}");
        wait_until(Duration::from_secs(10), "the Snapshot to list the copy", || async {
            client
                .get::<SnapshotSpec>("default", "snap")
                .await
                .is_ok_and(|s| s.status_or_default().copies == [node.clone()])
        })
        .await;
        println!(
            "c1 ran on {node} {} ms after it was applied, on a copy of {bytes} bytes ({on_disk} on disk) from node-1",
            took.as_millis()
        );

        // 2. The copy is damaged on disk: found before the next use, copied again.
        let was = flip(&copy.join("mem"), 4096);
        apply(&fleet, "c2", &clone_yaml("c2"));
        let (node2, took) = wait_running(&client, "c2").await;
        assert_eq!(node2, node, "the node holding a copy is preferred");
        let log = agent_log(&fleet, first);
        assert!(log.contains("changed since it was checked; discarding it"), "{log}");
        assert_eq!(log.matches("snapshot copied and checked").count(), 2, "copied again");
        let mut byte = [0u8];
        std::fs::File::open(copy.join("mem")).unwrap().read_exact_at(&mut byte, 4096).unwrap();
        assert_eq!(byte[0], was, "the fresh copy has the origin's byte");
        println!(
            "c2 ran on {node2} {} ms after it was applied; the damaged copy was discarded and copied again",
            took.as_millis()
        );

        // 3. A file that arrives different from what the origin recorded is
        // refused (the origin's file is damaged after it was hashed, which
        // the receiver cannot tell from a byte flipped on the way).
        let original = flip(&origin.join("mem"), 8192);
        apply(&fleet, "c3", &clone_yaml("c3"));
        let third = wait_until_refused(&client, "c3").await;
        let third = third.trim_start_matches("node-").parse::<usize>().unwrap();
        assert!(third != 1 && third != first, "the third node: the other two are full");
        assert!(!snapshot_dir(&fleet, third, &uid).exists(), "a refused copy is not kept");
        let fixed = Instant::now();
        flip(&origin.join("mem"), 8192);
        let mut byte = [0u8];
        std::fs::File::open(origin.join("mem")).unwrap().read_exact_at(&mut byte, 8192).unwrap();
        assert_eq!(byte[0], original);
        wait_running(&client, "c3").await;
        println!(
            "c3: the copy was refused, then made {} ms after the origin's file was right again",
            fixed.elapsed().as_millis()
        );
        wait_until(Duration::from_secs(10), "the Snapshot to list both copies", || async {
            client.get::<SnapshotSpec>("default", "snap").await.is_ok_and(|s| s.status_or_default().copies.len() == 2)
        })
        .await;

        // 4. Deleting the Snapshot removes every copy; the clones run on.
        let (ok, _, err) = fleet.nexusctl(&["delete", "snapshot", "snap", "--wait"]);
        assert!(ok, "{err}");
        for n in 1..=3 {
            assert!(!snapshot_dir(&fleet, n, &uid).exists(), "node-{n} still holds the snapshot");
        }
        for name in ["c1", "c2", "c3"] {
            assert!(running_on(&client, name).await.is_some(), "{name} runs on");
        }
        println!("deleting the Snapshot removed it from node-1 and both copies");

        // 5. A copy no Snapshot claims (left by a crash, say) is collected.
        let stray = snapshot_dir(&fleet, 3, "00000000-0000-4000-8000-0000000c0b1e");
        std::fs::create_dir_all(&stray).unwrap();
        std::fs::write(stray.join("copy.json"), "{}").unwrap();
        let left = Instant::now();
        wait_until(Duration::from_secs(30), "the collector to remove an unclaimed copy", || async { !stray.exists() })
            .await;
        println!("an unclaimed copy on node-3 was collected {} ms after it appeared", left.elapsed().as_millis());
        let (ok, _, err) = fleet.nexusctl(&["delete", "vm", "--all", "--wait"]);
        assert!(ok, "{err}");
        fleet.stop();
    });
}

/// Waits until `name` is placed and its node refused the copy; the node.
async fn wait_until_refused(client: &Client, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(vm) = client.get::<VmSpec>("default", name).await {
            let status = vm.status_or_default();
            let text = serde_json::to_string(&status).unwrap();
            if text.contains("recorded") && text.contains("sha256") {
                let ready = nexus_api::meta::find_condition(&status.conditions, "Ready");
                println!("{name} waits: {}", ready.map(|c| format!("{}: {}", c.reason, c.message)).unwrap_or(text));
                return vm.spec.node_name.clone().unwrap_or_default();
            }
        }
        assert!(Instant::now() < deadline, "{name}'s copy was not refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
