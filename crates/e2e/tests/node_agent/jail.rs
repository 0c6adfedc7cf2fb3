//! Each VMM jailed as its own user, without capabilities, unable to open
//! the host's files; a VMM started unjailed by an earlier agent is adopted.

use super::*;

/// The confinement of a jailed VMM, as `/proc` shows it: (uid, gid, root,
/// the capability sets, no_new_privs).
fn confinement(pid: u32) -> (u32, u32, PathBuf, Vec<String>, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default()
    };
    let ids = |name: &str| -> Vec<u32> { field(name).split_whitespace().map(|v| v.parse().unwrap()).collect() };
    let (uids, gids) = (ids("Uid:"), ids("Gid:"));
    assert!(
        uids.iter().all(|u| *u == uids[0]) && gids.iter().all(|g| *g == gids[0]),
        "real, effective, saved, fs ids agree"
    );
    let caps =
        ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"].iter().map(|c| format!("{c} {}", field(c))).collect();
    let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    (uids[0], gids[0], root, caps, field("NoNewPrivs:"))
}

#[test]
fn each_vmm_runs_jailed_as_its_own_user_without_capabilities_and_cannot_open_host_files() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        // A host file any host user could read: only the jail keeps it from the VMM.
        let secret = dir.path().join("host-secret");
        std::fs::write(&secret, "host only").unwrap();
        let secret_s = secret.display().to_string();
        let agent = Agent::start(dir.path(), &[("FIRECRACKER_SIM_TRY_OPEN", &secret_s)]).await;
        let a = agent.ensure(&request(UID)).await;
        assert_eq!(a.state, ObservedState::Running);
        let pid = a.runtime.pid.unwrap();
        let (uid, gid, root, caps, nnp) = confinement(pid);
        println!("VMM {pid}: uid {uid} gid {gid} root {} {caps:?} NoNewPrivs {nnp}", root.display());
        assert!(uid >= 1_000_000 && gid == uid, "its own unprivileged user: {uid}:{gid}");
        assert_eq!(root, agent.run_dir().join("vms").join(UID).join("root"), "chrooted into its VM's jail");
        for c in &caps {
            assert!(c.ends_with(" 0000000000000000"), "no capabilities: {c}");
        }
        assert_eq!(nnp, "1");
        let console = std::fs::read_to_string(a.runtime.console_path.as_ref().unwrap()).unwrap();
        assert!(
            console.contains(&format!("firecracker-sim: cannot open {secret_s}: No such file or directory")),
            "the host file is out of its sight: {console}"
        );
        // Its jail holds only its own files, and the jail belongs to root.
        let jail = agent.run_dir().join("vms").join(UID).join("root");
        let list = |dir: &std::path::Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let names = list(&jail);
        println!("jail: {names:?}");
        assert_eq!(names, ["fc.log", "metrics.json", "rootfs.ext4", "run"], "only the VM's own files");
        // What the VMM sees at / is the node's shared skeleton, with the
        // jail at /vm.
        let seen = list(&std::path::PathBuf::from(format!("/proc/{pid}/root")));
        println!("the VMM's /: {seen:?}");
        for want in ["dev", "fc.log", "firecracker", "kernel", "metrics.json", "rootfs.ext4", "run", "vm"] {
            assert!(seen.iter().any(|n| n == want), "{want} in the VMM's root: {seen:?}");
        }
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&jail).unwrap().uid(), 0, "the VMM cannot rename what is in its jail");
        assert_eq!(std::fs::metadata(jail.join("rootfs.ext4")).unwrap().uid(), uid, "its disk is its own");

        // A kernel the VMM's user could not read is refused up front, saying so.
        use std::os::unix::fs::PermissionsExt;
        let private =
            std::path::PathBuf::from(format!("/var/lib/nexus/images/jail-test-{}-vmlinux", std::process::id()));
        std::fs::copy("/var/lib/nexus/images/vmlinux", &private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut unreadable = request("00000000-0000-4000-8000-0000000000a7");
        unreadable.mac = "06:00:ac:10:00:0d".into();
        unreadable.kernel_path = private.display().to_string();
        let (s, body) = agent
            .call("PUT", &format!("/v1/vms/{}", unreadable.uid), Some(&serde_json::to_value(&unreadable).unwrap()))
            .await;
        std::fs::remove_file(&private).unwrap();
        assert_eq!(s, 422, "{body}");
        assert!(body.contains("ImageUnreadable") && body.contains("chmod a+r"), "{body}");
        agent.remove(&unreadable.uid).await;

        // A second VM gets another user.
        let b_uid = "00000000-0000-4000-8000-0000000000b7";
        let mut b = request(b_uid);
        b.mac = "06:00:ac:10:00:0b".into();
        let rb = agent.ensure(&b).await;
        let (uid_b, ..) = confinement(rb.runtime.pid.unwrap());
        assert_ne!(uid_b, uid, "one user per VMM");

        // The whole lifecycle works jailed: pause, resume, stop, start,
        // snapshot and restore.
        for state in [PowerState::Paused, PowerState::Running, PowerState::Stopped, PowerState::Running] {
            let mut r = request(UID);
            r.state = state;
            let got = agent.ensure(&r).await;
            let want = match state {
                PowerState::Paused => ObservedState::Paused,
                PowerState::Stopped => ObservedState::Stopped,
                _ => ObservedState::Running,
            };
            assert_eq!(got.state, want, "{state:?}");
        }
        let again = agent.ensure(&request(UID)).await;
        assert_eq!(confinement(again.runtime.pid.unwrap()).0, uid, "a VM keeps its user across restarts");
        let snap_uid = "00000000-0000-4000-8000-0000000000c7";
        let (s, body) =
            agent.call("PUT", &format!("/v1/snapshots/{snap_uid}"), Some(&serde_json::json!({"vmUid": UID}))).await;
        assert_eq!(s, 200, "{body}");
        let mut c = request("00000000-0000-4000-8000-0000000000d7");
        c.mac = "06:00:ac:10:00:0c".into();
        c.restore = Some(nexus_api::agent::RestoreFrom { snapshot_uid: snap_uid.into(), origin: None });
        let rc = agent.ensure(&c).await;
        assert_eq!(rc.state, ObservedState::Running);
        let (uid_c, _, root_c, caps_c, _) = confinement(rc.runtime.pid.unwrap());
        assert!(uid_c != uid && uid_c != uid_b && uid_c >= 1_000_000);
        assert!(root_c.ends_with("00000000-0000-4000-8000-0000000000d7/root"));
        assert!(caps_c.iter().all(|c| c.ends_with(" 0000000000000000")));
        for u in [UID, b_uid, "00000000-0000-4000-8000-0000000000d7"] {
            agent.remove(u).await;
        }
        assert!(host::vmm_processes_under(&agent.run_dir()).is_empty());
    });
}

#[test]
fn a_vmm_an_earlier_agent_started_unjailed_is_adopted_then_restarts_jailed() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        // The VM's directory and configuration, with no VMM yet.
        let mut stopped = request(UID);
        stopped.state = PowerState::Stopped;
        agent.ensure(&stopped).await;
        // Its VMM, started as agents did before jails: unjailed, its VM
        // directory bind-mounted at <run>/vm, configured and booted.
        let run = agent.run_dir().canonicalize().unwrap();
        let vm_dir = run.join("vms").join(UID);
        std::fs::create_dir_all(run.join("vm")).unwrap();
        std::fs::copy("/var/lib/nexus/images/rootfs.ext4", vm_dir.join("rootfs.ext4")).unwrap();
        let script = format!(
            "mount --bind {} {} && exec {} --api-sock {}/vm/fc.sock --id {UID}",
            vm_dir.display(),
            run.join("vm").display(),
            bin("firecracker-sim").display(),
            run.display()
        );
        let old = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = old.id();
        let socket = vm_dir.join("fc.sock");
        wait_until(Duration::from_secs(5), "the unjailed VMM's socket", || async {
            host::fc_get_root(&socket).await.is_ok()
        })
        .await;
        for (path, body) in [
            ("/boot-source", r#"{"kernel_image_path":"/var/lib/nexus/images/vmlinux"}"#.to_string()),
            ("/machine-config", r#"{"vcpu_count":1,"mem_size_mib":128}"#.to_string()),
            (
                "/drives/rootfs",
                format!(
                    r#"{{"drive_id":"rootfs","path_on_host":"{}/vm/rootfs.ext4","is_root_device":true,"is_read_only":false}}"#,
                    run.display()
                ),
            ),
            ("/actions", r#"{"action_type":"InstanceStart"}"#.to_string()),
        ] {
            let (s, answer) = host::fc_request(&socket, "PUT", path, Some(&body)).await.unwrap();
            assert_eq!(s, 204, "{path}: {answer}");
        }
        std::fs::write(vm_dir.join("pid"), pid.to_string()).unwrap();
        std::fs::write(vm_dir.join("started"), format!("{}\n5\n", chrono::Utc::now().to_rfc3339())).unwrap();

        // The upgraded agent adopts it: same process, Running, in the inventory.
        let adopted = agent.ensure(&request(UID)).await;
        assert_eq!((adopted.runtime.pid, adopted.state), (Some(pid), ObservedState::Running), "adopted, not restarted");
        assert!(agent.inventory().await.vmms.iter().any(|v| v.pid == pid && v.uid == UID));
        let (s, body) = agent
            .call("PUT", "/v1/snapshots/00000000-0000-4000-8000-0000000000e8", Some(&serde_json::json!({"vmUid": UID})))
            .await;
        assert_eq!(s, 422, "a snapshot of an unjailed VMM is refused with a way out: {body}");
        assert!(body.contains("stop and start the VM"), "{body}");

        // Stopped, it goes; started again, it runs jailed.
        agent.ensure(&stopped).await;
        let mut old = old;
        assert!(old.try_wait().unwrap().is_some(), "the unjailed VMM was stopped");
        let again = agent.ensure(&request(UID)).await;
        let new_pid = again.runtime.pid.unwrap();
        assert_ne!(new_pid, pid);
        assert_eq!(std::fs::read_link(format!("/proc/{new_pid}/root")).unwrap(), vm_dir.join("root"));
        assert!(!vm_dir.join("fc.sock").exists());
    });
}
