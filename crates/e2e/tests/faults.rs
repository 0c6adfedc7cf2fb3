//! Faults a real host has, on real processes: a node's disk full while a
//! VM's disk is copied, a VMM stopped with SIGSTOP, and the apiserver's
//! disk full. Each prints when the fault began and ended, what the status
//! said meanwhile, how long it took to converge, and what was left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use nexus_api::conditions;
use nexus_api::meta::find_condition;
use nexus_api::{Vm, VmPhase, VmSpec};
use nexus_e2e::{ApiServer, Backend, Cluster, EXAMPLE_IMAGES, in_private_netns, wait_until};
use serde_json::{Value, json};

/// Mounts a tmpfs of `mib` MiB at `at` (in the test's own mount namespace).
fn small_tmpfs(at: &Path, mib: u64) {
    std::fs::create_dir_all(at).unwrap();
    let options = format!("size={mib}m,mode=0755");
    nix::mount::mount(Some("tmpfs"), at, Some("tmpfs"), nix::mount::MsFlags::empty(), Some(options.as_str()))
        .expect("a small tmpfs");
}

/// A file of `mib` MiB of data (no holes: a copy takes its full size).
fn dense_file(path: &Path, mib: usize) {
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let mut data = Vec::with_capacity(mib << 20);
    for _ in 0..mib {
        data.extend_from_slice(&block);
    }
    std::fs::write(path, data).unwrap();
}

fn vm_yaml(name: &str, rootfs: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  vcpu: 1\n  memMib: 64\n  kernel: \
         /var/lib/nexus/images/vmlinux\n  rootfs: {rootfs}\n"
    )
}

fn ready(vm: &Vm) -> Option<(String, String, String)> {
    let s = vm.status_or_default();
    find_condition(&s.conditions, conditions::READY)
        .map(|c| (format!("{:?}", c.status), c.reason.clone(), c.message.clone()))
}

/// Files under `dir` whose names end in `suffix`.
fn leftovers(dir: &Path, suffix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn a_full_node_disk_fails_a_vms_copy_with_the_reason_leaves_nothing_and_heals_when_space_returns() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        // The node's run directory on a 48 MiB filesystem; each VM's disk is
        // a 30 MiB copy of an image with no holes.
        small_tmpfs(&dir.path().join("run"), 48);
        let image = Path::new(EXAMPLE_IMAGES).join("dense.ext4");
        dense_file(&image, 30);
        let mut cluster = Cluster::start(dir.path(), "n1").await;
        cluster.apply(&vm_yaml("first", &image.display().to_string()));
        let first = cluster.wait_running("first").await;
        let first_pid = first.status_or_default().runtime.unwrap().pid;

        let began = Instant::now();
        cluster.apply(&vm_yaml("second", &image.display().to_string()));
        wait_until(Duration::from_secs(20), "the second VM to say the disk is full", || async {
            ready(&cluster.vm("second").await).is_some_and(|(_, reason, _)| reason == "NodeDiskFull")
        })
        .await;
        let (status, reason, message) = ready(&cluster.vm("second").await).unwrap();
        println!(
            "disk full after {} ms: second is {:?}, Ready {status} {reason}: {message}",
            began.elapsed().as_millis(),
            cluster.vm("second").await.status_or_default().phase
        );
        assert!(message.contains("disk is full") && message.contains("free space"), "{message}");
        let (ok, events, _) = cluster.nexusctl(&["describe", "vm", "second"]);
        assert!(ok && events.contains("Warning  NodeDiskFull"), "{events}");

        // While it lasts: no partial file, the first VM runs on, the agent
        // serves, and the copy is not retried in a storm.
        let run = dir.path().join("run");
        let attempts = |log: &str| log.matches("disk full").count() + log.matches("disk is full").count();
        let before = attempts(&std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let during = attempts(&std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()) - before;
        let partial = leftovers(&run, ".partial");
        println!(
            "in the next 5 s: {during} failed attempts logged by the agent; partial files left: {}",
            partial.len()
        );
        assert!(partial.is_empty(), "{partial:?}");
        assert!(during <= 10, "backing off, not retrying in a storm: {during} attempts in 5 s");
        let still = cluster.vm("first").await;
        assert_eq!(still.status_or_default().phase, VmPhase::Running);
        assert_eq!(still.status_or_default().runtime.unwrap().pid, first_pid, "the first VM ran on");
        let (status, _) = cluster.agent_call("GET", "/healthz", None).await;
        assert_eq!(status, 200, "the agent serves");

        // Room again: the second VM starts by itself.
        let (ok, out, err) = cluster.nexusctl(&["delete", "vm", "first", "--wait"]);
        assert!(ok, "{out}{err}");
        let freed = Instant::now();
        cluster.wait_running("second").await;
        println!("space freed: second Running {} ms later, with nothing done to it", freed.elapsed().as_millis());
        cluster.stop();
    });
}

#[test]
fn a_stopped_vmm_is_reported_as_not_answering_and_a_delete_still_ends_it() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "n1").await;
        cluster.apply(&vm_yaml("frozen", "/var/lib/nexus/images/rootfs.ext4"));
        cluster.apply(&vm_yaml("neighbour", "/var/lib/nexus/images/rootfs.ext4"));
        let frozen = cluster.wait_running("frozen").await;
        cluster.wait_running("neighbour").await;
        let pid = frozen.status_or_default().runtime.unwrap().pid.unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGSTOP).unwrap();
        let began = Instant::now();
        wait_until(Duration::from_secs(40), "the VM reported as not answering", || async {
            ready(&cluster.vm("frozen").await).is_some_and(|(_, reason, _)| reason == "VmmNotAnswering")
        })
        .await;
        let (status, reason, message) = ready(&cluster.vm("frozen").await).unwrap();
        println!("SIGSTOP on pid {pid}: {} ms later Ready {status} {reason}: {message}", began.elapsed().as_millis());
        assert_eq!(status, "False");
        // The agent is not blocked by it: its neighbour answers.
        let neighbour = cluster.vm("neighbour").await;
        let uid = neighbour.uid().to_string();
        let asked = Instant::now();
        let (code, body) = cluster.agent_call("GET", &format!("/v1/vms/{uid}/proxy/"), None).await;
        println!("the neighbour's VMM answered through the agent in {} ms", asked.elapsed().as_millis());
        assert_eq!(code, 200, "{body}");
        let deleting = Instant::now();
        let (ok, out, err) = cluster.nexusctl(&["delete", "vm", "frozen", "--wait", "--timeout", "60"]);
        assert!(ok, "{out}{err}");
        println!("delete of the stopped VM took {} ms", deleting.elapsed().as_millis());
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the stopped VMM is gone");
        cluster.stop();
    });
}

#[test]
fn a_full_apiserver_disk_refuses_writes_with_the_reason_keeps_reads_and_loses_nothing() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        small_tmpfs(&data, 16);
        let server = ApiServer::start(&Backend::Sqlite(data.clone()), dir.path(), &[]).await;
        let client = server.client();
        // Ballast fills the disk almost to the top.
        let ballast = data.join("ballast");
        dense_file(&ballast, 12);
        let note = "x".repeat(60_000);
        let mut stored = Vec::new();
        let began = Instant::now();
        let refusal = loop {
            let name = format!("vm-{:04}", stored.len());
            let body = json!({"apiVersion": "nexus/v1", "kind": "VM",
                "metadata": {"name": name, "annotations": {"note": note}},
                "spec": {"vcpu": 1, "memMib": 64, "kernel": "/img/vmlinux", "rootfs": "/img/rootfs.ext4"}});
            match client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/vms", Some(&body)).await {
                Ok(_) => stored.push(name),
                Err(e) => break e,
            }
            assert!(stored.len() < 2000, "the disk never filled");
        };
        println!("disk full after {} writes ({} ms): {refusal}", stored.len(), began.elapsed().as_millis());
        assert_eq!(refusal.status(), Some(507), "{refusal}");
        assert!(refusal.to_string().contains("storage is full") && refusal.to_string().contains("free space"));
        // Reads work, and everything acknowledged is there.
        let listed = client.list::<VmSpec>(Some("default"), &Default::default()).await.unwrap();
        let names: Vec<String> = listed.items.iter().map(|v| v.name().to_string()).collect();
        assert_eq!(names, stored, "every acknowledged write, and only those");
        // Room again: writes work by themselves.
        std::fs::remove_file(&ballast).unwrap();
        let healed = Instant::now();
        let after = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "after"},
            "spec": {"vcpu": 1, "memMib": 64, "kernel": "/img/vmlinux", "rootfs": "/img/rootfs.ext4"}});
        client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/vms", Some(&after)).await.unwrap();
        println!("space freed: the next write succeeded {} ms later", healed.elapsed().as_millis());
        let out = std::process::Command::new("sqlite3")
            .arg(data.join("nexus.db"))
            .arg("PRAGMA integrity_check")
            .output()
            .unwrap();
        let check = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("integrity check: {check}; {} objects acknowledged, {} served", stored.len() + 1, names.len() + 1);
        assert_eq!(check, "ok");
        drop(server);
    });
}
