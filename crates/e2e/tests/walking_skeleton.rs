//! The walking skeleton, end to end: apply `examples/vm.yaml`, see it
//! Running through the watch with its TAP on the bridge and its VMM
//! answering, delete it, and find nothing left on the host.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nexus_api::{VmPhase, VmSpec};
use nexus_client::{Event, ListParams};
use nexus_e2e::{Cluster, host, in_private_netns, repo_root};

const VM_NAME: &str = "hello";

/// Applies the example, waits for Running, checks the host, deletes it and
/// checks that nothing is left. Returns the time from apply to Running.
async fn apply_run_delete(cluster: &Cluster) -> Duration {
    let client = cluster.client();
    let list = client.list::<VmSpec>(Some("default"), &ListParams::default()).await.expect("list VMs");
    let params = ListParams { field_selector: Some(format!("metadata.name={VM_NAME}")), ..Default::default() };
    let watch = client
        .watch::<VmSpec>(Some("default"), &params, list.metadata.resource_version.as_deref())
        .await
        .expect("watch VMs");
    let mut watch = std::pin::pin!(watch);

    let example = repo_root().join("examples/vm.yaml");
    let started = Instant::now();
    let (ok, out, err) = cluster.nexusctl(&["apply", "-f", &example.display().to_string()]);
    assert!(ok, "apply failed: {err}");
    assert_eq!(out.trim(), "vm/hello created");

    let running = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = watch.next().await {
            if let Ok(Event::Added(vm) | Event::Modified(vm)) = event
                && vm.status_or_default().phase == VmPhase::Running
            {
                return vm;
            }
        }
        panic!("watch ended before the VM was Running");
    })
    .await
    .unwrap_or_else(|_| panic!("VM not Running within 30s\n{}", cluster.logs()));
    let to_running = started.elapsed();

    let runtime = running.status.clone().and_then(|s| s.runtime).expect("status.runtime");
    let tap = runtime.tap_name.clone().expect("status.runtime.tapName");
    let socket = runtime.socket_path.clone().expect("status.runtime.socketPath");
    let pid = runtime.pid.expect("status.runtime.pid");

    let link = host::links().into_iter().find(|l| l.name == tap).unwrap_or_else(|| panic!("TAP {tap} is missing"));
    assert_eq!(link.master.as_deref(), Some("nxbr0"), "TAP {tap} must be enslaved to the bridge");
    assert!(link.up, "TAP {tap} must be up");
    assert_eq!(link.kind.as_deref(), Some("tun"), "{tap} must be a TUN/TAP device");
    if let Ok(mode) = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{tap}/addr_gen_mode")) {
        assert_eq!(mode.trim(), "1", "a bridge port needs no IPv6 address of the host's");
        let addresses = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        assert!(!addresses.lines().any(|l| l.ends_with(&format!(" {tap}"))), "{tap} has an IPv6 address: {addresses}");
    }
    let (status, body) = host::fc_get_root(Path::new(&socket)).await.expect("VMM socket answers");
    assert_eq!(status, 200, "GET / on the VMM socket: {body}");
    assert!(body.contains("\"state\":\"Running\""), "{body}");
    let uid = running.uid().to_string();
    assert_eq!(host::processes_mentioning(&format!("--id {uid}")).len(), 1, "exactly one VMM for VM {uid}");
    // The node reports its subnet and what the VM takes.
    nexus_e2e::wait_until(Duration::from_secs(5), "the node to report the VM's allocation", || async {
        let node = client.get::<nexus_api::NodeSpec>("", "node-a").await.unwrap().status_or_default();
        node.subnet == "172.30.0.0/24" && node.allocated.vms == 1 && node.allocated.mem_mib == 256
    })
    .await;

    let (ok, out, err) = cluster.nexusctl(&["delete", "vm", VM_NAME, "--wait"]);
    assert!(ok, "delete failed: {err}");
    assert_eq!(out.trim(), "vm \"hello\" deleted");

    assert_nothing_left(&cluster.run_dir);
    assert!(
        !Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || host::processes_mentioning(&format!("--id {uid}")).is_empty()
    );
    to_running
}

fn assert_nothing_left(run_dir: &Path) {
    assert_eq!(host::taps(), vec![], "TAP devices left behind");
    assert_eq!(host::sockets_under(run_dir), Vec::<String>::new(), "sockets left behind");
    assert_eq!(host::vmm_processes_under(run_dir), vec![], "VMM processes left behind");
    assert_eq!(host::run_dirs(run_dir), Vec::<String>::new(), "run directories left behind");
}

#[test]
fn applied_example_vm_runs_and_delete_leaves_nothing_behind() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let took = apply_run_delete(&cluster).await;
        println!("apply -> Running took {} ms", took.as_millis());
        cluster.stop();
        // The warm VMMs the agent kept for restores end with it.
        assert_eq!(host::all_vmm_processes_under(&cluster.run_dir), vec![], "VMMs left after the agent stopped");
        let warm_dirs = std::fs::read_dir(cluster.run_dir.join("warm")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(warm_dirs, 0, "warm VMMs' directories left after the agent stopped");
        // The bridge stays (it is the host's), and only it.
        let kinds: Vec<_> = host::links().into_iter().filter(|l| l.name != "lo").map(|l| l.name).collect();
        assert_eq!(kinds, vec!["nxbr0".to_string()]);
    });
}

#[test]
fn walking_skeleton_twenty_times_in_a_row_leaves_nothing_behind() {
    in_private_netns(|| async {
        let base = tempfile::tempdir().expect("tempdir");
        let before = (
            host::taps().len(),
            host::sockets_under(base.path()).len(),
            host::all_vmm_processes_under(base.path()).len(),
        );
        let mut timings = Vec::new();
        for i in 0..20 {
            let mut cluster = Cluster::start(&base.path().join(format!("run-{i}")), "node-a").await;
            timings.push(apply_run_delete(&cluster).await.as_millis());
            cluster.stop();
        }
        let after = (
            host::taps().len(),
            host::sockets_under(base.path()).len(),
            host::all_vmm_processes_under(base.path()).len(),
        );
        println!("(TAPs, sockets, processes) before: {before:?}, after 20 runs: {after:?}");
        timings.sort_unstable();
        println!(
            "apply -> Running over 20 runs: min {} ms, median {} ms, max {} ms",
            timings[0], timings[10], timings[19]
        );
        assert_eq!(before, (0, 0, 0));
        assert_eq!(after, before, "something was left behind");
    });
}
