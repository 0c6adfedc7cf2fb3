//! What a VM runs with and what happens when its VMM ends: templates and
//! images resolved into the configuration the agent receives, and the
//! restart policy applied when the guest shuts down or the VMM dies.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use nexus_api::meta::find_condition;
use nexus_api::{Vm, VmPhase, VmSpec};
use nexus_client::Client;
use nexus_e2e::{Cluster, event_message, in_private_netns, repo_root};

fn example(name: &str) -> String {
    repo_root().join("examples").join(name).display().to_string()
}

async fn vm(client: &Client, name: &str) -> Vm {
    client.get::<VmSpec>("default", name).await.unwrap()
}

/// Waits until VM `name` satisfies `check`; returns it.
async fn wait_vm(client: &Client, name: &str, what: &str, check: impl Fn(&Vm) -> bool) -> Vm {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.get::<VmSpec>("default", name).await {
            Ok(v) if check(&v) => return v,
            Ok(v) if std::time::Instant::now() > deadline => {
                panic!(
                    "timed out after 30s waiting for {name}: {what}; it is\n{}",
                    serde_json::to_string_pretty(&v).unwrap()
                )
            }
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("timed out after 30s waiting for {name}: {what}: {e}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The reason of condition `type_` of `vm`, if it has one.
fn reason(vm: &Vm, type_: &str) -> Option<String> {
    vm.status.as_ref().and_then(|s| find_condition(&s.conditions, type_)).map(|c| c.reason.clone())
}

fn phase(vm: &Vm) -> VmPhase {
    vm.status_or_default().phase
}

fn pid(vm: &Vm) -> Option<u32> {
    vm.status.as_ref().and_then(|s| s.runtime.as_ref()).and_then(|r| r.pid)
}

fn apply(cluster: &Cluster, file: &str) {
    let (ok, _, err) = cluster.nexusctl(&["apply", "-f", file]);
    assert!(ok, "{err}");
}

#[test]
fn a_vm_from_a_template_waits_for_its_template_and_images_then_runs_with_them_resolved() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();

        // GitOps order is arbitrary: the VM first, then its template, then its images.
        apply(&cluster, &example("vm-from-template.yaml"));
        let waiting = wait_vm(&client, "ci-job-1", "TemplateNotFound", |v| {
            reason(v, "Resolved").as_deref() == Some("TemplateNotFound")
        })
        .await;
        assert_eq!(phase(&waiting), VmPhase::Pending);
        assert!(
            event_message(&client, "ci-job-1", "TemplateNotFound").await.contains("template ci-runner does not exist")
        );
        apply(&cluster, &example("template.yaml"));
        wait_vm(&client, "ci-job-1", "ImageNotFound", |v| reason(v, "Resolved").as_deref() == Some("ImageNotFound"))
            .await;
        let message = event_message(&client, "ci-job-1", "ImageNotFound").await;
        assert!(message.contains("spec.kernel names image vmlinux-6-1"), "{message}");
        assert!(nexus_e2e::host::vmm_processes_under(&cluster.run_dir).is_empty(), "nothing started meanwhile");

        let applied = Instant::now();
        apply(&cluster, &example("image.yaml"));
        let running = wait_vm(&client, "ci-job-1", "Running", |v| phase(v) == VmPhase::Running).await;
        println!("ci-job-1 Running {} ms after its images were applied", applied.elapsed().as_millis());
        let status = running.status.clone().unwrap();
        let config = status.config.clone().unwrap();
        assert_eq!((config.vcpu, config.mem_mib), (2, 512), "vcpu from the template, memMib from the VM");
        assert_eq!(config.kernel_path, "/var/lib/nexus/images/vmlinux");
        assert_eq!(config.rootfs_path, "/var/lib/nexus/images/rootfs.ext4");
        assert_eq!(config.boot_args, "console=ttyS0 reboot=k panic=1 pci=off");
        assert_eq!(config.template.as_deref(), Some("ci-runner@1"));
        assert_eq!(reason(&running, "Resolved").as_deref(), Some("Resolved"));

        // The agent received exactly the resolved configuration.
        let sent: serde_json::Value = serde_json::from_slice(
            &std::fs::read(cluster.run_dir.join("vms").join(running.uid()).join("vm.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(sent["vcpu"], 2);
        assert_eq!(sent["memMib"], 512);
        assert_eq!(sent["kernelPath"], "/var/lib/nexus/images/vmlinux");
        assert_eq!(sent["restartPolicy"], "Never");
        let (_, table, _) = cluster.nexusctl(&["get", "vms"]);
        let row = table.lines().find(|l| l.starts_with("ci-job-1")).unwrap();
        assert!(row.split_whitespace().collect::<Vec<_>>()[4..6] == ["2", "512Mi"], "{table}");

        // A kernel that names a rootfs image is refused with the fix.
        let wrong = dir.path().join("wrong.yaml");
        std::fs::write(
            &wrong,
            "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: wrong\nspec:\n  template: ci-runner\n  kernel: rootfs-debian\n",
        )
        .unwrap();
        apply(&cluster, &wrong.display().to_string());
        let w =
            wait_vm(&client, "wrong", "WrongImageType", |v| reason(v, "Resolved").as_deref() == Some("WrongImageType"))
                .await;
        assert_eq!(phase(&w), VmPhase::Pending);
        let message = event_message(&client, "wrong", "WrongImageType").await;
        assert!(message.contains("of type Rootfs; it needs a Kernel image"), "{message}");

        // Deleting the template does not strand the running VM: it keeps its
        // configuration and can still be stopped and deleted.
        let (ok, _, err) = cluster.nexusctl(&["delete", "template", "ci-runner"]);
        assert!(ok, "{err}");
        let (ok, _, err) = cluster.nexusctl(&["stop", "vm", "ci-job-1"]);
        assert!(ok, "{err}");
        let stopped = wait_vm(&client, "ci-job-1", "Stopped", |v| phase(v) == VmPhase::Stopped).await;
        assert_eq!(reason(&stopped, "Resolved").as_deref(), Some("TemplateNotFound"));
        assert_eq!(stopped.status.unwrap().config.unwrap().mem_mib, 512, "the last configuration is kept");

        for name in ["ci-job-1", "wrong"] {
            let (ok, _, err) = cluster.nexusctl(&["delete", "vm", name, "--wait"]);
            assert!(ok, "{err}");
        }
        assert_eq!(nexus_e2e::host::vmm_processes_under(&cluster.run_dir), vec![]);
        assert_eq!(nexus_e2e::host::run_dirs(&cluster.run_dir), Vec::<String>::new());
        assert!(nexus_e2e::host::taps().is_empty());
        cluster.stop();
    });
}

fn policy_vm(name: &str, policy: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  vcpu: 1\n  memMib: 128\n  \
         kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n  restartPolicy: {policy}\n"
    )
}

async fn ctrl_alt_del(vm: &Vm) {
    let socket = vm.status.as_ref().unwrap().runtime.as_ref().unwrap().socket_path.clone().unwrap();
    assert_eq!(nexus_e2e::host::fc_ctrl_alt_del(Path::new(&socket)).await.unwrap(), 204);
}

fn sigkill(vm: &Vm) {
    let pid = pid(vm).unwrap();
    nexus_e2e::host::sigkill(pid);
}

#[test]
fn the_restart_policy_decides_what_follows_a_guest_shutdown_or_a_dead_vmm() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        let names = [("always", "Always"), ("onfailure", "OnFailure"), ("never", "Never")];
        let file = dir.path().join("policies.yaml");
        let docs: Vec<String> = names.iter().map(|(n, p)| policy_vm(n, p)).collect();
        std::fs::write(&file, docs.join("---\n")).unwrap();
        apply(&cluster, &file.display().to_string());
        let mut first = Vec::new();
        for (name, _) in names {
            first.push(wait_vm(&client, name, "Running", |v| phase(v) == VmPhase::Running).await);
        }

        // The guest shuts down (Ctrl+Alt+Del; the VMM exits with status 0).
        for v in &first {
            ctrl_alt_del(v).await;
        }
        let pressed = Instant::now();
        let old = pid(&first[0]);
        let always = wait_vm(&client, "always", "a new VMM", |v| {
            phase(v) == VmPhase::Running && pid(v).is_some() && pid(v) != old
        })
        .await;
        let runtime = always.status.unwrap().runtime.unwrap();
        assert_eq!(runtime.restarts, 1);
        assert_eq!(runtime.exit.unwrap().code, Some(0));
        println!("Always: running again {} ms after the guest shut down", pressed.elapsed().as_millis());
        assert!(event_message(&client, "always", "Restarted").await.contains("exited with status 0"));
        for name in ["onfailure", "never"] {
            let done = wait_vm(&client, name, "Succeeded", |v| phase(v) == VmPhase::Succeeded).await;
            println!("{name}: Succeeded {} ms after the guest shut down", pressed.elapsed().as_millis());
            assert_eq!(pid(&done), None);
            assert_eq!(reason(&done, "Ready").as_deref(), Some("Exited"));
            assert!(event_message(&client, name, "Completed").await.contains("the guest shut down"));
        }
        // Kept down: no VMM, no TAP for the two that completed.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(nexus_e2e::host::vmm_processes_under(&cluster.run_dir).len(), 1, "only Always's VMM runs");
        assert_eq!(nexus_e2e::host::taps().len(), 1);

        // Stop and start brings a completed VM back.
        for name in ["onfailure", "never"] {
            for (verb, want) in [("stop", VmPhase::Stopped), ("start", VmPhase::Running)] {
                let (ok, _, err) = cluster.nexusctl(&[verb, "vm", name]);
                assert!(ok, "{err}");
                wait_vm(&client, name, verb, |v| phase(v) == want).await;
            }
        }

        // The VMM dies (SIGKILL): Always and OnFailure start it again, Never fails.
        let mut before = Vec::new();
        for (name, _) in names {
            before.push(vm(&client, name).await);
        }
        for v in &before {
            sigkill(v);
        }
        let killed = Instant::now();
        for (i, name) in ["always", "onfailure"].into_iter().enumerate() {
            let old = pid(&before[i]);
            let again = wait_vm(&client, name, "a new VMM", |v| {
                phase(v) == VmPhase::Running && pid(v).is_some() && pid(v) != old
            })
            .await;
            println!("{name}: running again {} ms after SIGKILL", killed.elapsed().as_millis());
            assert_eq!(again.status.unwrap().runtime.unwrap().exit.unwrap().signal, Some(9));
        }
        let failed = wait_vm(&client, "never", "Failed", |v| phase(v) == VmPhase::Failed).await;
        println!("never: Failed {} ms after SIGKILL", killed.elapsed().as_millis());
        let error = failed.status.clone().unwrap().last_error.unwrap();
        assert_eq!(error.message, "the VMM killed by signal 9; restartPolicy Never keeps it down");
        assert!(error.suggestion.unwrap().contains("Stopped, then Running"));
        assert!(event_message(&client, "never", "Failed").await.contains("killed by signal 9"));
        let (ok, out, _) = cluster.nexusctl(&["describe", "vm", "never"]);
        assert!(ok && out.contains("killed by signal 9") && out.contains("Completed"), "{out}");
        // A finished VM is not retried: its status stays as it is.
        let rv = failed.metadata.resource_version.clone();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(vm(&client, "never").await.metadata.resource_version, rv, "no hot loop");

        for (name, _) in names {
            let (ok, _, err) = cluster.nexusctl(&["delete", "vm", name, "--wait"]);
            assert!(ok, "{err}");
        }
        assert_eq!(nexus_e2e::host::vmm_processes_under(&cluster.run_dir), vec![]);
        assert_eq!(nexus_e2e::host::run_dirs(&cluster.run_dir), Vec::<String>::new());
        assert!(nexus_e2e::host::taps().is_empty());
        assert!(nexus_e2e::host::sockets_under(&cluster.run_dir).is_empty());
        cluster.stop();
    });
}
