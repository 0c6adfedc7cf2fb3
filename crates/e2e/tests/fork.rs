//! Fork on the simulated VMM: one request makes a Snapshot of a running VM
//! and N VMs restored from it, each with an address of its own and the
//! source left running; refusals (the count, the source's state, quota,
//! rights) come back before anything is stored.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nexus_api::{SnapshotSpec, VmPhase, VmSpec};
use nexus_client::ListParams;
use nexus_e2e::{Cluster, ClusterOptions, in_private_netns, wait_until};
use serde_json::{Value, json};

fn vm_yaml(name: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\n  labels:\n    app: web\nspec:\n  vcpu: 1\n  \
         memMib: 128\n  kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n  \
         network:\n    ip: auto\n"
    )
}

#[test]
fn a_fork_makes_n_running_copies_in_one_request_and_refuses_before_making_anything() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let opts = ClusterOptions { agent_args: &["--max-vms", "200"], ..Default::default() };
        let mut cluster = Cluster::start_opts(dir.path(), "n1", &opts).await;
        let client = cluster.client();
        cluster.apply(&vm_yaml("src"));
        let src = cluster.wait_running("src").await;
        let src_pid = src.status_or_default().runtime.unwrap().pid;

        // Refusals, each before anything is stored.
        let fork = |copies: u32| json!({ "copies": copies });
        let path = "/v1/projects/default/vms/src/fork";
        let too_many = client.raw::<Value>(reqwest::Method::POST, path, Some(&fork(101))).await.unwrap_err();
        println!("101 copies: {too_many}");
        assert_eq!(too_many.status(), Some(422));
        assert!(too_many.to_string().contains("copies"));
        cluster.apply(&vm_yaml("off").replace("spec:\n", "spec:\n  state: Stopped\n"));
        let off = "/v1/projects/default/vms/off/fork";
        let stopped = client.raw::<Value>(reqwest::Method::POST, off, Some(&fork(2))).await.unwrap_err();
        println!("a stopped source: {stopped}");
        assert_eq!(stopped.status(), Some(409));
        let quota = json!({"apiVersion": "nexus/v1", "kind": "ResourceQuota", "metadata": {"name": "few"},
            "spec": {"vms": 10}});
        client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/resourcequotas", Some(&quota)).await.unwrap();
        let over = client.raw::<Value>(reqwest::Method::POST, path, Some(&fork(20))).await.unwrap_err();
        println!("20 copies under a quota of 10 VMs: {over}");
        assert_eq!(over.status(), Some(403));
        let viewer = nexus_e2e::issue_token(&client, "user:viewer").await;
        let bind = json!({"apiVersion": "nexus/v1", "kind": "RoleBinding", "metadata": {"name": "viewer"},
            "spec": {"role": "viewer", "subjects": ["user:viewer"]}});
        client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/rolebindings", Some(&bind)).await.unwrap();
        let as_viewer = nexus_client::Client::with_trust(&cluster.server, Some(viewer), client.trust().clone());
        let denied = as_viewer.raw::<Value>(reqwest::Method::POST, path, Some(&fork(2))).await.unwrap_err();
        println!("a viewer: {denied}");
        assert_eq!(denied.status(), Some(403));
        let snapshots = client.list::<SnapshotSpec>(Some("default"), &ListParams::default()).await.unwrap();
        let vms = client.list::<VmSpec>(Some("default"), &ListParams::default()).await.unwrap();
        assert_eq!((snapshots.items.len(), vms.items.len()), (0, 2), "nothing was made by a refusal");
        let (ok, out, err) = cluster.nexusctl(&["delete", "resourcequota", "few"]);
        assert!(ok, "{out}{err}");

        // 100 copies, one request.
        let run = dir.path().join("run");
        let before = nexus_e2e::host::vmm_memory_kib(&run);
        let began = Instant::now();
        let (ok, out, err) = cluster.nexusctl(&["fork", "src", "--copies", "100", "--wait", "--timeout", "60"]);
        assert!(ok, "{out}{err}");
        let took = began.elapsed();
        let selector = out.lines().find_map(|l| l.strip_prefix("select the copies with -l ")).unwrap().to_string();
        let after = nexus_e2e::host::vmm_memory_kib(&run);
        let copies = client
            .list::<VmSpec>(
                Some("default"),
                &ListParams { label_selector: Some(selector.clone()), ..Default::default() },
            )
            .await
            .unwrap()
            .items;
        assert_eq!(copies.len(), 100);
        let snap_name = copies[0].spec.restore_from.as_ref().unwrap().snapshot.clone();
        let snap = client.get::<SnapshotSpec>("default", &snap_name).await.unwrap().status_or_default();
        println!(
            "fork --copies 100 --wait: all Running {} ms after the command started; the source was paused {} ms; \
             VMM RSS {} MiB before, {} MiB after; host MemAvailable {} MiB before, {} MiB after",
            took.as_millis(),
            snap.paused_millis.unwrap_or_default(),
            before.0 >> 10,
            after.0 >> 10,
            before.1 >> 10,
            after.1 >> 10
        );
        // Each its own address; all Running; the source runs on as it was.
        let addresses: BTreeSet<String> = copies
            .iter()
            .map(|v| {
                let s = v.status_or_default();
                assert_eq!(s.phase, VmPhase::Running, "{}", v.name());
                s.runtime.and_then(|r| r.ip).unwrap_or_default()
            })
            .collect();
        assert_eq!(addresses.len(), 100, "each copy has an address of its own");
        assert!(copies.iter().all(|v| v.metadata.labels.get("app").map(String::as_str) == Some("web")));
        let src = client.get::<VmSpec>("default", "src").await.unwrap().status_or_default();
        assert_eq!(src.phase, VmPhase::Running);
        assert_eq!(src.runtime.unwrap().pid, src_pid, "the source runs on with its own VMM");
        let (ok, out, _) = cluster.nexusctl(&["get", "vms", "-l", &selector, "-o", "name"]);
        assert!(ok && out.lines().count() == 100, "{out}");

        // Deleting by the selector removes the copies.
        let (ok, out, err) = cluster.nexusctl(&["delete", "vms", "-l", &selector, "--wait"]);
        assert!(ok, "{out}{err}");
        wait_until(Duration::from_secs(30), "only the source's VMM left", || async {
            nexus_e2e::host::vmm_processes_under(&run).len() == 1
        })
        .await;
        cluster.stop();
    });
}

#[test]
fn a_pool_keeps_warm_copies_restored_from_a_snapshot_and_scales_them() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "n1").await;
        let client = cluster.client();
        cluster.apply(&vm_yaml("warm"));
        cluster.wait_running("warm").await;
        let (ok, out, err) = cluster.nexusctl(&["snapshot", "warm", "warm-snap", "--wait"]);
        assert!(ok, "{out}{err}");
        cluster.apply(
            "apiVersion: nexus/v1\nkind: VMPool\nmetadata:\n  name: clones\nspec:\n  replicas: 3\n  selector:\n    \
             app: clone\n  template:\n    metadata:\n      labels:\n        app: clone\n    spec:\n      restoreFrom:\n        \
             snapshot: warm-snap\n",
        );
        let running = |n: usize| {
            let client = client.clone();
            async move {
                let params = ListParams { label_selector: Some("app=clone".into()), ..Default::default() };
                client.list::<VmSpec>(Some("default"), &params).await.is_ok_and(|l| {
                    l.items.len() == n && l.items.iter().all(|v| v.status_or_default().phase == VmPhase::Running)
                })
            }
        };
        let began = Instant::now();
        wait_until(Duration::from_secs(30), "3 warm copies Running", || running(3)).await;
        println!(
            "a pool of 3 copies restored from warm-snap: all Running {} ms after the apply",
            began.elapsed().as_millis()
        );
        let scaled = Instant::now();
        let (ok, out, err) = cluster.nexusctl(&["scale", "vmpool", "clones", "--replicas", "8"]);
        assert!(ok, "{out}{err}");
        wait_until(Duration::from_secs(30), "8 warm copies Running", || running(8)).await;
        println!("scaled to 8: all Running {} ms after the scale", scaled.elapsed().as_millis());
        cluster.stop();
    });
}
