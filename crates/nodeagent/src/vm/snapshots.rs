//! Snapshots of running VMs, and restores from them, on one node.
//!
//! A snapshot is the VM state and its guest memory, both written by
//! Firecracker while the VM is paused, and a copy of its disk taken at the
//! same moment. Firecracker writes into its jail's `/run/`; the agent moves
//! the files out into the VM's private directory, beside the disk copy,
//! then, in one rename, to `<run dir>/snapshots/<snapshot uid>/`, apart from
//! the VM, so a snapshot outlives the VM it was taken from. `done.json`,
//! written last, marks it complete: anything without it is a leftover of an
//! interrupted attempt and is started over.
//!
//! Every VMM sees its disk at the same path in its jail, so the drive path a
//! snapshot records resolves, in a restored VMM, to that VM's own copy of
//! the disk; the snapshot's own files are linked into the restored VM's
//! jail.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use chrono::Utc;
use nexus_api::agent::{EnsureVm, SnapshotReport};
use nexus_api::snapshot::SnapshotFile;

use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::firecracker::models::{
    InstanceState, MemoryBackend, MemoryBackendType, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VmState,
};
use crate::host::disk;
use crate::host::jail::inside;
use crate::paths::{RunDir, SnapshotPaths, Uid, VmPaths};

/// Writing state and memory takes as long as the guest's memory is large.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

fn fc(step: &'static str) -> impl FnOnce(crate::firecracker::FcError) -> AgentError {
    move |source| AgentError::Firecracker { step, source }
}

/// A failed `snapshot/create`; Firecracker's "No space left on device"
/// while it writes the files is the node's disk being full.
fn written_by_vmm(source: crate::firecracker::FcError) -> AgentError {
    match &source {
        crate::firecracker::FcError::Api { fault_message, .. }
            if fault_message.contains("No space left on device") || fault_message.contains("os error 28") =>
        {
            AgentError::DiskFull {
                what: "Firecracker writing the snapshot".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            }
        }
        _ => fc("snapshot/create")(source),
    }
}

fn disk_bytes(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// The report of complete snapshot `snap`, if it is on this node.
pub fn completed(snap: &SnapshotPaths) -> Option<SnapshotReport> {
    serde_json::from_slice(&std::fs::read(snap.done()).ok()?).ok()
}

/// Takes snapshot `snap` of VM `vm`: pauses it (if running), has
/// Firecracker write state and memory, copies the disk, moves the files to
/// the snapshot's directory, and resumes the VM when `resume_after` says so
/// (also when it was left paused by an interrupted attempt). Repeating it
/// returns the snapshot already made. The caller holds the VM's lock.
pub async fn create(
    run: &RunDir,
    vm: &Uid,
    paths: &VmPaths,
    snap: &Uid,
    resume_after: bool,
) -> Result<SnapshotReport, AgentError> {
    let target = run.snapshot(snap);
    let client = FcClient::new(paths.socket());
    if let Some(done) = completed(&target) {
        if resume_after {
            resume_if_paused(&client).await?;
        }
        return Ok(done);
    }
    if paths.dir.join("fc.sock").exists() {
        return Err(AgentError::Invalid(format!(
            "VM {vm} runs in a VMM an earlier agent started outside a jail; stop and start the VM, then take the snapshot"
        )));
    }
    let info = client.describe_instance().await.map_err(|_| {
        AgentError::NotFound(format!("VM {vm} is not running on this node; start it before taking a snapshot"))
    })?;
    if info.state == InstanceState::NotStarted {
        return Err(AgentError::Invalid(format!("VM {vm} has not booted yet")));
    }
    let config: EnsureVm = std::fs::read(paths.config())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| AgentError::NotFound(format!("VM {vm} has no configuration on this node")))?;
    // What an interrupted attempt left is started over.
    let staging = paths.staging(snap);
    let written = paths.jail().join(inside::staging(snap).trim_start_matches('/'));
    for dir in [&staging.dir, &target.dir, &written] {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io(format!("removing {}", dir.display()))(e)),
        }
    }
    std::fs::create_dir_all(&staging.dir).map_err(AgentError::io("creating the snapshot directory"))?;
    let user: Option<u32> = std::fs::read_to_string(paths.vmm_uid()).ok().and_then(|s| s.trim().parse().ok());
    std::fs::create_dir(&written).map_err(AgentError::io("creating the VMM's snapshot directory"))?;
    std::os::unix::fs::lchown(&written, user, user)
        .map_err(AgentError::io("giving the snapshot directory to the VMM"))?;
    let paused = Instant::now();
    if info.state == InstanceState::Running {
        client.set_vm_state(VmState::Paused).await.map_err(fc("pause"))?;
    }
    let made = async {
        client
            .clone()
            .with_request_timeout(SNAPSHOT_TIMEOUT)
            .create_snapshot(&SnapshotCreateParams {
                snapshot_path: format!("{}/state", inside::staging(snap)),
                mem_file_path: format!("{}/mem", inside::staging(snap)),
                snapshot_type: Some(SnapshotType::Full),
            })
            .await
            .map_err(written_by_vmm)?;
        take_out_of_jail(&written.join("state"), &staging.state())?;
        take_out_of_jail(&written.join("mem"), &staging.memory())?;
        disk::ensure_copy(paths.rootfs(), staging.rootfs())
            .await
            .map(|_| ())
            .map_err(AgentError::io("copying the disk into the snapshot"))
    }
    .await;
    if resume_after {
        resume_if_paused(&client).await?;
    }
    let paused_millis = paused.elapsed().as_millis() as u64;
    let _ = std::fs::remove_dir_all(&written);
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&staging.dir);
        return Err(e);
    }
    std::fs::rename(&staging.dir, &target.dir).map_err(AgentError::io("moving the snapshot into place"))?;
    let files: Vec<SnapshotFile> = [("state", target.state()), ("memory", target.memory()), ("disk", target.rootfs())]
        .into_iter()
        .map(|(name, path)| SnapshotFile {
            name: name.into(),
            bytes: disk_bytes(&path),
            path: path.display().to_string(),
        })
        .collect();
    let report = SnapshotReport {
        uid: snap.to_string(),
        vm_uid: vm.to_string(),
        size_bytes: files.iter().map(|f| f.bytes).sum(),
        files,
        created_at: Utc::now(),
        paused_millis,
        mac: guest_mac(paths, &config),
        ip: guest_ip(paths).map(|ip| ip.to_string()),
    };
    let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    std::fs::write(target.done(), json).map_err(AgentError::io("recording the snapshot"))?;
    tracing::info!(vm = %vm, snapshot = %snap, bytes = report.size_bytes, paused_millis, "snapshot created");
    // Recorded off the critical path, for copies to other nodes.
    let (sums_of, uid) = (target.clone(), snap.clone());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = super::snapshot_copy::sums(&sums_of) {
            tracing::warn!(snapshot = %uid, error = %e, "recording the snapshot's sha256 failed");
        }
    });
    Ok(report)
}

/// Moves a file the VMM wrote in its jail to `to`, owned by root and
/// readable by the VMMs of VMs restored from it. Only a regular file is
/// taken: the VMM could have left anything in its directory.
fn take_out_of_jail(from: &std::path::Path, to: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::rename(from, to).map_err(AgentError::io(format!("moving {} out of the jail", from.display())))?;
    // Checked once moved: from here on the VMM cannot swap it.
    let meta = std::fs::symlink_metadata(to).map_err(AgentError::io(format!("reading {}", to.display())))?;
    if !meta.file_type().is_file() {
        let _ = std::fs::remove_file(to);
        return Err(AgentError::Invalid(format!("the VMM left {} as something other than a file", from.display())));
    }
    std::os::unix::fs::lchown(to, Some(0), Some(0)).map_err(AgentError::io(format!("owning {}", to.display())))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644))
        .map_err(AgentError::io(format!("mode of {}", to.display())))
}

async fn resume_if_paused(client: &FcClient) -> Result<(), AgentError> {
    match client.describe_instance().await {
        Ok(i) if i.state == InstanceState::Paused => client.set_vm_state(VmState::Resumed).await.map_err(fc("resume")),
        _ => Ok(()),
    }
}

/// The MAC the guest has: its source's when the VM was itself restored.
fn guest_mac(paths: &VmPaths, config: &EnsureVm) -> String {
    restored(paths).map(|r| r.mac).unwrap_or_else(|| config.mac.clone())
}

/// The address the guest has: its source's when the VM was itself restored.
fn guest_ip(paths: &VmPaths) -> Option<std::net::Ipv4Addr> {
    match restored(paths) {
        Some(r) => r.guest_ip,
        None => std::fs::read_to_string(paths.ip()).ok()?.trim().parse().ok(),
    }
}

/// What a restored VM's directory says of its origin.
pub fn restored(paths: &VmPaths) -> Option<crate::paths::Restored> {
    serde_json::from_slice(&std::fs::read(paths.restored()).ok()?).ok()
}

/// Removes snapshot `snap`'s files (and a copy of it being made); returns
/// whether there were any.
pub fn delete(run: &RunDir, snap: &Uid) -> Result<bool, AgentError> {
    let _ = std::fs::remove_dir_all(run.snapshots().join(format!(".{snap}.copy")));
    let dir = run.snapshot(snap).dir;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            tracing::info!(snapshot = %snap, "snapshot removed");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(AgentError::io(format!("removing {}", dir.display()))(e)),
    }
}

/// Loads the snapshot linked into a freshly started VMM's jail (logger and
/// metrics already set), its network interface on `tap`; resumes it when
/// `resume` says so, else it stays paused (see [`resume`]).
pub async fn load(client: &FcClient, tap: &str, resume: bool) -> Result<(), AgentError> {
    client
        .clone()
        .with_request_timeout(SNAPSHOT_TIMEOUT)
        .load_snapshot(&SnapshotLoadParams {
            snapshot_path: inside::SNAPSHOT_STATE.into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: inside::SNAPSHOT_MEM.into(),
            },
            resume_vm: Some(resume),
            track_dirty_pages: None,
            network_overrides: vec![NetworkOverride { iface_id: "eth0".into(), host_dev_name: tap.to_string() }],
        })
        .await
        .map_err(fc("snapshot/load"))
}

/// Resumes a VM loaded paused.
pub async fn resume(client: &FcClient) -> Result<(), AgentError> {
    client.set_vm_state(VmState::Resumed).await.map_err(fc("resume"))
}
