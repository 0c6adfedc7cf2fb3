//! Guest metadata end to end, on real processes: a VM from a Template with
//! labels, user data, SSH keys and metadata; its VMM's metadata service
//! (read back with `GET /mmds` through the agent's proxy) holds the
//! document; a label edited on the running VM reaches it without a
//! restart; a VM restored from its snapshot gets its own identity; bad
//! input is refused; the audit log keeps user data's size, not its words.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::{Duration, Instant};

use nexus_api::VmSpec;
use nexus_e2e::{Cluster, in_private_netns, wait_until};
use serde_json::{Value, json};

const KEY_TEAM: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBq2mZ3teamkeyteamkeyteamkeyteamkeyteamkey team@ci";
const KEY_VM: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx9vmkeyvmkeyvmkeyvmkeyvmkeyvmkeyvmkey00 me@laptop";
const USER_DATA: &str = "#!/bin/sh\necho hello from the user data\n";

/// The VMM's metadata store, read through the node agent's proxy.
async fn mmds(cluster: &Cluster, uid: &str) -> Value {
    let (status, body) = cluster.agent_call("GET", &format!("/v1/vms/{uid}/proxy/mmds"), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn runner(role: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: runner-1\n  labels:\n    role: {role}\nspec:\n  template: \
         runner\n  network:\n    ip: auto\n  userData: |\n    #!/bin/sh\n    echo hello from the user data\n  \
         sshAuthorizedKeys:\n    - {KEY_VM}\n  metadata:\n    job: {{id: 7, repo: nexus}}\n"
    )
}

#[test]
fn a_guest_reads_who_it_is_and_its_user_data_and_a_restored_vm_reads_its_own() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "n1").await;
        let client = cluster.client();

        // Refused with the field named, nothing stored.
        let bad = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "bad"},
            "spec": {"vcpu": 1, "memMib": 64, "kernel": "/var/lib/nexus/images/vmlinux",
                     "rootfs": "/var/lib/nexus/images/rootfs.ext4", "userData": "x".repeat(16 * 1024 + 1),
                     "sshAuthorizedKeys": ["ssh-ed25519 not/base64!"]}});
        let err = client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/vms", Some(&bad)).await.unwrap_err();
        println!("too much user data and a bad key: {err}");
        assert_eq!(err.status(), Some(422));
        for field in ["spec.userData", "spec.sshAuthorizedKeys[0]"] {
            assert!(err.to_string().contains(field), "{field} in {err}");
        }
        assert!(client.get::<VmSpec>("default", "bad").await.unwrap_err().is_not_found(), "nothing stored");

        cluster.apply(&format!(
            "apiVersion: nexus/v1\nkind: Template\nmetadata:\n  name: runner\nspec:\n  vcpu: 1\n  memMib: 128\n  \
                 kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n  \
                 sshAuthorizedKeys:\n    - {KEY_TEAM}\n  metadata:\n    team: ci\n"
        ));
        cluster.apply(&runner("runner"));
        let running = cluster.wait_running("runner-1").await;
        let uid = running.uid().to_string();
        let runtime = running.status_or_default().runtime.unwrap();
        let (pid, ip) = (runtime.pid.unwrap(), runtime.ip.clone().unwrap());

        // The document, as the guest reads it.
        let doc = mmds(&cluster, &uid).await;
        println!("the VMM's metadata store: {doc}");
        let meta = &doc["latest"]["meta-data"];
        assert_eq!(meta["instance-id"], uid.as_str());
        assert_eq!(meta["local-hostname"], "runner-1");
        assert_eq!(meta["local-ipv4"], ip.as_str());
        assert_eq!(meta["public-keys"]["0"]["openssh-key"], KEY_TEAM, "the template's key first");
        assert_eq!(meta["public-keys"]["1"]["openssh-key"], KEY_VM);
        assert_eq!(doc["latest"]["user-data"], USER_DATA);
        let nexus = &doc["nexus"];
        assert_eq!(
            (nexus["name"].as_str(), nexus["project"].as_str(), nexus["node"].as_str()),
            (Some("runner-1"), Some("default"), Some("n1"))
        );
        assert_eq!(nexus["labels"]["role"], "runner");
        assert_eq!(nexus["metadata"], json!({"team": "ci", "job": {"id": 7, "repo": "nexus"}}));
        assert_eq!(running.status_or_default().runtime.unwrap().mmds.as_ref(), Some(&doc), "the status shows it");

        // A label edited on the running VM reaches the store, same VMM.
        let edited = Instant::now();
        cluster.apply(&runner("builder"));
        wait_until(Duration::from_secs(10), "the new label in the metadata store", || async {
            mmds(&cluster, &uid).await["nexus"]["labels"]["role"] == "builder"
        })
        .await;
        let took = edited.elapsed();
        let now = cluster.vm("runner-1").await.status_or_default().runtime.unwrap();
        println!(
            "a label edited on the running VM was in its metadata store {} ms after the apply; pid {pid} -> {}",
            took.as_millis(),
            now.pid.unwrap()
        );
        assert_eq!(now.pid, Some(pid), "no restart");

        // describe shows what the guest sees.
        let (ok, describe, _) = cluster.nexusctl(&["describe", "vm", "runner-1"]);
        assert!(ok && describe.contains("Guest metadata:") && describe.contains("/latest/meta-data/local-hostname"));
        let section: String =
            describe.lines().skip_while(|l| !l.starts_with("Guest metadata:")).take(8).collect::<Vec<_>>().join("\n");
        println!("{section}");

        // User data's words stay out of the audit log.
        let secret = "#!/bin/sh\necho the-password-is-swordfish\n";
        let mut spec = cluster.vm("runner-1").await;
        spec.spec.user_data = Some(secret.into());
        client.replace(&spec).await.unwrap();
        let (ok, audit, err) = cluster.nexusctl(&["audit", "vm", "runner-1"]);
        assert!(ok, "{audit}{err}");
        let line = audit.lines().find(|l| l.contains("spec.userData")).unwrap_or_default().to_string();
        println!("the audit log of the user data change: {}", line.trim());
        assert!(line.contains(&format!("<{} bytes>", secret.len())), "{audit}");
        assert!(!audit.contains("swordfish"), "{audit}");
        wait_until(Duration::from_secs(10), "the new user data in the metadata store", || async {
            mmds(&cluster, &uid).await["latest"]["user-data"] == secret
        })
        .await;

        // A VM restored from its snapshot: its own name and uid, the
        // source's user data (it sets none of its own).
        let (ok, out, err) = cluster.nexusctl(&["snapshot", "runner-1", "runner-snap", "--wait"]);
        assert!(ok, "{out}{err}");
        let (ok, out, err) = cluster.nexusctl(&["restore", "runner-snap", "clone-1", "--wait"]);
        assert!(ok, "{out}{err}");
        let clone = cluster.wait_running("clone-1").await;
        let cloned = mmds(&cluster, clone.uid()).await;
        println!(
            "the restored VM's metadata: instance-id {}, name {}",
            cloned["latest"]["meta-data"]["instance-id"], cloned["nexus"]["name"]
        );
        assert_eq!(cloned["latest"]["meta-data"]["instance-id"], clone.uid());
        assert_ne!(clone.uid(), uid);
        assert_eq!(cloned["nexus"]["name"], "clone-1");
        assert_eq!(cloned["latest"]["meta-data"]["local-hostname"], "clone-1");
        assert_eq!(cloned["latest"]["user-data"], secret, "the source's user data, as it was at the snapshot");

        for name in ["clone-1", "runner-1"] {
            let (ok, out, err) = cluster.nexusctl(&["delete", "vm", name, "--wait"]);
            assert!(ok, "{out}{err}");
        }
        cluster.stop();
    });
}
