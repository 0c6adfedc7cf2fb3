//! Full disks: a node's run directory while a VM's disk is copied, and
//! the apiserver's SQLite directory.

use std::path::Path;
use std::time::{Duration, Instant};

use nexus_api::meta::find_condition;
use nexus_api::snapshot::SnapshotPhase;
use nexus_api::{SnapshotSpec, VmPhase, VmSpec};
use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend, Cluster, ClusterOptions, EXAMPLE_IMAGES, in_private_netns, wait_until};
use serde_json::{Value, json};

use super::{dense_file, leftovers, ready, small_tmpfs, vm_yaml};

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
        let (ok, events) =
            nexus_e2e::describe_showing(|a| cluster.nexusctl(a), "vm", "second", "Warning  NodeDiskFull").await;
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
fn a_snapshot_on_a_full_node_disk_fails_with_the_reason_leaves_nothing_and_succeeds_when_space_returns() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        // 48 MiB for the run directory; the guest has 64 MiB of memory,
        // which a full snapshot writes out in full (as Firecracker does).
        let run = dir.path().join("run");
        small_tmpfs(&run, 48);
        let opts = ClusterOptions { agent_env: &[("FIRECRACKER_SIM_DENSE_MEMORY", "1")], ..Default::default() };
        let mut cluster = Cluster::start_opts(dir.path(), "n1", &opts).await;
        cluster.apply(&vm_yaml("warm", "/var/lib/nexus/images/rootfs.ext4"));
        let pid = cluster.wait_running("warm").await.status_or_default().runtime.unwrap().pid;
        let (ok, out, err) = cluster.nexusctl(&["snapshot", "warm", "warm-snap"]);
        assert!(ok, "{out}{err}");
        let began = Instant::now();
        let client = cluster.client();
        wait_until(Duration::from_secs(20), "the snapshot to say the disk is full", || async {
            client
                .get::<SnapshotSpec>("default", "warm-snap")
                .await
                .is_ok_and(|s| s.status_or_default().last_error.is_some_and(|e| e.message.contains("disk is full")))
        })
        .await;
        let snap = client.get::<SnapshotSpec>("default", "warm-snap").await.unwrap().status_or_default();
        let error = snap.last_error.clone().unwrap();
        println!(
            "snapshot on a full disk: {} ms later {:?}, last error: {} (suggestion: {})",
            began.elapsed().as_millis(),
            snap.phase,
            error.message,
            error.suggestion.unwrap_or_default()
        );
        let (_, events) =
            nexus_e2e::describe_showing(|a| cluster.nexusctl(a), "snapshot", "warm-snap", "Warning  NodeDiskFull")
                .await;
        assert!(events.contains("Warning  NodeDiskFull"), "{events}");
        // Between attempts nothing is left of them.
        wait_until(Duration::from_secs(10), "no partial snapshot files between attempts", || async {
            leftovers(&run, "").iter().all(|p| !p.contains("snapshot-") && !p.contains("/snapshots/"))
        })
        .await;
        let warm = cluster.vm("warm").await.status_or_default();
        assert_eq!(warm.phase, VmPhase::Running, "the VM runs on");
        assert_eq!(warm.runtime.unwrap().pid, pid, "with the same VMM");
        let (code, _) = cluster.agent_call("GET", "/healthz", None).await;
        assert_eq!(code, 200, "the agent serves");

        // Room again: the next attempt succeeds by itself.
        let options = "size=256m";
        nix::mount::mount(None::<&str>, &run, None::<&str>, nix::mount::MsFlags::MS_REMOUNT, Some(options)).unwrap();
        let freed = Instant::now();
        wait_until(Duration::from_secs(60), "the snapshot Ready", || async {
            client
                .get::<SnapshotSpec>("default", "warm-snap")
                .await
                .is_ok_and(|s| s.status_or_default().phase == SnapshotPhase::Ready)
        })
        .await;
        println!("space freed: the snapshot was Ready {} ms later", freed.elapsed().as_millis());
        cluster.stop();
    });
}

/// The node's `DiskPressure` condition: (status, message).
async fn disk_pressure(client: &nexus_client::Client, node: &str) -> Option<(String, String)> {
    let node = client.get::<nexus_api::NodeSpec>("", node).await.ok()?;
    find_condition(&node.status_or_default().conditions, "DiskPressure")
        .map(|c| (format!("{:?}", c.status), c.message.clone()))
}

/// Fills the filesystem of `path` to the last byte with the file `path`.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![1u8; 1 << 16];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn a_log_growing_on_a_full_node_disk_leaves_the_vm_running_keeps_new_vms_away_and_resumes() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        small_tmpfs(&run, 48);
        let mut cluster = Cluster::start(dir.path(), "n1").await;
        let client = cluster.client();
        cluster.apply(&vm_yaml("chatty", "/var/lib/nexus/images/rootfs.ext4"));
        let chatty = cluster.wait_running("chatty").await;
        let pid = chatty.status_or_default().runtime.unwrap().pid;
        let console = run.join("vms").join(chatty.uid()).join("console.log");
        let size = || std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
        assert_eq!(disk_pressure(&client, "n1").await.map(|(s, _)| s).as_deref(), Some("False"));

        // The disk fills while the guest's console keeps writing.
        fill(&run.join("ballast"));
        let began = Instant::now();
        wait_until(Duration::from_secs(10), "DiskPressure on the node", || async {
            disk_pressure(&client, "n1").await.is_some_and(|(s, _)| s == "True")
        })
        .await;
        let (_, message) = disk_pressure(&client, "n1").await.unwrap();
        println!("disk full: node DiskPressure True {} ms later: {message}", began.elapsed().as_millis());
        let stuck = size();
        cluster.apply(&vm_yaml("newcomer", "/var/lib/nexus/images/rootfs.ext4"));
        wait_until(Duration::from_secs(10), "the newcomer kept away for disk pressure", || async {
            let s = cluster.vm("newcomer").await.status_or_default();
            find_condition(&s.conditions, "Scheduled").is_some_and(|c| c.message.contains("disk pressure"))
        })
        .await;
        let newcomer = cluster.vm("newcomer").await.status_or_default();
        let scheduled = find_condition(&newcomer.conditions, "Scheduled").unwrap().message.clone();
        println!("a new VM meanwhile: {:?}, Scheduled False: {scheduled}", newcomer.phase);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let still = cluster.vm("chatty").await.status_or_default();
        println!(
            "3 s later: console.log {} bytes (was {stuck}; what does not fit is dropped); chatty {:?}, same VMM: {}",
            size(),
            still.phase,
            still.runtime.as_ref().unwrap().pid == pid
        );
        assert_eq!(still.phase, VmPhase::Running);
        assert_eq!(still.runtime.unwrap().pid, pid);
        let (code, _) = cluster.agent_call("GET", "/healthz", None).await;
        assert_eq!(code, 200, "the agent serves");

        // Room again: the log grows, the pressure ends, the newcomer runs.
        std::fs::remove_file(run.join("ballast")).unwrap();
        let freed = Instant::now();
        cluster.wait_running("newcomer").await;
        let placed = freed.elapsed();
        wait_until(Duration::from_secs(10), "the console growing again", || async { size() > stuck }).await;
        assert_eq!(disk_pressure(&client, "n1").await.map(|(s, _)| s).as_deref(), Some("False"));
        println!(
            "space freed: newcomer Running {} ms later; chatty's console growing again after {} ms",
            placed.as_millis(),
            freed.elapsed().as_millis()
        );
        cluster.stop();
    });
}

/// Fills `dir`'s filesystem with a ballast file but for `leave_mib` MiB.
fn ballast_leaving(dir: &Path, leave_mib: u64) -> std::path::PathBuf {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    let free_mib = (st.blocks_available() as u64 * st.fragment_size() as u64) >> 20;
    let ballast = dir.join("ballast");
    dense_file(&ballast, free_mib.saturating_sub(leave_mib) as usize);
    ballast
}

/// 60 kB that no compression shrinks much (PostgreSQL compresses large
/// values), different for each `seed`.
fn incompressible(seed: u64) -> String {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..60_000)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            char::from(b'!' + ((x >> 33) % 90) as u8)
        })
        .collect()
}

/// Writes VMs into a store whose disk `ballast` nearly fills until one is
/// refused; checks the refusal, that reads serve every acknowledged write
/// and only those, and that writes work again once the ballast is gone.
/// Returns how many objects were acknowledged.
async fn fill_refuse_and_heal(server: &ApiServer, ballast: &Path, backend: &str) -> usize {
    let client = server.client();
    let mut stored = Vec::new();
    let began = Instant::now();
    let refusal = loop {
        let name = format!("vm-{:04}", stored.len());
        let body = json!({"apiVersion": "nexus/v1", "kind": "VM",
            "metadata": {"name": name, "annotations": {"note": incompressible(stored.len() as u64)}},
            "spec": {"vcpu": 1, "memMib": 64, "kernel": "/img/vmlinux", "rootfs": "/img/rootfs.ext4"}});
        match client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/vms", Some(&body)).await {
            Ok(_) => stored.push(name),
            Err(e) => break e,
        }
        assert!(stored.len() < 2000, "the disk never filled");
    };
    println!("{backend}: disk full after {} writes ({} ms): {refusal}", stored.len(), began.elapsed().as_millis());
    assert_eq!(refusal.status(), Some(507), "{refusal}");
    assert!(refusal.to_string().contains("storage is full") && refusal.to_string().contains("free space"));
    // Reads work, and everything acknowledged is there.
    let listed = client.list::<VmSpec>(Some("default"), &Default::default()).await.unwrap();
    let names: Vec<String> = listed.items.iter().map(|v| v.name().to_string()).collect();
    assert_eq!(names, stored, "every acknowledged write, and only those");
    // Room again: writes work by themselves.
    std::fs::remove_file(ballast).unwrap();
    let healed = Instant::now();
    let after = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "after"},
        "spec": {"vcpu": 1, "memMib": 64, "kernel": "/img/vmlinux", "rootfs": "/img/rootfs.ext4"}});
    client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/vms", Some(&after)).await.unwrap();
    println!("{backend}: space freed: the next write succeeded {} ms later", healed.elapsed().as_millis());
    let served = client.list::<VmSpec>(Some("default"), &Default::default()).await.unwrap().items.len();
    assert_eq!(served, stored.len() + 1);
    served
}

#[test]
fn a_full_apiserver_disk_refuses_writes_with_the_reason_keeps_reads_and_loses_nothing() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        small_tmpfs(&data, 16);
        let server = ApiServer::start(&Backend::Sqlite(data.clone()), dir.path(), &[]).await;
        let ballast = ballast_leaving(&data, 3);
        let served = fill_refuse_and_heal(&server, &ballast, "sqlite").await;
        let out = std::process::Command::new("sqlite3")
            .arg(data.join("nexus.db"))
            .arg("PRAGMA integrity_check")
            .output()
            .unwrap();
        let check = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("sqlite: integrity check: {check}; {served} objects acknowledged and served");
        assert_eq!(check, "ok");
        drop(server);
    });
}

#[test]
fn a_full_postgres_tablespace_refuses_writes_with_the_reason_keeps_reads_and_loses_nothing() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let pg = TestPostgres::start();
        let space = dir.path().join("tablespace");
        small_tmpfs(&space, 24);
        let Some(url) = pg.database_in(&space) else {
            println!("postgres: DATABASE_URL names a server that cannot see this test's filesystem; not run");
            return;
        };
        let server = ApiServer::start(&Backend::Postgres(url.clone()), dir.path(), &[]).await;
        let ballast = ballast_leaving(&space, 3);
        let served = fill_refuse_and_heal(&server, &ballast, "postgres").await;
        // amcheck: every heap and B-tree index of the database verified.
        pg.query(&url, "CREATE EXTENSION IF NOT EXISTS amcheck");
        let heap = pg.query(
            &url,
            "SELECT count(*) FROM pg_class c, verify_heapam(c.oid) WHERE c.relkind = 'r' AND c.relpersistence = 'p'",
        );
        let indexes = pg.query(
            &url,
            "SELECT count(bt_index_check(oid, true)) FROM (SELECT c.oid FROM pg_index i JOIN pg_class c \
             ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' OFFSET 0) btrees",
        );
        println!(
            "postgres: amcheck: {} corrupt heap tuples, {} B-tree indexes verified; {served} objects acknowledged and \
             served",
            heap.trim(),
            indexes.trim()
        );
        assert_eq!(heap.trim(), "0");
        drop(server);
    });
}
