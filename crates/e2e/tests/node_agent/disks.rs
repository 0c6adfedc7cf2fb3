//! What a VM gets on the host: an address on the kernel command line, a
//! systemd scope, a snapshot restored into a new VM, O(1) disk clones.

use super::*;

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
        let (status, _, _) = agent.remove(UID).await;
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
        b.restore = Some(nexus_api::agent::RestoreFrom { snapshot_uid: snap_uid.into(), origin: None });
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
        c.restore = Some(nexus_api::agent::RestoreFrom {
            snapshot_uid: "00000000-0000-4000-8000-00000000dead".into(),
            origin: None,
        });
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
