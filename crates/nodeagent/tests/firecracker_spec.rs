//! Every request the agent's Firecracker client sends during a full
//! lifecycle (create, pause, snapshot, resume, stop; restore into a new VM)
//! is captured on the wire and checked against Firecracker's OpenAPI spec,
//! found through `$FIRECRACKER_API_SPEC` or in `../shared/firecracker/` (see `spec_paths`).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nexus_api::PowerState;
use nexus_api::agent::EnsureVm;
use nexus_nodeagent::firecracker::FcClient;
use nexus_nodeagent::firecracker::models::*;
use nexus_nodeagent::host::jail::{Jail, inside};
use nexus_nodeagent::paths::DriveName;
use nexus_nodeagent::paths::VmPaths;
use nexus_nodeagent::vm::configure::configure;
use nexus_nodeagent::vm::drives::{Backing, Planned, update};
use support::openapi::Spec;

type Recorded = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// Where Firecracker's v1.16.1 OpenAPI spec is looked for, in order:
/// `$FIRECRACKER_API_SPEC` (which `hack/test.sh` sets, downloading the
/// file from Firecracker's repository and checking its sha256 when it has
/// no copy), then `shared/firecracker/` beside the repository.
fn spec_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::env::var_os("FIRECRACKER_API_SPEC").map(PathBuf::from).into_iter().collect();
    paths.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/firecracker/firecracker-v1.16.1-api.yaml"));
    paths
}

fn load_spec() -> Spec {
    let (_, text) = read_spec();
    Spec::parse(&text)
}

/// The spec's text and where it was read from.
fn read_spec() -> (PathBuf, String) {
    let paths = spec_paths();
    paths.iter().find_map(|p| std::fs::read_to_string(p).ok().map(|t| (p.clone(), t))).unwrap_or_else(|| {
        panic!(
            "Firecracker's v1.16.1 OpenAPI spec is not here (looked at {}). This test validates the agent's \
             requests against it: run hack/test.sh, which downloads it from Firecracker's repository and checks \
             its sha256, or point FIRECRACKER_API_SPEC at a copy.",
            paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

fn sim_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("firecracker-sim");
    assert!(bin.is_file(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

struct Sim {
    pid: u32,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

/// A VM directory at `<dir>/<name>` with its private files linked into a
/// jail for user `uid`, as the agent makes it, and its TAP `tap`.
fn jailed_vm(dir: &Path, name: &str, uid: u32, kernel: Option<&Path>, tap: &str) -> (VmPaths, Jail) {
    let paths = VmPaths { dir: dir.join(name) };
    std::fs::create_dir_all(&paths.dir).unwrap();
    let jail = Jail {
        root: paths.jail(),
        skeleton: nexus_nodeagent::host::jail::Skeleton { dir: dir.join("jail-skeleton"), dynamic: true },
        uid,
        gid: uid,
        binary: sim_binary(),
        kernel: kernel.map(Path::to_path_buf),
        initrd: None,
        read_only_binds: Vec::new(),
    };
    jail.prepare().unwrap();
    for (f, at) in [(paths.log(), inside::LOG), (paths.metrics(), inside::METRICS)] {
        std::fs::write(&f, b"").unwrap();
        jail.link(&f, at).unwrap();
    }
    nexus_nodeagent::host::net::create_persistent_tap(tap, (uid, uid)).unwrap();
    (paths, jail)
}

/// Starts the simulator in `jail` and a recording proxy in front of its
/// socket on `<dir>/<name>.sock`; returns a client for the proxy.
async fn sim_behind_recorder(
    dir: &Path,
    name: &str,
    paths: &VmPaths,
    jail: &Jail,
    recorded: Recorded,
) -> (Sim, FcClient) {
    let real = paths.socket();
    let pid = nexus_nodeagent::host::process::launch(
        jail,
        name,
        &paths.console(),
        nexus_nodeagent::host::jail::VmmNet::Host,
        |_| {},
    )
    .unwrap();
    // The socket file appears at bind(), before listen(): a connect in
    // between is refused. Ready means a connection is accepted.
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(&real).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let front = dir.join(format!("{name}.sock"));
    let listener = tokio::net::UnixListener::bind(&front).unwrap();
    let upstream = FcClient::new(&real);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let upstream = upstream.clone();
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let upstream = upstream.clone();
                    let recorded = recorded.clone();
                    async move {
                        let method = req.method().as_str().to_string();
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        recorded.lock().unwrap().push((method.clone(), path.clone(), body.clone()));
                        let m: &'static str = match method.as_str() {
                            "GET" => "GET",
                            "PUT" => "PUT",
                            "PATCH" => "PATCH",
                            _ => "DELETE",
                        };
                        let (status, bytes) = match upstream.send(m, &path, (!body.is_empty()).then_some(body)).await {
                            Ok(r) => r,
                            Err(nexus_nodeagent::firecracker::FcError::Api { status, fault_message, .. }) => {
                                (status, Bytes::from(serde_json::json!({"fault_message": fault_message}).to_string()))
                            }
                            Err(e) => (502, Bytes::from(e.to_string())),
                        };
                        Ok::<_, Infallible>(Response::builder().status(status).body(Full::new(bytes)).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (Sim { pid }, FcClient::new(front))
}

fn limiter() -> RateLimiter {
    RateLimiter {
        bandwidth: Some(TokenBucket { size: 10_000_000, refill_time: 1000, one_time_burst: None }),
        ops: None,
    }
}

/// Makes an extra drive's file where the jailed VMM looks for it.
fn place_drive(jail: &Jail, drive: &Planned, uid: u32) {
    let at = jail.host(&drive.inside());
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::File::create(&at).unwrap().set_len(4 << 20).unwrap();
    std::os::unix::fs::chown(&at, Some(uid), Some(uid)).unwrap();
}

/// The same limits in the API's terms, as a VM's spec states them.
fn api_limiter(l: RateLimiter) -> nexus_api::storage::RateLimiter {
    let bucket = |b: TokenBucket| nexus_api::storage::TokenBucket {
        size: b.size,
        refill_time_ms: b.refill_time,
        one_time_burst: b.one_time_burst,
    };
    nexus_api::storage::RateLimiter { bandwidth: l.bandwidth.map(bucket), ops: l.ops.map(bucket) }
}

/// The lifecycle, driven through the agent's own client and configure step.
async fn lifecycle(dir: &Path, recorded: Recorded) {
    let kernel = dir.join("vmlinux");
    let rootfs = dir.join("rootfs.ext4");
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::File::create(&rootfs).unwrap().set_len(16 << 20).unwrap();
    let (paths, jail_a) = jailed_vm(dir, "vm-a", 64_001, Some(&kernel), "nxtspec00000a");
    std::fs::copy(&rootfs, paths.rootfs()).unwrap();
    jail_a.link(&paths.rootfs(), inside::ROOTFS).unwrap();
    let req = EnsureVm {
        uid: "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11".into(),
        display_name: "default/spec".into(),
        state: PowerState::Running,
        vcpu: 2,
        mem_mib: 128,
        kernel_path: kernel.display().to_string(),
        rootfs_path: rootfs.display().to_string(),
        boot_args: "console=ttyS0 reboot=k panic=1 pci=off".into(),
        mac: "06:00:ac:10:00:02".into(),
        ip: None,
        restore: None,
        restart_policy: Default::default(),
        kernel_sha256: None,
        rootfs_sha256: None,
        kernel_source: None,
        rootfs_source: None,
        initrd_path: None,
        initrd_sha256: None,
        initrd_source: None,
        probe: None,
        ..Default::default()
    };

    // Two extra drives after the root drive: a read-only image and a
    // rate-limited scratch disk, at their places in the jail.
    let extra = [("cache", true, None), ("scratch", false, Some(limiter()))].map(|(name, read_only, rate_limiter)| {
        let planned = Planned {
            name: DriveName::parse(name).unwrap(),
            read_only,
            rate_limiter: rate_limiter.map(api_limiter),
            backing: Backing::Scratch(4),
            source: "4 MiB scratch".into(),
        };
        place_drive(&jail_a, &planned, 64_001);
        planned
    });

    // Create: the agent's full pre-boot configuration and InstanceStart.
    let (_sim_a, a) = sim_behind_recorder(dir, "a", &paths, &jail_a, recorded.clone()).await;
    let id = nexus_api::guest::GuestIdentity { name: "spec".into(), project: "default".into(), ..Default::default() };
    let doc = nexus_api::guest::document(&id, &req.uid, Some("172.30.0.2"));
    configure(&a, &req, "nxtspec00000a", &extra, Some(&doc)).await.expect("configure and boot");
    // The guest's document, replaced on the running VM and read back.
    let mut edited = doc.clone();
    edited["nexus"]["labels"] = serde_json::json!({"role": "edited"});
    a.put_mmds(&edited).await.unwrap();
    assert_eq!(a.get_mmds().await.unwrap(), edited);
    assert_eq!(a.describe_instance().await.unwrap().state, InstanceState::Running);
    a.version().await.unwrap();
    a.vm_config().await.unwrap();
    a.flush_metrics().await.unwrap();
    a.patch_drive(&PartialDrive { drive_id: "rootfs".into(), path_on_host: None, rate_limiter: Some(limiter()) })
        .await
        .unwrap();
    // A limit taken off a running drive: the agent sends its buckets with
    // size 0, which Firecracker reads as "no limit".
    let was = extra[1].rate_limiter.clone();
    a.patch_drive(&PartialDrive {
        drive_id: "scratch".into(),
        path_on_host: None,
        rate_limiter: Some(update(was.as_ref(), None)),
    })
    .await
    .unwrap();
    a.patch_network_interface(&PartialNetworkInterface {
        iface_id: "eth0".into(),
        rx_rate_limiter: Some(limiter()),
        tx_rate_limiter: Some(limiter()),
    })
    .await
    .unwrap();
    // Pause, snapshot, resume, stop.
    a.set_vm_state(VmState::Paused).await.unwrap();
    let snapshot = SnapshotCreateParams {
        snapshot_path: "/run/snapshot.state".into(),
        mem_file_path: "/run/snapshot.mem".into(),
        snapshot_type: Some(SnapshotType::Full),
    };
    a.create_snapshot(&snapshot).await.unwrap();
    a.set_vm_state(VmState::Resumed).await.unwrap();
    a.send_ctrl_alt_del().await.unwrap();

    // Restore into a new VM, with its own TAP.
    let (b_paths, jail_b) = jailed_vm(dir, "vm-b", 64_002, None, "nxtspec00000b");
    std::fs::copy(&rootfs, b_paths.rootfs()).unwrap();
    jail_b.link(&b_paths.rootfs(), inside::ROOTFS).unwrap();
    // The snapshot names the drives by their paths in the jail.
    for d in &extra {
        place_drive(&jail_b, d, 64_002);
    }
    jail_b.link_read_only(&jail_a.host("/run/snapshot.state"), inside::SNAPSHOT_STATE).unwrap();
    jail_b.link_read_only(&jail_a.host("/run/snapshot.mem"), inside::SNAPSHOT_MEM).unwrap();
    let (_sim_b, b) = sim_behind_recorder(dir, "b", &b_paths, &jail_b, recorded.clone()).await;
    // The log and metrics were given on the command line; a snapshot load
    // is the first request.
    b.load_snapshot(&SnapshotLoadParams {
        snapshot_path: inside::SNAPSHOT_STATE.into(),
        mem_backend: MemoryBackend { backend_type: MemoryBackendType::File, backend_path: inside::SNAPSHOT_MEM.into() },
        resume_vm: Some(true),
        track_dirty_pages: None,
        network_overrides: vec![NetworkOverride { iface_id: "eth0".into(), host_dev_name: "nxtspec00000b".into() }],
    })
    .await
    .expect("load the snapshot into a new VMM");
    b.put_mmds(&doc).await.unwrap();
    assert_eq!(b.describe_instance().await.unwrap().state, InstanceState::Running);
    b.send_ctrl_alt_del().await.unwrap();
}

#[test]
fn every_request_of_a_full_lifecycle_conforms_to_the_firecracker_spec() {
    let spec = load_spec();
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (the VMM opens TAP devices, inside a private network namespace): run as root (hack/test.sh)"
    );
    let recorded: Recorded = Arc::default();
    let rec = recorded.clone();
    std::thread::spawn(move || {
        // TAPs opened by the VMMs live and die in this private namespace.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(lifecycle(dir.path(), rec));
    })
    .join()
    .expect("lifecycle");

    let requests = recorded.lock().unwrap().clone();
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (method, path, body) in &requests {
        problems.extend(spec.check(method, path, body));
        let tpl = spec.template_for(path).unwrap_or_default();
        let action = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["action_type"].as_str().map(|a| format!(" {a}")))
            .unwrap_or_default();
        seen.insert(format!("{method} {tpl}{action}"));
    }
    println!("{} requests checked against {}", requests.len(), read_spec().0.display());
    for s in &seen {
        println!("  {s}");
    }
    assert!(problems.is_empty(), "requests that do not conform:\n{}", problems.join("\n"));
    for expected in [
        "PUT /machine-config",
        "PUT /boot-source",
        "PUT /drives/{drive_id}",
        "PATCH /drives/{drive_id}",
        "PUT /network-interfaces/{iface_id}",
        "PATCH /network-interfaces/{iface_id}",
        "PUT /actions InstanceStart",
        "PUT /actions FlushMetrics",
        "PUT /actions SendCtrlAltDel",
        "PATCH /vm",
        "PUT /snapshot/create",
        "PUT /snapshot/load",
        "GET /",
        "GET /vm/config",
        "GET /version",
        "PUT /mmds/config",
        "PUT /mmds",
        "GET /mmds",
    ] {
        assert!(seen.contains(expected), "the lifecycle never sent {expected}");
    }
}

#[test]
fn the_spec_check_rejects_unknown_fields_missing_fields_and_bad_enums() {
    let spec = load_spec();
    assert!(spec.check("PUT", "/machine-config", br#"{"vcpu_count":1,"mem_size_mib":128}"#).is_empty());
    assert_eq!(spec.check("PUT", "/machine-config", br#"{"vcpu_count":1,"mem_size_mib":128,"extra":1}"#).len(), 1);
    assert_eq!(spec.check("PUT", "/machine-config", br#"{"vcpu_count":0,"mem_size_mib":128}"#).len(), 1);
    assert_eq!(spec.check("PUT", "/boot-source", br#"{"boot_args":"x"}"#).len(), 1);
    assert_eq!(spec.check("PATCH", "/vm", br#"{"state":"Stopped"}"#).len(), 1);
    assert_eq!(spec.check("DELETE", "/vm", b"").len(), 1);
    assert_eq!(spec.check("PUT", "/nope", b"{}").len(), 1);
}

#[test]
fn client_errors_carry_firecrackers_fault_message_and_say_whether_to_retry() {
    use nexus_nodeagent::firecracker::FcError;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        // Unjailed: the client's errors do not depend on where the VMM runs.
        let real = dir.path().join("e.sock");
        let mut sim = std::process::Command::new(sim_binary())
            .args(["--api-sock", &real.display().to_string(), "--id", "e"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let client = FcClient::new(&real);
        for _ in 0..500 {
            if client.describe_instance().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client
            .put_boot_source(&BootSource {
                kernel_image_path: kernel.display().to_string(),
                boot_args: None,
                initrd_path: None,
            })
            .await
            .unwrap();
        client.instance_start().await.unwrap();
        let err = client
            .put_machine_config(&MachineConfiguration {
                vcpu_count: 1,
                mem_size_mib: 64,
                smt: None,
                track_dirty_pages: None,
            })
            .await
            .unwrap_err();
        match &err {
            FcError::Api { status: 400, fault_message, .. } => {
                assert!(fault_message.contains("not supported after starting"))
            }
            other => panic!("expected a 400 with a fault_message, got {other:?}"),
        }
        assert!(!err.is_retryable(), "Firecracker's 4xx verdicts are final");

        // A missing socket: worth retrying (the VMM may still be starting).
        let err = FcClient::new(dir.path().join("absent.sock")).describe_instance().await.unwrap_err();
        assert!(matches!(err, FcError::Connect { .. }) && err.is_retryable(), "{err:?}");

        // A socket that accepts but never answers: a timeout, worth retrying.
        let mute = dir.path().join("mute.sock");
        let _listener = tokio::net::UnixListener::bind(&mute).unwrap();
        let started = std::time::Instant::now();
        let err = FcClient::new(&mute)
            .with_request_timeout(Duration::from_millis(200))
            .describe_instance()
            .await
            .unwrap_err();
        assert!(matches!(err, FcError::Timeout { .. }) && err.is_retryable(), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // SIGTERM ends the simulator as it ends Firecracker.
        let pid = nix::unistd::Pid::from_raw(sim.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = sim.wait().unwrap();
        assert!(!status.success(), "terminated by the signal: {status:?}");
    });
}
