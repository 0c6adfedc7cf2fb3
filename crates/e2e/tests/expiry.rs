//! VMs that expire: one with `spec.lifetime` is deleted when it runs out,
//! counted from its start; one that ends on its own is deleted
//! `spec.ttlSecondsAfterFinished` after it finished. Each with an `Expired`
//! Event.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::{Duration, Instant};

use chrono::Utc;
use nexus_e2e::{Cluster, event_message, host, in_private_netns, wait_until};

fn vm(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  vcpu: 1\n  memMib: 128\n  kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n  state: Running\n{extra}"
    )
}

/// Waits until VM `name` is gone; returns when that was seen.
async fn gone(client: &nexus_client::Client, name: &str, within: Duration) -> chrono::DateTime<Utc> {
    let deadline = Instant::now() + within;
    loop {
        match client.get::<nexus_api::VmSpec>("default", name).await {
            Err(e) if e.is_not_found() => return Utc::now(),
            _ if Instant::now() > deadline => panic!("VM {name} still there after {within:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[test]
fn a_vm_is_deleted_when_its_lifetime_runs_out_and_a_finished_one_after_its_ttl() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path(), "n1").await;
        let client = cluster.client();
        let ctl = |args: &[&str]| {
            let (ok, out, err) = cluster.nexusctl(args);
            assert!(ok, "nexusctl {args:?}: {out}{err}\n{}", cluster.logs());
            out
        };
        let file = dir.path().join("vms.yaml");

        // spec.lifetime: 5s.
        std::fs::write(&file, vm("short", "  lifetime: 5s\n")).unwrap();
        ctl(&["apply", "-f", &file.display().to_string()]);
        ctl(&["wait", "vm", "short", "--for=jsonpath={.status.phase}=Running", "--timeout", "20"]);
        let status = client.get::<nexus_api::VmSpec>("default", "short").await.unwrap().status.unwrap();
        let started = status.runtime.unwrap().started_at.unwrap();
        let expires = status.expires_at.unwrap();
        assert_eq!(expires, started + chrono::Duration::seconds(5), "the deadline is the start plus the lifetime");
        let at = gone(&client, "short", Duration::from_secs(15)).await;
        let after = (at - started).num_milliseconds() as f64 / 1000.0;
        println!("VM with lifetime 5s: gone {after:.2} s after it started");
        assert!((5.0..=6.0).contains(&after), "gone 5-6 s after its start, not {after:.2} s");
        let message = event_message(&client, "short", "Expired").await;
        assert!(message.contains("lifetime of 5s ran out"), "an Expired event: {message:?}");

        // spec.ttlSecondsAfterFinished: 2, for a guest that shuts down.
        std::fs::write(&file, vm("job", "  restartPolicy: Never\n  ttlSecondsAfterFinished: 2\n")).unwrap();
        ctl(&["apply", "-f", &file.display().to_string()]);
        ctl(&["wait", "vm", "job", "--for=jsonpath={.status.phase}=Running", "--timeout", "20"]);
        let uid = ctl(&["get", "vm", "job", "-o", "jsonpath={.metadata.uid}"]);
        let socket = cluster.run_dir.join("vms").join(uid.trim()).join("root/run/fc.sock");
        assert_eq!(host::fc_ctrl_alt_del(&socket).await.unwrap(), 204);
        ctl(&["wait", "vm", "job", "--for=jsonpath={.status.phase}=Succeeded", "--timeout", "20"]);
        let status = client.get::<nexus_api::VmSpec>("default", "job").await.unwrap().status.unwrap();
        let finished = status.runtime.unwrap().exit.unwrap().at.unwrap();
        assert_eq!(status.expires_at, Some(finished + chrono::Duration::seconds(2)));
        let at = gone(&client, "job", Duration::from_secs(15)).await;
        let after = (at - finished).num_milliseconds() as f64 / 1000.0;
        println!("finished VM with ttlSecondsAfterFinished 2: gone {after:.2} s after it finished");
        assert!((2.0..=3.0).contains(&after), "gone 2-3 s after it finished, not {after:.2} s");
        assert!(event_message(&client, "job", "Expired").await.contains("ttlSecondsAfterFinished"));

        // A bad lifetime is refused with the field named.
        std::fs::write(&file, vm("bad", "  lifetime: forever\n")).unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(!ok && err.contains("spec.lifetime"), "{err}");
        wait_until(Duration::from_secs(5), "the node to be empty", || async {
            host::vmm_processes_under(&cluster.run_dir).is_empty()
        })
        .await;
    });
}
