//! Storage end to end, on real processes: extra drives from a Template and
//! a VM (a read-only Image, a scratch disk) with I/O limits, limits changed
//! on the running VM, a drive added while it runs (waiting for a restart),
//! and a Volume that outlives the VM that wrote it, held by one VM at a
//! time and not deleted while in use.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nexus_api::conditions;
use nexus_api::meta::find_condition;
use nexus_api::volume::VolumePhase;
use nexus_api::{ConditionStatus, VmPhase, VmSpec, VolumeSpec};
use nexus_e2e::{Cluster, EXAMPLE_IMAGES, in_private_netns, wait_until};
use serde_json::{Value, json};

/// The VMM's configuration, read through the node agent's proxy.
async fn vm_config(cluster: &Cluster, uid: &str) -> Value {
    let (status, body) = cluster.agent_call("GET", &format!("/v1/vms/{uid}/proxy/vm/config"), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn drive<'a>(config: &'a Value, id: &str) -> &'a Value {
    config["drives"].as_array().unwrap().iter().find(|d| d["drive_id"] == id).unwrap_or(&Value::Null)
}

const TEMPLATE: &str = "apiVersion: nexus/v1\nkind: Image\nmetadata:\n  name: tools\nspec:\n  type: Rootfs\n  path: \
                        /var/lib/nexus/images/tools.ext4\n---\napiVersion: nexus/v1\nkind: Template\nmetadata:\n  \
                        name: runner\nspec:\n  vcpu: 1\n  memMib: 128\n  kernel: /var/lib/nexus/images/vmlinux\n  \
                        rootfs: /var/lib/nexus/images/rootfs.ext4\n  rootfsRateLimiter:\n    bandwidth: {size: \
                        10485760, refillTimeMs: 100}\n  drives:\n    - {name: tools, image: tools, readOnly: true}\n";

fn runner(root_bandwidth: Option<u64>, extra_drive: bool) -> String {
    // The edited VM also raises its network limit.
    let tx_ops = if root_bandwidth.is_some() { 2000 } else { 1000 };
    let mut spec = format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: runner-1\nspec:\n  template: runner\n  network:\n    \
         rateLimiter:\n      tx: {{ops: {{size: {tx_ops}, refillTimeMs: 1000}}}}\n  drives:\n    - {{name: scratch, sizeMib: \
         64}}\n",
    );
    if extra_drive {
        spec.push_str("    - {name: logs, sizeMib: 8}\n");
    }
    if let Some(size) = root_bandwidth {
        spec.push_str(&format!("  rootfsRateLimiter:\n    bandwidth: {{size: {size}, refillTimeMs: 100}}\n"));
    }
    spec
}

#[test]
fn a_vm_with_drives_from_its_template_and_its_own_runs_with_its_limits_and_they_change_live() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let images = Path::new(EXAMPLE_IMAGES);
        std::fs::File::create(images.join("tools.ext4")).unwrap().set_len(16 << 20).unwrap();
        let mut cluster = Cluster::start(dir.path(), "n1").await;
        let client = cluster.client();

        // Refused with the field named, nothing stored.
        let bad = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "bad"},
            "spec": {"template": "runner", "drives": [
                {"name": "a", "sizeMib": 8}, {"name": "a", "sizeMib": 8}, {"name": "b", "sizeMib": 0},
                {"name": "c", "volume": "team-b/cache"},
                {"name": "d", "sizeMib": 8, "rateLimiter": {"ops": {"size": 0, "refillTimeMs": 10}}}]}});
        let err = client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/vms", Some(&bad)).await.unwrap_err();
        let text = err.to_string();
        for field in [
            "spec.drives[1].name",
            "spec.drives[2].sizeMib",
            "spec.drives[3].volume",
            "spec.drives[4].rateLimiter.ops.size",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        assert_eq!(err.status(), Some(422));
        cluster.apply("apiVersion: nexus/v1\nkind: Image\nmetadata:\n  name: kern\nspec:\n  type: Kernel\n  path: /var/lib/nexus/images/vmlinux\n",
        );
        let wrong = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "bad"},
            "spec": {"template": "runner", "drives": [{"name": "k", "image": "kern"}]}});
        let err =
            client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/vms", Some(&wrong)).await.unwrap_err();
        assert!(err.to_string().contains("spec.drives[0].image") && err.to_string().contains("Rootfs"), "{err}");
        assert!(client.get::<VmSpec>("default", "bad").await.unwrap_err().is_not_found(), "nothing stored");
        println!("bad drives refused with 422, each field named: {text}");

        // A template with a read-only Image drive and a root-drive limit; the
        // VM adds a scratch disk and a network limit.
        cluster.apply(TEMPLATE);
        let started = Instant::now();
        cluster.apply(&runner(None, false));
        let running = cluster.wait_running("runner-1").await;
        println!("runner-1 Running {} ms after the apply", started.elapsed().as_millis());
        let uid = running.uid().to_string();
        let pid = running.status_or_default().runtime.unwrap().pid.unwrap();
        let drives = running.status_or_default().runtime.unwrap().drives;
        let names: Vec<(&str, &str, bool)> =
            drives.iter().map(|d| (d.name.as_str(), d.source.as_str(), d.read_only)).collect();
        assert_eq!(names, [("tools", "image tools@1", true), ("scratch", "64 MiB scratch", false)]);

        let config = vm_config(&cluster, &uid).await;
        println!("the VMM's drives: {}", config["drives"]);
        // A booted Firecracker lists its devices in no particular order;
        // the order they were attached in is that of the PUTs in its log.
        let mut ids: Vec<&str> =
            config["drives"].as_array().unwrap().iter().map(|d| d["drive_id"].as_str().unwrap()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["rootfs", "scratch", "tools"]);
        let vm_dir = dir.path().join("run/vms").join(&uid);
        // The log reaches its file a moment after the VMM writes it.
        let attached_drives = || {
            let log = std::fs::read_to_string(vm_dir.join("fc.log")).unwrap_or_default();
            log.lines()
                .filter_map(|l| l.split("Put request on \"/drives/").nth(1))
                .filter_map(|rest| rest.split('"').next().map(str::to_string))
                .collect::<Vec<String>>()
        };
        wait_until(Duration::from_secs(10), "the drives' PUTs in the VMM's log", || async {
            attached_drives().len() >= 3
        })
        .await;
        let attached = attached_drives();
        assert_eq!(attached, ["rootfs", "tools", "scratch"], "the root drive first, then the extra drives in order");
        let root = &drive(&config, "rootfs")["rate_limiter"]["bandwidth"];
        assert_eq!((root["size"].as_u64(), root["refill_time"].as_u64()), (Some(10485760), Some(100)));
        assert_eq!(drive(&config, "tools")["is_read_only"], true);
        assert_eq!(drive(&config, "tools")["path_on_host"], "/drives/tools");
        assert_eq!(drive(&config, "scratch")["path_on_host"], "/drives/scratch");
        let tx = &config["network-interfaces"][0]["tx_rate_limiter"]["ops"];
        assert_eq!((tx["size"].as_u64(), tx["refill_time"].as_u64()), (Some(1000), Some(1000)));

        // The scratch disk is the VM's own sparse file; the image is not copied.
        let scratch = std::fs::metadata(vm_dir.join("drives/scratch.img")).unwrap();
        println!("scratch disk: {} bytes apparent, {} KiB allocated", scratch.len(), scratch.blocks() / 2);
        assert_eq!(scratch.len(), 64 << 20);
        assert!(scratch.blocks() * 512 < 1 << 20, "sparse");
        assert!(!vm_dir.join("drives/tools.img").exists(), "a read-only image drive is not copied");

        // A limit edited on the running VM reaches its VMM, same pid.
        let edited = Instant::now();
        cluster.apply(&runner(Some(20971520), false));
        wait_until(Duration::from_secs(10), "the new limits in the VMM", || async {
            let config = vm_config(&cluster, &uid).await;
            drive(&config, "rootfs")["rate_limiter"]["bandwidth"]["size"] == 20971520
                && config["network-interfaces"][0]["tx_rate_limiter"]["ops"]["size"] == 2000
        })
        .await;
        let took = edited.elapsed();
        let after = cluster.vm("runner-1").await;
        let generation = after.metadata.generation.unwrap();
        wait_until(Duration::from_secs(10), "the applied limits in the status", || async {
            cluster
                .vm("runner-1")
                .await
                .status_or_default()
                .runtime
                .and_then(|r| r.limits)
                .is_some_and(|l| l.generation == generation)
        })
        .await;
        let now = cluster.vm("runner-1").await.status_or_default().runtime.unwrap();
        println!(
            "a root-drive and a network limit edited on the running VM were in the VMM's /vm/config {} ms after the \
             apply; pid {} -> {}",
            took.as_millis(),
            pid,
            now.pid.unwrap()
        );
        assert_eq!(now.pid, Some(pid), "no restart");
        assert_eq!(now.limits.unwrap().rootfs.unwrap().bandwidth.unwrap().size, 20971520);

        // A drive added while it runs waits for the next start.
        cluster.apply(&runner(Some(20971520), true));
        wait_until(Duration::from_secs(10), "RestartPending", || async {
            cluster
                .vm("runner-1")
                .await
                .status
                .and_then(|s| find_condition(&s.conditions, conditions::RESTART_PENDING).cloned())
                .is_some_and(|c| c.status == ConditionStatus::True)
        })
        .await;
        let pending = cluster.vm("runner-1").await;
        let message = find_condition(&pending.status_or_default().conditions, conditions::RESTART_PENDING)
            .unwrap()
            .message
            .clone();
        println!("drive added on the running VM: RestartPending: {message}");
        assert_eq!(pending.status_or_default().runtime.unwrap().pid, Some(pid), "not restarted by itself");
        for state in ["stop", "start"] {
            let (ok, out, err) = cluster.nexusctl(&[state, "vm", "runner-1", "--wait"]);
            assert!(ok, "{state}: {out}{err}");
        }
        let restarted = cluster.wait_running("runner-1").await;
        let ids: Vec<String> =
            restarted.status_or_default().runtime.unwrap().drives.iter().map(|d| d.name.clone()).collect();
        assert_eq!(ids, ["tools", "scratch", "logs"]);
        assert!(find_condition(&restarted.status_or_default().conditions, conditions::RESTART_PENDING).is_none());
        let (ok, describe, _) = cluster.nexusctl(&["describe", "vm", "runner-1"]);
        assert!(ok && describe.contains("Drives:") && describe.contains("Template:"), "{describe}");
        println!("{describe}");

        let (ok, out, err) = cluster.nexusctl(&["delete", "vm", "runner-1", "--wait"]);
        assert!(ok, "{out}{err}");
        assert!(!vm_dir.exists(), "the VM's directory, scratch disks included, is gone");
        cluster.stop();
    });
}

async fn volume(cluster: &Cluster, name: &str) -> nexus_api::Volume {
    cluster.client().get::<VolumeSpec>("default", name).await.unwrap()
}

fn vm_with_volume(name: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  vcpu: 1\n  memMib: 64\n  kernel: \
         /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n  drives:\n    - {{name: data, \
         volume: data}}\n"
    )
}

#[test]
fn a_volume_outlives_its_vm_serves_one_vm_at_a_time_and_is_not_deleted_while_used() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "n1").await;
        let client = cluster.client();
        cluster.apply("apiVersion: nexus/v1\nkind: ResourceQuota\nmetadata:\n  name: storage\nspec:\n  volumes: 2\n  volumeMib: 20\n---\n\
             apiVersion: nexus/v1\nkind: Volume\nmetadata:\n  name: data\nspec:\n  sizeMib: 16\n",
        );
        wait_until(Duration::from_secs(20), "the volume Available", || async {
            volume(&cluster, "data").await.status_or_default().phase == VolumePhase::Available
        })
        .await;
        let made = volume(&cluster, "data").await;
        let status = made.status_or_default();
        println!("volume data: {:?} on {:?}, {:?} bytes", status.phase, status.node_name, status.size_bytes);
        assert_eq!((status.node_name.as_deref(), status.size_bytes), (Some("n1"), Some(16 << 20)));
        // Quotas count volumes and their size.
        let create = |name: &str, mib: u64| {
            let body = json!({"apiVersion": "nexus/v1", "kind": "Volume", "metadata": {"name": name},
                "spec": {"sizeMib": mib}});
            let client = cluster.client();
            async move { client.raw::<Value>(reqwest::Method::POST, "/v1/projects/default/volumes", Some(&body)).await }
        };
        let err = create("big", 8).await.unwrap_err();
        println!("16 + 8 MiB against volumeMib 20: {err}");
        assert!(err.to_string().contains("volume storage 16 MiB of 20 MiB used"), "{err}");
        create("small", 4).await.expect("16 + 4 MiB fits");
        let err = create("tiny", 1).await.unwrap_err();
        println!("a third volume against volumes 2: {err}");
        assert!(err.to_string().contains("volumes 2 of 2 used"), "{err}");

        // The first VM writes into the volume (on the simulator: bytes
        // written into its file, as a guest's writes would land).
        cluster.apply(&vm_with_volume("writer"));
        let writer = cluster.wait_running("writer").await;
        let disk = writer.status_or_default().runtime.unwrap().drives[0].path.clone();
        println!("writer runs with volume data at {disk}");
        assert_eq!(volume(&cluster, "data").await.status_or_default().attached_to.as_deref(), Some("writer"));
        {
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            f.seek(std::io::SeekFrom::Start(4096)).unwrap();
            f.write_all(b"written by writer").unwrap();
        }

        // A snapshot of a VM with a volume is refused, saying why.
        let (ok, out, err) = cluster.nexusctl(&["snapshot", "writer", "writer-snap", "--wait"]);
        println!("snapshot of a VM with a volume: {}", err.trim());
        assert!(!ok && err.contains("uses volume data"), "{out}{err}");
        assert_eq!(
            writer.status_or_default().runtime.unwrap().pid,
            cluster.vm("writer").await.status_or_default().runtime.unwrap().pid,
            "the VM was left running"
        );

        // A second VM naming it waits, saying who holds it.
        cluster.apply(&vm_with_volume("reader"));
        wait_until(Duration::from_secs(20), "reader waiting for the volume", || async {
            let s = cluster.vm("reader").await.status_or_default();
            s.phase == VmPhase::Pending
                && find_condition(&s.conditions, conditions::READY)
                    .is_some_and(|c| c.reason == "VolumeInUse" && c.message.contains("writer"))
        })
        .await;
        let waiting = cluster.vm("reader").await.status_or_default();
        println!(
            "reader: {:?}, {}",
            waiting.phase,
            find_condition(&waiting.conditions, conditions::READY).unwrap().message
        );

        // The volume cannot be deleted while used.
        let err = client.delete::<VolumeSpec>("default", "data").await.unwrap_err();
        println!("deleting the used volume: {err}");
        assert_eq!(err.status(), Some(409));
        assert!(err.to_string().contains("writer"), "{err}");
        assert!(volume(&cluster, "data").await.metadata.deletion_timestamp.is_none(), "left as it was");

        // Once the writer is gone, the reader gets the volume, bytes and all.
        let (ok, out, err) = cluster.nexusctl(&["delete", "vm", "writer", "--wait"]);
        assert!(ok, "{out}{err}");
        let reader = cluster.wait_running("reader").await;
        let path = reader.status_or_default().runtime.unwrap().drives[0].path.clone();
        assert_eq!(path, disk, "the same file on the same node");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[4096..4096 + 17], b"written by writer");
        assert_eq!(volume(&cluster, "data").await.status_or_default().attached_to.as_deref(), Some("reader"));
        println!("after writer was deleted, reader runs with the volume and reads what writer wrote");

        // Detached, it can go, and its file goes with it.
        let (ok, out, err) = cluster.nexusctl(&["delete", "vm", "reader", "--wait"]);
        assert!(ok, "{out}{err}");
        wait_until(Duration::from_secs(20), "the volume freed", || async {
            volume(&cluster, "data").await.status_or_default().attached_to.is_none()
        })
        .await;
        let (ok, out, err) = cluster.nexusctl(&["delete", "volume", "data", "--wait"]);
        assert!(ok, "{out}{err}");
        assert!(!Path::new(&disk).exists(), "deleting the Volume removed its file");
        cluster.stop();
    });
}
