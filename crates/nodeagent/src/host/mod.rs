//! What the node's VMs share, and the host facilities each VM's owner
//! uses: networking ([`net`], [`nat`], [`ipam`], [`clonenet`]), process
//! confinement ([`cgroup`], [`scope`], [`jail`], [`process`], [`spawn`], [`forks`],
//! [`exits`]), files ([`disk`], [`images`], [`fetch`], [`dirwatch`],
//! [`locks`], [`volumes`]) and the host check ([`check`]).

pub mod cgroup;
pub mod check;
pub mod clonenet;
pub mod dirwatch;
pub mod disk;
pub mod exits;
pub mod fetch;
pub mod forks;
pub mod images;
pub mod ipam;
pub mod jail;
pub mod link_reaper;
pub mod locks;
pub mod nat;
pub mod net;
pub mod process;
pub mod scope;
pub mod space;
pub mod spares;
pub mod spawn;
pub mod volumes;
pub mod warm;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::error::AgentError;
use crate::paths::{RunDir, Uid, VmPaths};

/// Settings of the node's host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub run_dir: RunDir,
    pub bridge: String,
    pub bridge_address: Option<(std::net::Ipv4Addr, u8)>,
    pub firecracker: PathBuf,
    /// Time a VMM gets between SendCtrlAltDel/SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// systemd scopes for VMMs, where systemd runs the host; `None`: each
    /// VMM is a plain child in its own process group.
    pub scopes: Option<scope::Scopes>,
    /// cgroup v2 limits for VMMs that are not in systemd scopes.
    pub cgroups: Option<cgroup::Cgroups>,
    /// Where kernels and disks may be opened.
    pub image_roots: images::ImageRoots,
    /// The user ids VMMs run as, one per VM.
    pub vmm_uids: std::ops::RangeInclusive<u32>,
    /// The apiserver, for Image files uploaded there (`None`: only Images
    /// with a URL source can be downloaded).
    pub api: Option<nexus_client::Client>,
    /// Network namespaces kept ready for restored VMs ([`spares`]).
    pub spare_netns: usize,
}

/// The node's facilities, shared by every VM's owner: its settings, its
/// netlink handle and bridge, the VMMs' users, processes and jails, image
/// checks and downloads, and the notices of VMMs that ended unasked.
#[derive(Debug)]
pub struct Host {
    pub cfg: HostConfig,
    pub net: net::Net,
    pub exits: Arc<exits::Exits>,
    /// Whether the run directory's filesystem supports reflinks.
    pub reflink: bool,
    /// Checks images against the checksums their Images name.
    pub verifier: images::Verifier,
    /// Downloads images this node lacks or holds a bad copy of.
    pub fetcher: fetch::Fetcher,
    /// The VMMs' user ids.
    pub users: Arc<jail::Users>,
    /// Tells this agent's VMMs from other processes.
    pub vmms: process::Vmms,
    /// The root every VMM of the node sees.
    pub skeleton: jail::Skeleton,
    /// Held while a snapshot's files are written, read or removed.
    pub snapshot_files: locks::KeyedLocks,
    /// Held while a volume is made or removed.
    pub volume_files: locks::KeyedLocks,
    /// Network namespaces ready for restored VMs.
    pub spares: spares::Spares,
    /// Held while a guest address is chosen and recorded, so that VMs
    /// started at once never take the same one.
    pub addresses: std::sync::Mutex<()>,
    /// The bridge's index as last ensured (0: not yet).
    bridge: AtomicU32,
    /// How many times a VM's `vm.json` was written.
    config_writes: std::sync::atomic::AtomicU64,
}

impl Host {
    /// Ends VMM `pid` of VM `uid` (SIGTERM, then SIGKILL after `grace`)
    /// as the agent's own doing: its end is not reported as a VMM that
    /// ended unasked (which would wake the VM's controller at once,
    /// whatever its backoff).
    pub async fn stop_vmm(&self, pid: u32, uid: &str, grace: Duration) {
        if self.vmms.is_vmm(pid, uid) {
            self.exits.expect(pid);
        }
        self.vmms.stop(pid, uid, grace).await;
    }

    /// The host `cfg` describes, its jails' skeleton made (or tried).
    pub fn new(cfg: HostConfig, net: net::Net) -> Self {
        let reflink = disk::supports_reflink(&cfg.run_dir.vms());
        tracing::info!(
            run_dir = %cfg.run_dir.root().display(),
            disk_clone = if reflink { "reflink" } else { "copy" },
            "VM disks are made by {}",
            if reflink { "reflink (constant time)" } else { "sparse copy (the filesystem has no reflinks)" }
        );
        let dynamic = jail::is_dynamic(&cfg.firecracker).unwrap_or(true);
        // Checked whole once per start; VM starts only look for its marker.
        let skeleton = jail::Skeleton { dir: cfg.run_dir.jail_skeleton(), dynamic };
        if let Err(e) = skeleton.make() {
            tracing::warn!(dir = %skeleton.dir.display(), error = %e, "cannot make the jails' skeleton yet");
        }
        tracing::info!(
            binary = %cfg.firecracker.display(),
            dynamic,
            uids = ?cfg.vmm_uids,
            "VMMs run jailed, each as its own user"
        );
        let spares = spares::Spares::new(if cfg.bridge_address.is_some() { cfg.spare_netns } else { 0 });
        warm::end_leftovers(&cfg.run_dir);
        Host {
            users: Arc::new(jail::Users::new(cfg.vmm_uids.clone(), &cfg.run_dir.vms())),
            vmms: process::Vmms::new(&cfg.run_dir, &cfg.firecracker),
            fetcher: fetch::Fetcher::new(cfg.api.clone()),
            skeleton,
            cfg,
            net,
            exits: Default::default(),
            reflink,
            verifier: Default::default(),
            snapshot_files: Default::default(),
            addresses: Default::default(),
            volume_files: Default::default(),
            spares,
            bridge: Default::default(),
            config_writes: Default::default(),
        }
    }

    /// Notes that a VM's `vm.json` was written or its kept-down mark made
    /// or removed (what the node's allocation is read from).
    pub fn config_written(&self) {
        self.config_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times a VM's `vm.json` or kept-down mark changed so far.
    pub fn config_writes(&self) -> u64 {
        self.config_writes.load(Ordering::Relaxed)
    }

    /// Removes the spare network namespaces (the agent is stopping).
    pub async fn clear_spares(&self) {
        self.spares.clear(&self.net).await;
    }

    /// Makes spare network namespaces, in the background, until as many
    /// as configured are ready, starting [`spares::REFILL_AFTER`] from now
    /// (after the start that took one has been reported: making one takes
    /// the CPU that start and its report need).
    pub fn refill_spares(self: &Arc<Self>) {
        let host = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(spares::REFILL_AFTER).await;
            let launcher = host.warm_launcher();
            host.spares.fill(&host.net, |n, ns| start_warm(launcher.clone(), n, ns)).await
        });
    }

    /// What starting a warm VMM needs.
    fn warm_launcher(&self) -> warm::Launcher {
        warm::Launcher {
            run: self.cfg.run_dir.clone(),
            skeleton: self.skeleton.clone(),
            binary: self.cfg.firecracker.clone(),
            users: self.users.clone(),
            exits: self.exits.clone(),
        }
    }

    /// Creates the bridge (and its address) if missing.
    pub async fn ensure_bridge(&self) -> Result<u32, AgentError> {
        let index = self.net.ensure_bridge(&self.cfg.bridge, self.cfg.bridge_address).await?;
        self.bridge.store(index, Ordering::Relaxed);
        Ok(index)
    }

    /// The bridge's index: one lookup while the bridge is the one this
    /// agent last made or found and is up; made again (with its address)
    /// when it is missing, was replaced or is down.
    pub async fn bridge_index(&self) -> Result<u32, AgentError> {
        let known = self.bridge.load(Ordering::Relaxed);
        if known != 0 && self.net.link(&self.cfg.bridge).await?.is_some_and(|l| l.index == known && l.up) {
            return Ok(known);
        }
        self.ensure_bridge().await
    }

    /// The bridge, and NAT from its subnet to the uplink when it has an address.
    pub async fn ensure_network(&self) -> Result<(), AgentError> {
        self.ensure_bridge().await?;
        if let Some((ip, len)) = self.cfg.bridge_address {
            let fw = nat::detect();
            nat::ensure_masquerade(fw, &self.cfg.bridge, ip, len).await.map_err(|e| AgentError::Io {
                what: "setting up NAT".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            tracing::info!(firewall = ?fw, bridge = %self.cfg.bridge, "NAT to the uplink ready");
        }
        Ok(())
    }

    /// Whether the node can run VMs now: its bridge is up and its run
    /// directory writable. The reason when not.
    pub async fn readiness(&self) -> Result<(), String> {
        match self.net.link(&self.cfg.bridge).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("bridge {} is missing", self.cfg.bridge)),
            Err(e) => return Err(format!("cannot read the links: {e}")),
        }
        let probe = self.cfg.run_dir.root().join(".ready-probe");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| format!("the run directory {} is not writable: {e}", self.cfg.run_dir.root().display()))
    }

    /// VM `uid`'s paths, refusing a run-directory entry that is not a plain
    /// directory (a symlink planted there must never be followed).
    pub fn paths(&self, uid: &Uid) -> Result<VmPaths, AgentError> {
        let paths = self.cfg.run_dir.vm(uid);
        match std::fs::symlink_metadata(&paths.dir) {
            Ok(m) if !m.file_type().is_dir() => Err(AgentError::Forbidden(format!(
                "{} is not a directory the agent made; remove it by hand",
                paths.dir.display()
            ))),
            _ => Ok(paths),
        }
    }

    /// The node's VM subnet: the bridge's address and prefix.
    pub fn subnet(&self) -> Option<ipam::Subnet> {
        self.cfg.bridge_address.map(|(gateway, len)| ipam::Subnet { gateway, len })
    }

    /// How this node makes VM disks: `reflink` where the run directory's
    /// filesystem clones files in constant time, else `copy`.
    pub fn disk_clone(&self) -> &'static str {
        if self.reflink { "reflink" } else { "copy" }
    }
}

/// Starts warm VMM `n` in namespace `ns` on a blocking thread (it forks);
/// `None`, logged, when it cannot be started (the spare is used without).
async fn start_warm(launcher: warm::Launcher, n: u64, ns: std::os::fd::OwnedFd) -> Option<warm::Warm> {
    let started = tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        launcher.start(n, ns.as_raw_fd()).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    started.inspect_err(|error| tracing::warn!(%error, "starting a warm VMM failed")).ok()
}
