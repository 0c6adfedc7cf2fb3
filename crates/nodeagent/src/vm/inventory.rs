//! The node's inventory: everything of the agent's on the host (run
//! directories, VMMs, TAPs, sockets, snapshots), whether or not a VM claims
//! it, what the VMs meant to run take, and the removal of what the
//! garbage collector found unclaimed, each name checked again here.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nexus_api::PowerState;
use nexus_api::agent::{EnsureVm, Inventory};
use nexus_api::node::NodeAllocation;

use super::Runtime;
use crate::error::AgentError;
use crate::paths::{TAP_PREFIX, Uid, VmPaths};

/// What the `vm.json` of each VM directory asks for, as last read: a
/// heartbeat (several a second while VMs end) reads the files of the
/// directories it knows again only after the agent wrote one or a
/// kept-down mark ([`Host::config_written`]; only the agent writes them),
/// reads those of new directories, and adds them up again only when either
/// happened or the set of VM directories changed. Between the agent's
/// writes a beat makes no system call per VM beyond listing the directory.
///
/// [`Host::config_written`]: crate::host::Host::config_written
#[derive(Debug, Default)]
pub(super) struct Allocations(std::sync::Mutex<AllocationCache>);

#[derive(Debug, Default)]
struct AllocationCache {
    /// [`Host::config_writes`](crate::host::Host::config_writes) when `files` was read.
    writes: u64,
    files: HashMap<PathBuf, Asked>,
    /// The VM directories' names (sorted) and what they added up to.
    total: Option<(Vec<OsString>, NodeAllocation)>,
}

#[derive(Debug, Clone, Copy)]
struct Asked {
    /// vCPUs and MiB, when the VM is meant to run (not Stopped).
    runs: Option<(u8, u32)>,
    kept_down: bool,
}

impl Runtime {
    /// vCPUs, memory and count of the VMs meant to run here (not Stopped,
    /// not kept down after their VMM ended).
    pub fn allocation(&self) -> NodeAllocation {
        let vms = self.host.cfg.run_dir.vms();
        let Ok(entries) = std::fs::read_dir(&vms) else { return NodeAllocation::default() };
        let mut names: Vec<OsString> = entries.flatten().map(|e| e.file_name()).collect();
        names.sort_unstable();
        let mut cache = self.allocations.0.lock().unwrap_or_else(|p| p.into_inner());
        let writes = self.host.config_writes();
        if cache.writes == writes
            && let Some((known, total)) = &cache.total
            && *known == names
        {
            return total.clone();
        }
        if cache.writes != writes {
            (cache.writes, cache.files) = (writes, HashMap::new());
        }
        let mut total = NodeAllocation::default();
        let mut seen = HashMap::with_capacity(names.len());
        for name in &names {
            let dir = vms.join(name);
            let asked = match cache.files.get(&dir) {
                Some(a) => *a,
                None => {
                    let file = dir.join("vm.json");
                    // A directory without a readable vm.json (one being made) asks for nothing yet.
                    let Some(cfg) = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice::<EnsureVm>(&b).ok())
                    else {
                        continue;
                    };
                    let runs = (cfg.state != PowerState::Stopped).then_some((cfg.vcpu, cfg.mem_mib));
                    let kept_down = VmPaths { dir: dir.clone() }.kept_down().exists();
                    Asked { runs, kept_down }
                }
            };
            seen.insert(dir, asked);
            if let (Some((vcpu, mem_mib)), false) = (asked.runs, asked.kept_down) {
                total.vcpu += u32::from(vcpu);
                total.mem_mib += u64::from(mem_mib);
                total.vms += 1;
            }
        }
        // Directories gone are forgotten.
        cache.files = seen;
        cache.total = Some((names, total.clone()));
        total
    }

    /// Everything of ours on the host, whether or not a VM claims it; with
    /// `reports`, also what [`Runtime::report`] says of each VM.
    pub async fn inventory(&self, reports: bool) -> Result<Inventory, AgentError> {
        let mut inv = Inventory::default();
        let vms_dir = self.host.cfg.run_dir.vms();
        let entries = std::fs::read_dir(&vms_dir).map_err(AgentError::io(format!("listing {}", vms_dir.display())))?;
        // Warm VMMs' sockets are the agent's own (counted with the spares).
        inv.sockets = sockets_under(self.host.cfg.run_dir.root(), 5, &self.host.cfg.run_dir.warm());
        inv.vmms =
            self.host.vmms.find().into_iter().map(|(pid, uid)| nexus_api::agent::VmmProcess { pid, uid }).collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            inv.run_dirs.push(name.clone());
            if reports
                && let Ok(uid) = Uid::parse(&name)
                && let Ok(report) = self.report(&uid).await
            {
                inv.vms.push(report);
            }
        }
        inv.taps = self
            .host
            .net
            .links()
            .await?
            .into_iter()
            .filter(|l| l.name.starts_with(TAP_PREFIX))
            .map(|l| l.name)
            .collect();
        let snaps = self.host.cfg.run_dir.snapshots();
        inv.snapshots = std::fs::read_dir(&snaps)
            .map_err(AgentError::io(format!("listing {}", snaps.display())))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // A copy being made (`.<uid>.copy`) goes with its snapshot.
            .filter(|name| !name.starts_with('.'))
            .collect();
        inv.spare_namespaces = u32::try_from(self.host.spares.ready()).unwrap_or(u32::MAX);
        inv.snapshots.sort();
        inv.run_dirs.sort();
        inv.sockets.sort();
        inv.taps.sort();
        inv.vmms.sort_by_key(|v| v.pid);
        Ok(inv)
    }

    /// Removes what the controller found unclaimed. Every name is checked
    /// again here: uids must be UUIDs, TAPs must carry the agent's prefix,
    /// sockets must be socket files inside the run directory.
    pub async fn collect(&self, req: &nexus_api::agent::Collect) -> Result<Vec<String>, AgentError> {
        let mut removed = Vec::new();
        for raw in &req.uids {
            self.remove_now(raw).await?;
            removed.push(format!("vm {raw}"));
        }
        for tap in &req.taps {
            let ok = tap.len() == TAP_PREFIX.len() + 12
                && tap.starts_with(TAP_PREFIX)
                && tap[TAP_PREFIX.len()..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return Err(AgentError::Invalid(format!("{tap:?} is not a TAP device this agent makes")));
            }
            if self.host.net.delete_link(tap).await? {
                removed.push(format!("tap {tap}"));
            }
        }
        for raw in &req.snapshots {
            if self.delete_snapshot(raw).await? {
                removed.push(format!("snapshot {raw}"));
            }
        }
        for raw in &req.sockets {
            use std::os::unix::fs::FileTypeExt;
            let path = Path::new(raw);
            let inside = path
                .parent()
                .and_then(|d| d.canonicalize().ok())
                .is_some_and(|d| d.starts_with(self.host.cfg.run_dir.root()));
            let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if !inside || !is_socket {
                return Err(AgentError::Forbidden(format!("{raw:?} is not a socket inside the run directory")));
            }
            // A warm VMM's, which no VM claims yet: the agent's own.
            if path.starts_with(self.host.cfg.run_dir.warm()) {
                continue;
            }
            std::fs::remove_file(path).map_err(AgentError::io(format!("removing {raw}")))?;
            removed.push(format!("socket {raw}"));
        }
        if !removed.is_empty() {
            tracing::info!(?removed, "garbage collected");
        }
        Ok(removed)
    }
}

/// Unix sockets under `root`, at most `depth` directories down, but not
/// under `skip`; symlinks are not followed.
fn sockets_under(root: &Path, depth: usize, skip: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, d)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_socket() {
                found.push(e.path().display().to_string());
            } else if ft.is_dir() && d < depth && e.path() != skip {
                stack.push((e.path(), d + 1));
            }
        }
    }
    found
}
