//! Snapshots of running VMs and restores from them, on one node.
//!
//! A snapshot is the VM state, its guest memory (both written by
//! Firecracker while the VM is paused) and a copy of its disk taken at the
//! same moment, under `<vm dir>/snapshots/<name>/`. Every VMM sees its own
//! directory at the same fixed path, so the drive paths a snapshot records
//! resolve, in a restored VMM, to that VM's own copy of the disk.

use std::os::unix::fs::MetadataExt;

use chrono::Utc;
use nexus_api::agent::{RestoreFrom, SnapshotReport};

use crate::disk;
use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::firecracker::models::{
    InstanceState, MemoryBackend, MemoryBackendType, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VmState,
};
use crate::paths::{RunDir, SnapshotPaths, Uid, VmPaths, check_snapshot_name};

fn fc(step: &'static str) -> impl FnOnce(crate::firecracker::FcError) -> AgentError {
    move |source| AgentError::Firecracker { step, source }
}

fn disk_bytes(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// The report of a complete snapshot, if there is one.
pub fn completed(snap: &SnapshotPaths) -> Option<SnapshotReport> {
    serde_json::from_slice(&std::fs::read(snap.done()).ok()?).ok()
}

/// Pauses the VM (if running), has Firecracker write state and memory,
/// copies the disk, and resumes it if asked. Repeating it returns the
/// snapshot already made.
pub async fn create(
    run: &RunDir,
    uid: &Uid,
    paths: &VmPaths,
    name: &str,
    resume_after: bool,
) -> Result<SnapshotReport, AgentError> {
    check_snapshot_name(name)?;
    let snap = paths.snapshot(name);
    if let Some(done) = completed(&snap) {
        return Ok(done);
    }
    let client = FcClient::new(paths.socket());
    let info = client.describe_instance().await.map_err(|_| {
        AgentError::NotFound(format!("VM {uid} is not running on this node; start it before taking a snapshot"))
    })?;
    if info.state == InstanceState::NotStarted {
        return Err(AgentError::Invalid(format!("VM {uid} has not booted yet")));
    }
    // A half-written snapshot from an earlier crash is started over.
    let _ = std::fs::remove_dir_all(&snap.dir);
    std::fs::create_dir_all(&snap.dir).map_err(AgentError::io("creating the snapshot directory"))?;
    let was_running = info.state == InstanceState::Running;
    if was_running {
        client.set_vm_state(VmState::Paused).await.map_err(fc("pause"))?;
    }
    let view = run.vmm_view().snapshot(name);
    let made = async {
        client
            .create_snapshot(&SnapshotCreateParams {
                snapshot_path: view.state().display().to_string(),
                mem_file_path: view.memory().display().to_string(),
                snapshot_type: Some(SnapshotType::Full),
            })
            .await
            .map_err(fc("snapshot/create"))?;
        disk::ensure_copy(paths.rootfs(), snap.rootfs())
            .await
            .map(|_| ())
            .map_err(AgentError::io("copying the disk into the snapshot"))
    }
    .await;
    if was_running && (resume_after || made.is_err()) {
        client.set_vm_state(VmState::Resumed).await.map_err(fc("resume"))?;
    }
    made?;
    let report = SnapshotReport {
        name: name.to_string(),
        vm_uid: uid.to_string(),
        state_path: snap.state().display().to_string(),
        memory_path: snap.memory().display().to_string(),
        rootfs_path: snap.rootfs().display().to_string(),
        size_bytes: disk_bytes(&snap.state()) + disk_bytes(&snap.memory()) + disk_bytes(&snap.rootfs()),
        created_at: Utc::now(),
    };
    let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    std::fs::write(snap.done(), json).map_err(AgentError::io("recording the snapshot"))?;
    tracing::info!(uid = %uid, snapshot = name, bytes = report.size_bytes, "snapshot created");
    Ok(report)
}

/// The source snapshot of a restore, checked to be complete.
pub fn source(run: &RunDir, from: &RestoreFrom) -> Result<SnapshotPaths, AgentError> {
    let from_uid = Uid::parse(&from.vm_uid)?;
    check_snapshot_name(&from.snapshot)?;
    let snap = run.vm(&from_uid).snapshot(&from.snapshot);
    if completed(&snap).is_none() {
        return Err(AgentError::NotFound(format!(
            "snapshot {:?} of VM {from_uid} is not on this node; restore on the node that took it",
            from.snapshot
        )));
    }
    Ok(snap)
}

/// Loads `snap` into a freshly started VMM (logger and metrics already
/// set) and resumes it, its network interface on `tap`.
pub async fn load(client: &FcClient, snap: &SnapshotPaths, tap: &str) -> Result<(), AgentError> {
    client
        .load_snapshot(&SnapshotLoadParams {
            // The source's files, reached by their host paths (only the
            // VMM's own directory is remapped in its namespace).
            snapshot_path: snap.state().display().to_string(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: snap.memory().display().to_string(),
            },
            resume_vm: Some(true),
            track_dirty_pages: None,
            network_overrides: vec![NetworkOverride { iface_id: "eth0".into(), host_dev_name: tap.to_string() }],
        })
        .await
        .map_err(fc("snapshot/load"))
}
