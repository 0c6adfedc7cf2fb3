//! An image whose checksum differs fails its VMs; a VM's history by two
//! users is on record, with a viewer's refusal.

use super::*;

fn sha256_of(path: &std::path::Path) -> String {
    let out = nexus_e2e::run_ok(std::process::Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn an_image_whose_checksum_differs_fails_its_vms_and_the_right_one_runs() {
    nexus_e2e::in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = nexus_e2e::Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        // A small disk of its own under the node's image root.
        let disk = std::path::PathBuf::from(format!("/var/lib/nexus/images/checked-{}.ext4", std::process::id()));
        std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
        let right = sha256_of(&disk);
        let image = |name: &str, kind: &str, path: &str, sum: Option<&str>| {
            let mut spec = json!({"type": kind, "path": path});
            if let Some(s) = sum {
                spec["sha256"] = json!(s);
            }
            format!(
                "{}\n---\n",
                json!({"apiVersion": "nexus/v1", "kind": "Image", "metadata": {"name": name}, "spec": spec})
            )
        };
        let vm = |name: &str, rootfs: &str| {
            format!(
                "{}\n---\n",
                json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": name},
                "spec": {"vcpu": 1, "memMib": 64, "kernel": "kernel", "rootfs": rootfs}})
            )
        };
        let file = dir.path().join("images.yaml");
        std::fs::write(
            &file,
            [
                image("kernel", "Kernel", "/var/lib/nexus/images/vmlinux", None),
                image("good-root", "Rootfs", &disk.display().to_string(), Some(&right)),
                image("bad-root", "Rootfs", &disk.display().to_string(), Some(&"0".repeat(64))),
                vm("good", "good-root"),
                vm("bad", "bad-root"),
            ]
            .concat(),
        )
        .unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        nexus_e2e::wait_until(Duration::from_secs(30), "good Running, bad Failed", || async {
            vm_status(&client, "good").await.phase == nexus_api::VmPhase::Running
                && vm_status(&client, "bad").await.phase == nexus_api::VmPhase::Failed
        })
        .await;
        let bad = vm_status(&client, "bad").await;
        let ready = nexus_api::meta::find_condition(&bad.conditions, "Ready").cloned().unwrap();
        println!("bad: {:?} {}: {}", bad.phase, ready.reason, bad.last_error.as_ref().unwrap().message);
        assert_eq!(ready.reason, "ImageInvalid");
        assert!(bad.last_error.unwrap().message.contains(&format!("its sha256 is {right}")));
        // The controller marks the Image right after it fails the VM.
        nexus_e2e::wait_until(Duration::from_secs(10), "the Image marked Invalid", || async {
            client
                .get::<nexus_api::ImageSpec>("default", "bad-root")
                .await
                .is_ok_and(|i| i.status_or_default().phase == nexus_api::image::ImagePhase::Invalid)
        })
        .await;
        let img = client.get::<nexus_api::ImageSpec>("default", "bad-root").await.unwrap().status_or_default();
        println!("image bad-root: {:?} {}", img.phase, img.message.clone().unwrap_or_default());
        let (ok, described) = nexus_e2e::describe_showing(|a| cluster.nexusctl(a), "vm", "bad", "ImageInvalid").await;
        assert!(ok && described.contains("ImageInvalid"), "{described}");

        // The Image is fixed: its VM runs.
        let fixed = [image("bad-root", "Rootfs", &disk.display().to_string(), Some(&right))].concat();
        std::fs::write(&file, fixed).unwrap();
        let (ok, out, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        assert!(out.contains("image/bad-root configured"), "{out}");
        nexus_e2e::wait_until(Duration::from_secs(30), "bad Running once its Image is right", || async {
            vm_status(&client, "bad").await.phase == nexus_api::VmPhase::Running
        })
        .await;
        println!("after the Image's sha256 was corrected, VM bad is Running");

        // A path outside the node's image roots is refused by the node itself.
        let thief = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "thief"},
                           "spec": {"vcpu": 1, "memMib": 64, "kernel": "/etc/shadow", "rootfs": "/dev/sda"}});
        std::fs::write(&file, thief.to_string()).unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "an admin in dev mode may name it: {err}");
        nexus_e2e::wait_until(Duration::from_secs(30), "thief Failed", || async {
            vm_status(&client, "thief").await.phase == nexus_api::VmPhase::Failed
        })
        .await;
        let thief = vm_status(&client, "thief").await.last_error.unwrap();
        println!("thief: {}", thief.message);
        assert!(thief.message.contains("images must be regular files under /var/lib/nexus/images"), "{thief:?}");
        for name in ["good", "bad", "thief"] {
            let (ok, _, err) = cluster.nexusctl(&["delete", "vm", name, "--wait"]);
            assert!(ok, "{err}");
        }
        let _ = std::fs::remove_file(&disk);
        cluster.stop();
    });
}

#[test]
fn a_vms_history_by_two_users_is_on_record_with_the_viewers_refusal() {
    nexus_e2e::in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = nexus_e2e::Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        let bindings = dir.path().join("bindings.yaml");
        std::fs::write(
            &bindings,
            "apiVersion: nexus/v1\nkind: RoleBinding\nmetadata: {name: ops}\nspec: {role: operator, subjects: [user:alice]}\n---\n\
             apiVersion: nexus/v1\nkind: RoleBinding\nmetadata: {name: watchers}\nspec: {role: viewer, subjects: [user:bob]}\n",
        )
        .unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &bindings.display().to_string()]);
        assert!(ok, "{err}");
        let alice = nexus_e2e::issue_token(&client, "user:alice").await;
        let bob = nexus_e2e::issue_token(&client, "user:bob").await;
        let ctl = |token: &str, args: &[&str]| nexus_e2e::nexusctl(&cluster.server, &cluster.ca, token, args);
        // Alice's VM names Images (raw paths need an admin in dev mode).
        let vm = dir.path().join("vm.yaml");
        std::fs::write(
            &vm,
            "apiVersion: nexus/v1\nkind: Image\nmetadata: {name: kernel}\nspec: {type: Kernel, path: /var/lib/nexus/images/vmlinux}\n---\n\
             apiVersion: nexus/v1\nkind: Image\nmetadata: {name: root}\nspec: {type: Rootfs, path: /var/lib/nexus/images/rootfs.ext4}\n",
        )
        .unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &vm.display().to_string()]);
        assert!(ok, "{err}");
        std::fs::write(&vm, "apiVersion: nexus/v1\nkind: VM\nmetadata: {name: job}\nspec: {vcpu: 1, memMib: 64, kernel: kernel, rootfs: root}\n").unwrap();
        let (ok, out, err) = ctl(&alice, &["apply", "-f", &vm.display().to_string()]);
        assert!(ok, "{err}");
        assert_eq!(out, "vm/job created\n");
        let (ok, _, err) =
            ctl(&alice, &["wait", "vm", "job", "--for=jsonpath={.status.phase}=Running", "--timeout", "30"]);
        assert!(ok, "{err}");
        for (verb, phase) in [("pause", "Paused"), ("resume", "Running"), ("stop", "Stopped")] {
            let (ok, _, err) = ctl(&alice, &[verb, "vm", "job"]);
            assert!(ok, "{verb}: {err}");
            let (ok, _, err) = ctl(
                &alice,
                &["wait", "vm", "job", &format!("--for=jsonpath={{.status.phase}}={phase}"), "--timeout", "30"],
            );
            assert!(ok, "{verb}: {err}");
        }
        let (ok, _, err) = ctl(&bob, &["delete", "vm", "job"]);
        assert!(!ok, "a viewer may not delete");
        assert!(err.contains("Forbidden (403): user:bob may not delete VM job in project default"), "{err}");
        let (ok, _, err) = ctl(&alice, &["delete", "vm", "job", "--wait"]);
        assert!(ok, "{err}");
        let (ok, history, err) = cluster.nexusctl(&["audit", "vm", "job"]);
        assert!(ok, "{err}");
        println!("nexusctl audit vm job:\n{history}");
        let people: Vec<&str> = history.lines().filter(|l| l.contains("user:")).collect();
        let expect = [
            ("user:alice", "create", "allowed 201"),
            ("user:alice", "update", "spec.state: Running -> Paused"),
            ("user:alice", "update", "spec.state: Paused -> Running"),
            ("user:alice", "update", "spec.state: Running -> Stopped"),
            ("user:bob", "delete", "denied 403"),
            ("user:alice", "delete", "allowed 200"),
        ];
        assert_eq!(people.len(), expect.len(), "{people:#?}");
        for (line, (actor, verb, what)) in people.iter().zip(expect) {
            assert!(
                line.contains(actor) && line.contains(verb) && line.contains(what),
                "{line} lacks {actor} {verb} {what}"
            );
        }
        assert!(history.contains("system:controller"), "the controller's steps are there too");
        let (ok, csv, _) = cluster.nexusctl(&["audit", "vm", "job", "-o", "csv"]);
        assert!(ok && csv.starts_with("at,actor,verb,kind,project,name,result,status"), "{csv}");
        cluster.stop();
    });
}
