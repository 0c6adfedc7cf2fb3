//! The VM runtime: realises an `EnsureVm` on this host (run dir, TAP, VMM
//! process, Firecracker configuration) and tears it down again.
//!
//! [`Runtime`] is the front door the API, the metrics sampler and the
//! garbage collector call; each call about a VM becomes a typed command to
//! that VM's owner ([`owner`]), which alone acts on the VM:
//!
//! - [`ensure`]: start, stop, pause, resume, the restart policy;
//! - [`launch`] ([`images`], [`addresses`], [`drives`]), [`configure`]: a
//!   fresh VMM, its jail, TAP, disks and address, its Firecracker
//!   configuration; [`drives`] also changes a running VMM's I/O limits;
//! - [`observe`], [`probe`]: what is on the host, as a report;
//! - [`teardown`]: stopping the VMM and removing the VM;
//! - [`snapshots`]: snapshots taken of the VM and VMs restored from them;
//! - [`inventory`]: everything on the host, and the garbage collector's removals;
//! - [`metrics`], [`logs`]: what the VMMs count and write, read back.

pub mod addresses;
pub mod configure;
pub mod drives;
pub mod ensure;
pub mod files;
pub mod images;
pub mod inventory;
pub mod launch;
pub mod logs;
pub mod metrics;
pub mod mmds;
pub mod observe;
pub mod owner;
pub mod probe;
pub mod request;
pub mod snapshot_copy;
pub mod snapshots;
pub mod teardown;

use std::collections::HashMap;
use std::sync::Arc;

use nexus_api::agent::{EnsureVm, ObservedState, SnapshotReport, SnapshotRequest, VmReport};

use crate::error::AgentError;
use crate::host::{Host, HostConfig};
use crate::paths::{Uid, VmPaths};
use owner::{Command, Owners, Proxied};

/// Owns every VM on this host, through one owner per VM.
#[derive(Debug)]
pub struct Runtime {
    host: Arc<Host>,
    owners: Arc<Owners>,
    /// VMs whose removal is under way.
    removing: Arc<std::sync::Mutex<std::collections::HashSet<Uid>>>,
    /// The VMs' metrics, sampled by `collect_metrics`.
    metrics: metrics::Collector,
    /// What each VM's `vm.json` said, by directory, for [`Runtime::allocation`].
    allocations: inventory::Allocations,
}

impl Runtime {
    pub fn new(cfg: HostConfig, net: crate::host::net::Net) -> Self {
        let host = Arc::new(Host::new(cfg, net));
        Runtime {
            owners: Owners::new(host.clone()),
            host,
            removing: Default::default(),
            metrics: Default::default(),
            allocations: Default::default(),
        }
    }

    /// Starts making the spare network namespaces restored VMs take.
    pub fn start_spares(&self) {
        self.host.refill_spares();
    }

    /// The host the VMs run on.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Brings VM `req.uid` to `req.state` and reports what is there.
    pub async fn ensure(&self, req: &EnsureVm) -> Result<VmReport, AgentError> {
        let uid = Uid::parse(&req.uid)?;
        let req = Box::new(req.clone());
        self.owners.ask(&uid, |reply| Command::Ensure(req, reply)).await?
    }

    /// Stops the VM's VMM and removes everything of it from the host. A VM
    /// with a directory here is removed by its owner on its own time (the
    /// guest asked to shut down, the stop grace, then its files and links):
    /// the answer is `Removing` at once, and the node's next heartbeat names
    /// the VM in `removedVms` when it is done. A VM with nothing here is
    /// answered `Absent` once its owner has made sure of that.
    pub async fn remove(&self, raw_uid: &str) -> Result<VmReport, AgentError> {
        let uid = Uid::parse(raw_uid)?;
        let paths = self.host.paths(&uid)?;
        let removing = VmReport { state: ObservedState::Removing, ..observe::absent(&uid) };
        {
            let mut under_way = self.removing.lock().unwrap_or_else(|p| p.into_inner());
            if under_way.contains(&uid) {
                return Ok(removing);
            }
            if !paths.dir.exists() && self.host.exits.recently_removed(uid.as_str()) {
                // Done a moment ago (the caller comes back for the result).
                return Ok(observe::absent(&uid));
            }
            if paths.dir.exists() {
                under_way.insert(uid.clone());
                drop(under_way);
                let answer = self.owners.tell(&uid, Command::Remove);
                let (host, under_way) = (self.host.clone(), self.removing.clone());
                tokio::spawn(async move {
                    match answer.await {
                        Ok(Ok(_)) => host.exits.removed(uid.as_str()),
                        Ok(Err(e)) => tracing::warn!(uid = %uid, error = %e, "removing the VM failed"),
                        Err(_) => tracing::warn!(uid = %uid, "the VM's owner ended before its removal"),
                    }
                    under_way.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
                });
                return Ok(removing);
            }
        }
        self.owners.ask(&uid, Command::Remove).await?
    }

    /// Removes VM `uid` from the host and answers once nothing is left (the
    /// garbage collector's removal, which reports what it removed).
    pub async fn remove_now(&self, raw_uid: &str) -> Result<VmReport, AgentError> {
        let uid = Uid::parse(raw_uid)?;
        self.owners.ask(&uid, Command::Remove).await?
    }

    /// What is on the host for `uid`, asked of the VM's owner (after any
    /// command for it in progress).
    pub async fn report(&self, uid: &Uid) -> Result<VmReport, AgentError> {
        self.owners.ask(uid, Command::Report).await?
    }

    /// Takes snapshot `snap` of the VM the request names (see
    /// `snapshots::create`), as the VM's owner.
    pub async fn snapshot(&self, raw_snap: &str, req: &SnapshotRequest) -> Result<SnapshotReport, AgentError> {
        let snap = Uid::parse(raw_snap)?;
        let vm = Uid::parse(&req.vm_uid)?;
        let req = req.clone();
        self.owners.ask(&vm, |reply| Command::Snapshot(snap, req, reply)).await?
    }

    /// Snapshot `snap`, when it is complete on this node.
    pub async fn snapshot_report(&self, raw_snap: &str) -> Result<SnapshotReport, AgentError> {
        let snap = Uid::parse(raw_snap)?;
        let _files = self.host.snapshot_files.hold(&snap).await;
        snapshots::completed(&self.host.cfg.run_dir.snapshot(&snap))
            .ok_or_else(|| AgentError::NotFound(format!("no complete snapshot {snap} on this node")))
    }

    /// Removes snapshot `snap`'s files (VMs restored from it keep running:
    /// their memory is theirs once loaded).
    pub async fn delete_snapshot(&self, raw_snap: &str) -> Result<bool, AgentError> {
        let snap = Uid::parse(raw_snap)?;
        let removed = {
            let _files = self.host.snapshot_files.hold(&snap).await;
            snapshots::delete(&self.host.cfg.run_dir, &snap)?
        };
        self.host.snapshot_files.forget(&snap);
        Ok(removed)
    }

    /// Makes volume `raw_uid` on this node (a no-op when it is there): an
    /// empty sparse disk, or a copy of a checked image.
    pub async fn ensure_volume(
        &self,
        raw_uid: &str,
        req: &nexus_api::agent::VolumeRequest,
    ) -> Result<nexus_api::agent::VolumeReport, AgentError> {
        let uid = Uid::parse(raw_uid)?;
        let _files = self.host.volume_files.hold(&uid).await;
        let paths = self.host.cfg.run_dir.volume(&uid);
        let image = match &req.image {
            Some(i) => Some(self.host.image("image", &i.path, i.sha256.as_deref(), i.source.as_deref()).await?),
            None => None,
        };
        crate::host::volumes::ensure(&uid, &paths, &req.display_name, req.size_mib, image.as_deref()).await
    }

    /// Volume `raw_uid`, when it is made on this node.
    pub async fn volume_report(&self, raw_uid: &str) -> Result<nexus_api::agent::VolumeReport, AgentError> {
        let uid = Uid::parse(raw_uid)?;
        let _files = self.host.volume_files.hold(&uid).await;
        crate::host::volumes::made(&uid, &self.host.cfg.run_dir.volume(&uid))
            .ok_or_else(|| AgentError::NotFound(format!("no volume {uid} on this node")))
    }

    /// Removes volume `raw_uid`'s file. Refused while a VMM of this node
    /// has it attached (the controller detaches it first).
    pub async fn delete_volume(&self, raw_uid: &str) -> Result<bool, AgentError> {
        let uid = Uid::parse(raw_uid)?;
        let paths = self.host.cfg.run_dir.volume(&uid);
        if let Some(vm) = self.vm_using(&paths.disk()) {
            return Err(AgentError::Conflict(format!(
                "volume {uid} is attached to VM {vm} on this node; remove that VM first"
            )));
        }
        let removed = {
            let _files = self.host.volume_files.hold(&uid).await;
            crate::host::volumes::delete(&paths)?
        };
        self.host.volume_files.forget(&uid);
        Ok(removed)
    }

    /// The VM (uid) of this node whose running VMM has `disk` as a drive.
    fn vm_using(&self, disk: &std::path::Path) -> Option<String> {
        let running = self.running_vmms();
        let wanted = disk.display().to_string();
        running
            .keys()
            .find(|uid| {
                let paths = VmPaths { dir: self.host.cfg.run_dir.vms().join(uid.as_str()) };
                std::fs::read(paths.started_drives())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Vec<nexus_api::storage::DriveStatus>>(&b).ok())
                    .is_some_and(|drives| drives.iter().any(|d| d.path == wanted))
            })
            .cloned()
    }

    /// Forwards a Firecracker API call to VM `uid`'s VMM, as its owner: it
    /// never interleaves with a configuration, snapshot or stop in progress.
    pub async fn proxy(
        &self,
        uid: &Uid,
        method: &axum::http::Method,
        fc_path: &str,
        body: bytes::Bytes,
    ) -> Result<axum::response::Response, crate::server::proxy::ProxyError> {
        let call = Proxied { method: method.clone(), path: fc_path.to_string(), body };
        match self.owners.ask(uid, |reply| Command::Proxy(call, reply)).await {
            Ok(answer) => answer,
            Err(e) => Err(crate::server::proxy::ProxyError::Unreachable(e.to_string())),
        }
    }

    /// Asks VM `uid`'s VMM to write its metrics now, as its owner.
    pub async fn flush_metrics(&self, uid: &Uid) {
        let _ = self.owners.ask(uid, Command::FlushMetrics).await;
    }

    /// Has every running VMM write its metrics, then samples them and the
    /// host (see `metrics`).
    pub async fn collect_metrics(&self) {
        let live = self.running_vmms();
        for uid in live.keys() {
            if let Ok(uid) = Uid::parse(uid) {
                self.flush_metrics(&uid).await;
            }
        }
        self.metrics.sample(&self.host.cfg.run_dir, &live);
    }

    /// The VMMs of this agent's VMs, as VM uid → pid: each VM directory's
    /// pid file, where that process is the VM's VMM. It costs a look at
    /// this agent's VMs, not at every process on the host; a VMM whose
    /// launch was cut short before its pid was recorded is not in it.
    fn running_vmms(&self) -> HashMap<String, u32> {
        let Ok(entries) = std::fs::read_dir(self.host.cfg.run_dir.vms()) else { return HashMap::new() };
        entries
            .flatten()
            .filter_map(|entry| {
                let uid = entry.file_name().into_string().ok()?;
                let pid = files::read_pid(&VmPaths { dir: entry.path() })?;
                self.host.vmms.is_vmm(pid, &uid).then_some((uid, pid))
            })
            .collect()
    }

    /// What was collected of the VMs and the host.
    pub fn vm_metrics(&self) -> &metrics::Collector {
        &self.metrics
    }

    /// The VM's paths for read-only callers (logs, metrics); see `paths`.
    pub fn vm_paths(&self, uid: &Uid) -> Result<VmPaths, AgentError> {
        self.host.paths(uid)
    }

    /// How many VMs have an owner task now (those asked about lately).
    pub fn owners(&self) -> usize {
        self.owners.len()
    }
}
