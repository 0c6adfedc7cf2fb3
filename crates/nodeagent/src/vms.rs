//! The VM runtime: realises an `EnsureVm` on this host (run dir, TAP, VMM
//! process, Firecracker configuration) and tears it down again. Every
//! operation is idempotent and serialised per VM, so a retry after a
//! timeout or an agent crash is always safe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use nexus_api::PowerState;
use nexus_api::agent::{EnsureVm, Inventory, ObservedState, VmReport};
use tokio::sync::Mutex;

use crate::disk;
use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::firecracker::models::{self, InstanceState, VmState};
use crate::net::Net;
use crate::paths::{RunDir, TAP_PREFIX, Uid, VmPaths};
use crate::process;

/// How long a new VMM gets to open its API socket.
pub const SOCKET_WAIT: Duration = Duration::from_secs(5);

/// Settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub run_dir: RunDir,
    pub bridge: String,
    pub bridge_address: Option<(std::net::Ipv4Addr, u8)>,
    pub firecracker: PathBuf,
    /// Time a VMM gets between SendCtrlAltDel/SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// systemd scopes for VMMs, where systemd runs the host; `None`: each
    /// VMM is a plain child in its own process group.
    pub scopes: Option<crate::scope::Scopes>,
    /// cgroup v2 limits for VMMs that are not in systemd scopes.
    pub cgroups: Option<crate::cgroup::Cgroups>,
    /// Where kernels and disks may be opened.
    pub image_roots: crate::images::ImageRoots,
    /// The user ids VMMs run as, one per VM.
    pub vmm_uids: std::ops::RangeInclusive<u32>,
    /// The apiserver, for Image files uploaded there (`None`: only Images
    /// with a URL source can be downloaded).
    pub api: Option<nexus_client::Client>,
}

/// Owns every VM on this host.
#[derive(Debug)]
pub struct Runtime {
    cfg: RuntimeConfig,
    net: Net,
    locks: Mutex<HashMap<Uid, Arc<Mutex<()>>>>,
    exits: Arc<crate::exits::Exits>,
    /// Whether the run directory's filesystem supports reflinks.
    reflink: bool,
    /// Checks images against the checksums their Images name.
    verifier: crate::images::Verifier,
    /// Downloads images this node lacks or holds a bad copy of.
    fetcher: crate::fetch::Fetcher,
    /// The VMs' metrics, sampled by `collect_metrics`.
    metrics: crate::vm_metrics::Collector,
    /// The VMMs' user ids.
    users: crate::jail::Users,
    /// Tells this agent's VMMs from other processes.
    vmms: process::Vmms,
    /// The root every VMM of the node sees.
    skeleton: crate::jail::Skeleton,
    /// The VMs' readiness probes.
    probes: crate::probe::Probes,
    /// The bridge's index as last ensured (0: not yet).
    bridge: std::sync::atomic::AtomicU32,
}

impl Runtime {
    pub fn new(cfg: RuntimeConfig, net: Net) -> Self {
        let reflink = disk::supports_reflink(&cfg.run_dir.vms());
        tracing::info!(
            run_dir = %cfg.run_dir.root().display(),
            disk_clone = if reflink { "reflink" } else { "copy" },
            "VM disks are made by {}",
            if reflink { "reflink (constant time)" } else { "sparse copy (the filesystem has no reflinks)" }
        );
        let dynamic = crate::jail::is_dynamic(&cfg.firecracker).unwrap_or(true);
        // Checked whole once per start; VM starts only look for its marker.
        let skeleton = crate::jail::Skeleton { dir: cfg.run_dir.jail_skeleton(), dynamic };
        if let Err(e) = skeleton.make() {
            tracing::warn!(dir = %skeleton.dir.display(), error = %e, "cannot make the jails' skeleton yet");
        }
        tracing::info!(
            binary = %cfg.firecracker.display(),
            dynamic,
            uids = ?cfg.vmm_uids,
            "VMMs run jailed, each as its own user"
        );
        Self {
            users: crate::jail::Users::new(cfg.vmm_uids.clone(), &cfg.run_dir.vms()),
            vmms: process::Vmms::new(&cfg.run_dir, &cfg.firecracker),
            fetcher: crate::fetch::Fetcher::new(cfg.api.clone()),
            skeleton,
            cfg,
            net,
            locks: Mutex::new(HashMap::new()),
            exits: Default::default(),
            reflink,
            verifier: Default::default(),
            metrics: Default::default(),
            probes: Default::default(),
            bridge: Default::default(),
        }
    }

    /// Has every running VMM write its metrics, then samples them and the
    /// host (see `vm_metrics`).
    pub async fn collect_metrics(&self) {
        let live = self.running_vmms();
        for uid in live.keys() {
            if let Ok(uid) = Uid::parse(uid) {
                self.flush_metrics(&uid).await;
            }
        }
        self.metrics.sample(&self.cfg.run_dir, &live);
    }

    /// The VMMs of this agent's VMs, as VM uid → pid: each VM directory's
    /// pid file, where that process is the VM's VMM. It costs a look at
    /// this agent's VMs, not at every process on the host; a VMM whose
    /// launch was cut short before its pid was recorded is not in it.
    fn running_vmms(&self) -> HashMap<String, u32> {
        let Ok(entries) = std::fs::read_dir(self.cfg.run_dir.vms()) else { return HashMap::new() };
        entries
            .flatten()
            .filter_map(|entry| {
                let uid = entry.file_name().into_string().ok()?;
                let pid = read_pid(&VmPaths { dir: entry.path() })?;
                self.vmms.is_vmm(pid, &uid).then_some((uid, pid))
            })
            .collect()
    }

    /// What was collected of the VMs and the host.
    pub fn vm_metrics(&self) -> &crate::vm_metrics::Collector {
        &self.metrics
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

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// VMMs that ended without being stopped, for the heartbeat.
    pub fn exits(&self) -> &crate::exits::Exits {
        &self.exits
    }

    /// Creates the bridge (and its address) if missing.
    pub async fn ensure_bridge(&self) -> Result<u32, AgentError> {
        let index = self.net.ensure_bridge(&self.cfg.bridge, self.cfg.bridge_address).await?;
        self.bridge.store(index, std::sync::atomic::Ordering::Relaxed);
        Ok(index)
    }

    /// The bridge's index: one lookup while the bridge is the one this
    /// agent last made or found and is up; made again (with its address)
    /// when it is missing, was replaced or is down.
    async fn bridge_index(&self) -> Result<u32, AgentError> {
        let known = self.bridge.load(std::sync::atomic::Ordering::Relaxed);
        if known != 0 && self.net.link(&self.cfg.bridge).await?.is_some_and(|l| l.index == known && l.up) {
            return Ok(known);
        }
        self.ensure_bridge().await
    }

    /// The bridge, and NAT from its subnet to the uplink when it has an address.
    pub async fn ensure_network(&self) -> Result<(), AgentError> {
        self.ensure_bridge().await?;
        if let Some((ip, len)) = self.cfg.bridge_address {
            let fw = crate::nat::detect();
            crate::nat::ensure_masquerade(fw, &self.cfg.bridge, ip, len).await.map_err(|e| AgentError::Io {
                what: "setting up NAT".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            tracing::info!(firewall = ?fw, bridge = %self.cfg.bridge, "NAT to the uplink ready");
        }
        Ok(())
    }

    /// The VM's paths for read-only callers (logs, metrics); see `paths`.
    pub fn vm_paths(&self, uid: &Uid) -> Result<VmPaths, AgentError> {
        self.paths(uid)
    }

    /// The VM's paths, refusing a run-directory entry that is not a plain
    /// directory (a symlink planted there must never be followed).
    fn paths(&self, uid: &Uid) -> Result<VmPaths, AgentError> {
        let paths = self.cfg.run_dir.vm(uid);
        match std::fs::symlink_metadata(&paths.dir) {
            Ok(m) if !m.file_type().is_dir() => Err(AgentError::Forbidden(format!(
                "{} is not a directory the agent made; remove it by hand",
                paths.dir.display()
            ))),
            _ => Ok(paths),
        }
    }

    async fn lock(&self, uid: &Uid) -> Arc<Mutex<()>> {
        self.locks.lock().await.entry(uid.clone()).or_default().clone()
    }

    /// Brings VM `req.uid` to `req.state` and reports what is there.
    pub async fn ensure(&self, req: &EnsureVm) -> Result<VmReport, AgentError> {
        let uid = Uid::parse(&req.uid)?;
        validate(req)?;
        let lock = self.lock(&uid).await;
        let _held = lock.lock().await;
        let paths = self.paths(&uid)?;
        let vmms = &self.vmms;
        if let Some(from) = &req.restore
            && req.state != PowerState::Stopped
            && !read_pid(&paths).is_some_and(|pid| vmms.is_vmm(pid, uid.as_str()))
        {
            // A VMM is about to start from it: refuse before making anything.
            crate::snapshots::source(&self.cfg.run_dir, from)?;
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&paths.dir)
                .map_err(AgentError::io(format!("creating {}", paths.dir.display())))?;
        }
        let config = serde_json::to_vec_pretty(req).unwrap_or_default();
        // Rewritten only when it changed: most calls are rechecks.
        if std::fs::read(paths.config()).ok().as_deref() != Some(config.as_slice()) {
            std::fs::write(paths.config(), config).map_err(AgentError::io("writing vm.json"))?;
        }
        if req.state == PowerState::Stopped {
            self.stop_vmm(&uid, &paths).await;
            self.net.delete_link(&uid.tap_name()).await?;
            // A stop ends a kept-down exit: the next start is a fresh one.
            remove_if_exists(&paths.kept_down())?;
            return self.observe(&uid).await;
        }
        if paths.kept_down().exists() {
            return self.observe(&uid).await;
        }
        let client = FcClient::new(paths.socket());
        let mut info = None;
        let recorded = read_pid(&paths);
        match recorded.filter(|pid| vmms.is_vmm(*pid, uid.as_str())) {
            Some(pid) => match client.describe_instance().await {
                Ok(i) if i.state != InstanceState::NotStarted => info = Some(i),
                // A booted VMM that does not answer may be on its way out (a
                // guest powering off) or stuck: killing it would hide an
                // exit the restart policy must see. Report; the caller
                // comes back, and by then it answers or it has ended.
                Err(source) if paths.started().exists() => {
                    return Err(AgentError::Firecracker { step: "describe the running VMM", source });
                }
                // Configured halfway (the agent died mid-create): start over.
                _ => vmms.stop(pid, uid.as_str(), Duration::ZERO).await,
            },
            // It booted, and its process ended without being asked to.
            None if recorded.is_some() && paths.started().exists() => {
                let pid = recorded.unwrap_or_default();
                if !self.ended_on_its_own(&uid, &paths, pid, req.restart_policy).await? {
                    return self.observe(&uid).await;
                }
            }
            None => {}
        }
        let info = match info {
            Some(i) => i,
            None => self.start(&uid, &paths, req, &client).await?,
        };
        let change = match (req.state, info.state) {
            (PowerState::Paused, InstanceState::Running) => Some((VmState::Paused, "pause", InstanceState::Paused)),
            (PowerState::Running, InstanceState::Paused) => Some((VmState::Resumed, "resume", InstanceState::Running)),
            _ => None,
        };
        let state = match change {
            Some((to, step, after)) => {
                client.set_vm_state(to).await.map_err(|source| AgentError::Firecracker { step, source })?;
                after
            }
            None => info.state,
        };
        // The VMM has just said what state it is in: not asked again.
        self.observe_knowing(&uid, Some(state)).await
    }

    /// Records how VMM `pid` of `uid` ended on its own and applies `policy`:
    /// returns whether to start it again. When not, the VM is kept down
    /// (its TAP and socket go; its directory, disk and logs stay) until a
    /// stop is asked for.
    async fn ended_on_its_own(
        &self,
        uid: &Uid,
        paths: &VmPaths,
        pid: u32,
        policy: nexus_api::vm::RestartPolicy,
    ) -> Result<bool, AgentError> {
        let exit = process::reaped(&paths.reaped(), pid, Duration::from_millis(500)).await;
        let recorded = exit.clone().unwrap_or(nexus_api::vm::VmExit { code: None, signal: None, at: None });
        std::fs::write(paths.last_exit(), serde_json::to_vec(&recorded).unwrap_or_default())
            .map_err(AgentError::io("recording the VMM's exit"))?;
        let again = policy.restarts(exit.as_ref());
        tracing::info!(uid = %uid, pid, exit = %recorded, ?policy, restart = again, "VMM ended on its own");
        if again {
            let restarts = read_restarts(paths) + 1;
            std::fs::write(paths.restarts(), restarts.to_string()).map_err(AgentError::io("counting restarts"))?;
            return Ok(true);
        }
        std::fs::write(paths.kept_down(), b"").map_err(AgentError::io("marking the VM kept down"))?;
        remove_if_exists(&paths.pid())?;
        remove_if_exists(&paths.socket())?;
        self.net.delete_link(&uid.tap_name()).await?;
        Ok(false)
    }

    /// Starts a fresh VMM for `uid` and configures and boots it.
    async fn start(
        &self,
        uid: &Uid,
        paths: &VmPaths,
        req: &EnsureVm,
        client: &FcClient,
    ) -> Result<models::InstanceInfo, AgentError> {
        self.stop_vmm(uid, paths).await;
        remove_if_exists(&paths.socket())?;
        // Until it has booted, this VMM has not "run and ended".
        remove_if_exists(&paths.started())?;
        // Checked before anything is made for it.
        let restore = req.restore.as_ref().map(|from| crate::snapshots::source(&self.cfg.run_dir, from)).transpose()?;
        let (kernel, initrd) = match restore {
            Some(_) => (None, None),
            None => {
                remove_if_exists(&paths.restored())?;
                let (kernel, initrd) = self.check_images(req).await?;
                (Some(kernel), initrd)
            }
        };
        let user = self.users.user_of(paths)?;
        let jail = crate::jail::Jail {
            root: paths.jail(),
            skeleton: self.skeleton.clone(),
            uid: user,
            gid: user,
            binary: self.cfg.firecracker.clone(),
            kernel,
            initrd,
        };
        jail.prepare()?;
        // The VMM starts while its TAP and disk are made: it needs them only
        // when configured, after its API socket is up.
        std::fs::write(paths.launching(), b"").map_err(AgentError::io("marking the launch"))?;
        // The readiness probe reads this VMM's console from here on.
        let console_at = std::fs::metadata(paths.console()).map(|m| m.len()).unwrap_or(0);
        std::fs::write(paths.console_offset(), console_at.to_string())
            .map_err(AgentError::io("recording the console's length"))?;
        let launched = Instant::now();
        // The fork and the jail's set-up run on a blocking thread while this
        // task makes the TAP and the disk. The pid file is written there
        // too, so a request cut short (its caller gone) still leaves the
        // VMM recorded.
        let launch = {
            let (jail, who, paths) = (jail.clone(), uid.to_string(), paths.clone());
            let exits = self.exits.clone();
            let own_netns = restore.is_some();
            tokio::task::spawn_blocking(move || -> Result<u32, AgentError> {
                let ended = {
                    let who = who.clone();
                    move |pid| exits.record(&who, pid)
                };
                let pid = process::launch(&jail, &who, &paths.console(), paths.reaped(), own_netns, ended)?;
                std::fs::write(paths.pid(), pid.to_string()).map_err(AgentError::io("writing the pid file"))?;
                remove_if_exists(&paths.launching())?;
                Ok(pid)
            })
        };
        let (pid, made) = tokio::join!(launch, self.make_tap_and_disk(uid, paths, req, restore.as_ref(), user));
        let pid = pid.map_err(|e| AgentError::Io {
            what: "launching the VMM".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
        tracing::info!(
            uid = %uid,
            vm = %req.display_name,
            pid,
            scoped = self.cfg.scopes.is_some(),
            launch_ms = launched.elapsed().as_secs_f64() * 1000.0,
            "VMM launched"
        );
        let socket_wait = async {
            wait_for_socket(client, pid, uid.as_str(), &self.vmms).await?;
            Ok(launched.elapsed())
        };
        let prepared = match made {
            Ok(bridge) => tokio::try_join!(self.prepare(uid, paths, req, restore.as_ref(), pid, &jail), socket_wait)
                .map(|(prepared, answered)| (bridge, prepared, answered)),
            Err(e) => Err(e),
        };
        let (bridge, (addresses, req), answered) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                self.vmms.stop(pid, uid.as_str(), Duration::ZERO).await;
                return Err(e);
            }
        };
        let tap = uid.tap_name();
        let req = &req;
        let configured = match &restore {
            Some(_) => match crate::clonenet::setup(&self.net, pid, uid, bridge, addresses, (user, user)).await {
                Ok(()) => match configure_observability(client).await {
                    Ok(()) => crate::snapshots::load(client, &tap).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.into()),
            },
            None => configure(client, req, &tap).await,
        };
        if let Err(e) = configured {
            self.vmms.stop(pid, uid.as_str(), Duration::ZERO).await;
            return Err(e);
        }
        let boot_millis = launched.elapsed().as_millis() as u64;
        tracing::info!(
            uid = %uid,
            socket_ms = answered.as_secs_f64() * 1000.0,
            configure_ms = (launched.elapsed() - answered).as_secs_f64() * 1000.0,
            "VMM booted"
        );
        let started = format!("{}\n{boot_millis}\n", Utc::now().to_rfc3339());
        std::fs::write(paths.started(), started).map_err(AgentError::io("writing the start record"))?;
        client.describe_instance().await.map_err(|source| AgentError::Firecracker { step: "describe", source })
    }

    /// What a new VMM needs besides itself that does not depend on its
    /// process, made while it is launched: the bridge and the VM's TAP (a
    /// restored VM's TAP is made later, inside the VMM's own namespace) and
    /// its private disk. Returns the bridge's index.
    async fn make_tap_and_disk(
        &self,
        uid: &Uid,
        paths: &VmPaths,
        req: &EnsureVm,
        restore: Option<&(crate::paths::SnapshotPaths, nexus_api::agent::SnapshotReport)>,
        user: u32,
    ) -> Result<u32, AgentError> {
        let began = Instant::now();
        let bridge = self.bridge_index().await?;
        let tap = uid.tap_name();
        match restore {
            Some(_) => {
                self.net.delete_link(&tap).await?;
            }
            None => {
                self.net.ensure_tap(&tap, bridge, (user, user)).await?;
            }
        }
        let copy_started = Instant::now();
        let method = match restore {
            // The snapshot's disk, taken with its memory, is the VM's disk.
            Some((snap, _)) => disk::ensure_disk(snap.rootfs(), paths.rootfs())
                .await
                .map_err(AgentError::io("copying the snapshot's disk"))?,
            None => disk::ensure_disk(PathBuf::from(&req.rootfs_path), paths.rootfs())
                .await
                .map_err(AgentError::io(format!("copying rootfs {}", req.rootfs_path)))?,
        };
        tracing::info!(
            uid = %uid,
            ?method,
            network_ms = (copy_started - began).as_secs_f64() * 1000.0,
            copy_ms = copy_started.elapsed().as_secs_f64() * 1000.0,
            "disk ready"
        );
        Ok(bridge)
    }

    /// The rest of what a new VMM needs, once it runs: its systemd scope or
    /// cgroup, its disk, log and metrics files linked into its jail and its
    /// address (written into the request's boot arguments). Returns a
    /// restored VM's addresses and the request to configure the VMM with.
    async fn prepare(
        &self,
        uid: &Uid,
        paths: &VmPaths,
        req: &EnsureVm,
        restore: Option<&(crate::paths::SnapshotPaths, nexus_api::agent::SnapshotReport)>,
        pid: u32,
        jail: &crate::jail::Jail,
    ) -> Result<(Option<crate::clonenet::Addresses>, EnsureVm), AgentError> {
        use crate::jail::inside;
        if let Some(scopes) = &self.cfg.scopes {
            scopes.adopt(uid, pid, &format!("nexus VM {}", req.display_name)).await.map_err(|e| AgentError::Io {
                what: "placing the VMM in its systemd scope".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        } else if let Some(cg) = &self.cfg.cgroups {
            cg.confine(uid, pid, req.vcpu, req.mem_mib).map_err(AgentError::io("placing the VMM in its cgroup"))?;
        }
        for (file, inside) in [(paths.log(), inside::LOG), (paths.metrics(), inside::METRICS)] {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
                .map_err(AgentError::io(format!("creating {}", file.display())))?;
            jail.link(&file, inside)?;
        }
        jail.link(&paths.rootfs(), inside::ROOTFS)?;
        if let Some((snap, _)) = restore {
            jail.link_read_only(&snap.state(), inside::SNAPSHOT_STATE)?;
            jail.link_read_only(&snap.memory(), inside::SNAPSHOT_MEM)?;
        }
        let mut req = req.clone();
        // A restored guest keeps its source's address; the VM gets one of
        // its own on the bridge, joined to the guest's by NAT.
        let addresses = match restore {
            Some((_, report)) => match (report.ip.as_deref().and_then(|ip| ip.parse().ok()), self.subnet()) {
                (Some(guest), Some(subnet)) => self
                    .assign_ip(uid, paths, Some("auto"))?
                    .map(|own| crate::clonenet::Addresses { guest, own, subnet }),
                _ => {
                    self.assign_ip(uid, paths, None)?;
                    None
                }
            },
            None => {
                if let Some(ip) = self.assign_ip(uid, paths, req.ip.as_deref())? {
                    let subnet = self.subnet().expect("an address implies a subnet");
                    req.boot_args = format!("{} {}", req.boot_args, subnet.kernel_arg(ip));
                }
                None
            }
        };
        if let Some((_, report)) = restore {
            let record = crate::paths::Restored {
                snapshot_uid: report.uid.clone(),
                mac: report.mac.clone(),
                guest_ip: report.ip.as_deref().and_then(|ip| ip.parse().ok()),
            };
            std::fs::write(paths.restored(), serde_json::to_vec(&record).unwrap_or_default())
                .map_err(AgentError::io("recording the VM's origin"))?;
        }
        Ok((addresses, req))
    }

    /// Confines the kernel and root filesystem to the image roots and checks
    /// them against their Images' checksums, before a VMM opens them.
    /// Returns the kernel's and the initrd's paths on the host.
    async fn check_images(&self, req: &EnsureVm) -> Result<(PathBuf, Option<PathBuf>), AgentError> {
        let kernel =
            self.image("kernel", &req.kernel_path, req.kernel_sha256.as_deref(), req.kernel_source.as_deref()).await?;
        self.image("rootfs", &req.rootfs_path, req.rootfs_sha256.as_deref(), req.rootfs_source.as_deref()).await?;
        let initrd = match &req.initrd_path {
            Some(path) => {
                Some(self.image("initrd", path, req.initrd_sha256.as_deref(), req.initrd_source.as_deref()).await?)
            }
            None => None,
        };
        Ok((kernel, initrd))
    }

    /// The image at `path`, confined and checked; one with a source that
    /// is missing here or does not match `sha256` is downloaded first.
    async fn image(
        &self,
        field: &str,
        path: &str,
        sha256: Option<&str>,
        source: Option<&str>,
    ) -> Result<PathBuf, AgentError> {
        let roots = &self.cfg.image_roots;
        let (Some(sum), Some(source)) = (sha256, source) else {
            let real = roots.check(field, path)?;
            if let Some(sum) = sha256 {
                self.verifier.verify(field, &real, sum).await?;
            }
            return Ok(real);
        };
        let _held = self.fetcher.hold(Path::new(path)).await;
        if std::fs::symlink_metadata(path).is_ok() {
            let real = roots.check(field, path)?;
            match self.verifier.verify(field, &real, sum).await {
                Ok(()) => return Ok(real),
                Err(AgentError::ImageInvalid(why)) => {
                    tracing::warn!(field, path, %why, "this node's copy of the image is corrupt; downloading it again");
                }
                Err(e) => return Err(e),
            }
        }
        let target = roots.target(field, path)?;
        self.fetcher.fetch(field, &target, source, sum).await?;
        let real = roots.check(field, path)?;
        self.verifier.verify(field, &real, sum).await?;
        Ok(real)
    }

    /// Takes snapshot `snap` of the VM the request names (see
    /// `snapshots::create`), as the VM's owner.
    pub async fn snapshot(
        &self,
        raw_snap: &str,
        req: &nexus_api::agent::SnapshotRequest,
    ) -> Result<nexus_api::agent::SnapshotReport, AgentError> {
        let snap = Uid::parse(raw_snap)?;
        let vm = Uid::parse(&req.vm_uid)?;
        let snap_lock = self.lock(&snap).await;
        let _snap_held = snap_lock.lock().await;
        let lock = self.lock(&vm).await;
        let _held = lock.lock().await;
        let paths = self.paths(&vm)?;
        crate::snapshots::create(&self.cfg.run_dir, &vm, &paths, &snap, req.resume_after).await
    }

    /// Snapshot `snap`, when it is complete on this node.
    pub async fn snapshot_report(&self, raw_snap: &str) -> Result<nexus_api::agent::SnapshotReport, AgentError> {
        let snap = Uid::parse(raw_snap)?;
        let lock = self.lock(&snap).await;
        let _held = lock.lock().await;
        crate::snapshots::completed(&self.cfg.run_dir.snapshot(&snap))
            .ok_or_else(|| AgentError::NotFound(format!("no complete snapshot {snap} on this node")))
    }

    /// Removes snapshot `snap`'s files (VMs restored from it keep running:
    /// their memory is theirs once loaded).
    pub async fn delete_snapshot(&self, raw_snap: &str) -> Result<bool, AgentError> {
        let snap = Uid::parse(raw_snap)?;
        let lock = self.lock(&snap).await;
        let removed = {
            let _held = lock.lock().await;
            crate::snapshots::delete(&self.cfg.run_dir, &snap)?
        };
        self.locks.lock().await.remove(&snap);
        Ok(removed)
    }

    /// How this node makes VM disks: `reflink` where the run directory's
    /// filesystem clones files in constant time, else `copy`.
    pub fn disk_clone(&self) -> &'static str {
        if self.reflink { "reflink" } else { "copy" }
    }

    /// The node's VM subnet: the bridge's address and prefix.
    pub fn subnet(&self) -> Option<crate::ipam::Subnet> {
        self.cfg.bridge_address.map(|(gateway, len)| crate::ipam::Subnet { gateway, len })
    }

    /// The guest address of VM `uid`: the one it already has, else a new one
    /// (recorded in its run directory). `None` when it asked for none.
    fn assign_ip(
        &self,
        uid: &Uid,
        paths: &VmPaths,
        request: Option<&str>,
    ) -> Result<Option<std::net::Ipv4Addr>, AgentError> {
        let Some(request) = request else {
            let _ = std::fs::remove_file(paths.ip());
            return Ok(None);
        };
        if let Some(current) = read_ip(paths)
            && (request == "auto" || request == current.to_string())
        {
            return Ok(Some(current));
        }
        let mut used = std::collections::BTreeSet::new();
        for entry in
            std::fs::read_dir(self.cfg.run_dir.vms()).map_err(AgentError::io("listing VM directories"))?.flatten()
        {
            if entry.file_name().to_string_lossy() == uid.as_str() {
                continue;
            }
            if let Some(ip) = read_ip(&VmPaths { dir: entry.path() }) {
                used.insert(ip);
            }
        }
        let ip = crate::ipam::assign(self.subnet(), uid.as_str(), request, &used)
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        std::fs::write(paths.ip(), ip.to_string()).map_err(AgentError::io("recording the guest address"))?;
        Ok(Some(ip))
    }

    /// vCPUs, memory and count of the VMs meant to run here (not Stopped,
    /// not kept down after their VMM ended).
    pub fn allocation(&self) -> nexus_api::node::NodeAllocation {
        let mut total = nexus_api::node::NodeAllocation::default();
        let Ok(entries) = std::fs::read_dir(self.cfg.run_dir.vms()) else { return total };
        for entry in entries.flatten() {
            let Some(cfg) = std::fs::read(entry.path().join("vm.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<EnsureVm>(&b).ok())
            else {
                continue;
            };
            let kept_down = VmPaths { dir: entry.path() }.kept_down().exists();
            if cfg.state != PowerState::Stopped && !kept_down {
                total.vcpu += u32::from(cfg.vcpu);
                total.mem_mib += u64::from(cfg.mem_mib);
                total.vms += 1;
            }
        }
        total
    }

    /// Stops the VM's VMM, removes its TAP and its run directory.
    pub async fn remove(&self, raw_uid: &str) -> Result<VmReport, AgentError> {
        let uid = Uid::parse(raw_uid)?;
        let lock = self.lock(&uid).await;
        {
            let _held = lock.lock().await;
            let paths = self.paths(&uid)?;
            self.stop_vmm(&uid, &paths).await;
            if let Some(scopes) = &self.cfg.scopes
                && let Err(e) = scopes.stop(&uid).await
            {
                tracing::warn!(uid = %uid, error = %e, "stopping the VM's scope failed");
            }
            if let Some(cg) = &self.cfg.cgroups
                && let Err(e) = cg.remove(&uid)
            {
                tracing::warn!(uid = %uid, error = %e, "removing the VM's cgroup failed");
            }
            self.net.delete_link(&uid.tap_name()).await?;
            self.net.delete_link(&crate::clonenet::veth_name(&uid)).await?;
            self.users.release(&paths);
            remove_dir_all_settled(&paths.dir).await?;
            self.probes.forget(uid.as_str());
        }
        self.locks.lock().await.remove(&uid);
        Ok(absent(&uid))
    }

    /// Stops every VMM of this VM: the one in the pid file and any a crash
    /// left unrecorded.
    async fn stop_vmm(&self, uid: &Uid, paths: &VmPaths) {
        // Only a launch cut short leaves a VMM its pid file does not name:
        // the host's processes are searched then, not on every start.
        let mut pids: Vec<u32> = if paths.launching().exists() {
            self.vmms.find().into_iter().filter(|(_, id)| id == uid.as_str()).map(|(pid, _)| pid).collect()
        } else {
            Vec::new()
        };
        if let Some(pid) = read_pid(paths) {
            pids.push(pid);
        }
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            if !self.vmms.is_vmm(pid, uid.as_str()) {
                continue;
            }
            let ours = process::is_our_child(pid);
            self.exits.expect(pid);
            if !paths.started().exists() {
                // It never booted (a start cut short): no guest to ask.
                self.vmms.stop(pid, uid.as_str(), Duration::ZERO).await;
            } else {
                // Ask the guest first, as a power button would; then signals.
                let _ = FcClient::new(paths.socket())
                    .with_request_timeout(Duration::from_millis(500))
                    .send_ctrl_alt_del()
                    .await;
                if !process::wait_gone(pid, self.cfg.stop_grace).await {
                    self.vmms.stop(pid, uid.as_str(), Duration::from_millis(500)).await;
                }
            }
            // Gone means a zombie at least; our reaper still has to collect
            // it and write its record into the VM directory. Wait for that,
            // so nothing writes there once the caller moves on (a removal
            // racing the record fails with "Directory not empty").
            if ours && process::reaped(&paths.reaped(), pid, Duration::from_secs(2)).await.is_none() {
                tracing::warn!(uid = %uid, pid, "the VMM's exit was not recorded within 2 s");
            }
        }
        let _ = std::fs::remove_file(paths.socket());
        let _ = std::fs::remove_file(paths.pid());
        let _ = std::fs::remove_file(paths.launching());
    }

    /// What is on the host for `uid`, asked of the VM's owner (after any
    /// operation on it in progress).
    pub async fn report(&self, uid: &Uid) -> Result<VmReport, AgentError> {
        let lock = self.lock(uid).await;
        let _held = lock.lock().await;
        self.observe(uid).await
    }

    /// Forwards a Firecracker API call to VM `uid`'s VMM, as its owner: it
    /// never interleaves with a configuration, snapshot or stop in progress.
    pub async fn proxy(
        &self,
        uid: &Uid,
        method: &axum::http::Method,
        fc_path: &str,
        body: bytes::Bytes,
    ) -> Result<axum::response::Response, crate::proxy::ProxyError> {
        let lock = self.lock(uid).await;
        let _held = lock.lock().await;
        crate::proxy::forward(&self.cfg.run_dir, uid, method, fc_path, body).await
    }

    /// Asks VM `uid`'s VMM to write its metrics now, as its owner.
    pub async fn flush_metrics(&self, uid: &Uid) {
        let lock = self.lock(uid).await;
        let _held = lock.lock().await;
        if let Ok(socket) = crate::proxy::socket_for(&self.cfg.run_dir, uid) {
            let _ = FcClient::new(socket).flush_metrics().await;
        }
    }

    /// What is on the host for `uid`; the caller is its owner.
    async fn observe(&self, uid: &Uid) -> Result<VmReport, AgentError> {
        self.observe_knowing(uid, None).await
    }

    /// [`Runtime::observe`], given the state the VMM reported a moment ago
    /// under the same hold of the VM's lock, if the caller has it.
    async fn observe_knowing(&self, uid: &Uid, reported: Option<InstanceState>) -> Result<VmReport, AgentError> {
        let paths = self.paths(uid)?;
        if !paths.dir.exists() {
            return Ok(absent(uid));
        }
        let tap = uid.tap_name();
        let tap_exists = crate::net::exists(&tap)?;
        let pid = read_pid(&paths).filter(|pid| self.vmms.is_vmm(*pid, uid.as_str()));
        let reported = match (pid, reported) {
            (None, _) => None,
            (Some(_), Some(state)) => Some(state),
            (Some(_), None) => FcClient::new(paths.socket()).describe_instance().await.ok().map(|i| i.state),
        };
        let state = match (pid, reported) {
            (None, _) if paths.kept_down().exists() => ObservedState::Exited,
            (None, _) => ObservedState::Stopped,
            (Some(_), Some(InstanceState::Running)) => ObservedState::Running,
            (Some(_), Some(InstanceState::Paused)) => ObservedState::Paused,
            (Some(_), _) => ObservedState::Stopped,
        };
        let (started_at, boot_millis) = read_started(&paths);
        // A restored guest has its source's MAC, whatever was asked; its
        // TAP is in its VMM's namespace, there while the VMM is.
        let restored = crate::snapshots::restored(&paths);
        let config = std::fs::read(paths.config()).ok().and_then(|b| serde_json::from_slice::<EnsureVm>(&b).ok());
        let mac = match &restored {
            Some(r) => Some(r.mac.clone()),
            None => config.as_ref().map(|c| c.mac.clone()),
        };
        let ip = read_ip(&paths);
        let probe = match (config.as_ref().and_then(|c| c.probe.as_ref()), pid) {
            (Some(probe), Some(pid)) if state == ObservedState::Running => {
                let start = std::fs::read_to_string(paths.console_offset())
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0);
                Some(self.probes.run(uid.as_str(), pid, probe, &paths.console(), start, ip).await)
            }
            _ => None,
        };
        let tap_exists = if restored.is_some() { pid.is_some() } else { tap_exists };
        Ok(VmReport {
            uid: uid.to_string(),
            state,
            pid,
            socket_path: pid.map(|_| paths.socket().display().to_string()),
            tap_name: tap_exists.then_some(tap),
            mac,
            ip: ip.map(|ip| ip.to_string()),
            log_path: Some(paths.log().display().to_string()),
            console_path: Some(paths.console().display().to_string()),
            started_at: if pid.is_some() { started_at } else { None },
            boot_millis: if pid.is_some() { boot_millis } else { None },
            restarts: read_restarts(&paths),
            exit: std::fs::read(paths.last_exit()).ok().and_then(|b| serde_json::from_slice(&b).ok()),
            probe,
        })
    }

    /// Everything of ours on the host, whether or not a VM claims it; with
    /// `reports`, also what [`Runtime::report`] says of each VM.
    pub async fn inventory(&self, reports: bool) -> Result<Inventory, AgentError> {
        let mut inv = Inventory::default();
        let vms_dir = self.cfg.run_dir.vms();
        let entries = std::fs::read_dir(&vms_dir).map_err(AgentError::io(format!("listing {}", vms_dir.display())))?;
        inv.sockets = sockets_under(self.cfg.run_dir.root(), 5);
        inv.vmms = self.vmms.find().into_iter().map(|(pid, uid)| nexus_api::agent::VmmProcess { pid, uid }).collect();
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
        inv.taps =
            self.net.links().await?.into_iter().filter(|l| l.name.starts_with(TAP_PREFIX)).map(|l| l.name).collect();
        let snaps = self.cfg.run_dir.snapshots();
        inv.snapshots = std::fs::read_dir(&snaps)
            .map_err(AgentError::io(format!("listing {}", snaps.display())))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
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
            self.remove(raw).await?;
            removed.push(format!("vm {raw}"));
        }
        for tap in &req.taps {
            let ok = tap.len() == TAP_PREFIX.len() + 12
                && tap.starts_with(TAP_PREFIX)
                && tap[TAP_PREFIX.len()..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return Err(AgentError::Invalid(format!("{tap:?} is not a TAP device this agent makes")));
            }
            if self.net.delete_link(tap).await? {
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
                .is_some_and(|d| d.starts_with(self.cfg.run_dir.root()));
            let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if !inside || !is_socket {
                return Err(AgentError::Forbidden(format!("{raw:?} is not a socket inside the run directory")));
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

/// Unix sockets under `root`, at most `depth` directories down; symlinks
/// are not followed.
fn sockets_under(root: &Path, depth: usize) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, d)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_socket() {
                found.push(e.path().display().to_string());
            } else if ft.is_dir() && d < depth {
                stack.push((e.path(), d + 1));
            }
        }
    }
    found
}

fn absent(uid: &Uid) -> VmReport {
    VmReport {
        uid: uid.to_string(),
        state: ObservedState::Absent,
        pid: None,
        socket_path: None,
        tap_name: None,
        mac: None,
        ip: None,
        log_path: None,
        console_path: None,
        started_at: None,
        boot_millis: None,
        restarts: 0,
        exit: None,
        probe: None,
    }
}

/// Checks the fields of a request the agent turns into host paths or
/// Firecracker settings.
fn validate(req: &EnsureVm) -> Result<(), AgentError> {
    for (field, path) in [("kernelPath", &req.kernel_path), ("rootfsPath", &req.rootfs_path)] {
        let p = Path::new(path);
        if !p.is_absolute()
            || path.contains('\0')
            || p.components().any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(AgentError::Invalid(format!("{field} {path:?} must be an absolute path without '..'")));
        }
    }
    if req.vcpu == 0 || req.mem_mib == 0 {
        return Err(AgentError::Invalid("vcpu and memMib must be positive".into()));
    }
    let mut errors = nexus_api::validation::FieldErrors::default();
    nexus_api::validation::validate_mac(&mut errors, "mac", &req.mac);
    if !errors.is_empty() {
        return Err(AgentError::Invalid(errors.to_string()));
    }
    Ok(())
}

/// Waits until VMM `pid` of VM `uid` answers on its API socket. The
/// socket's creation wakes the wait (inotify on its directory); between
/// Firecracker binding the socket and listening on it a connect is refused,
/// and is tried again after a millisecond. The VMM's liveness is checked
/// every 50 ms. Only a socket counts: the VMM may write into that
/// directory, and a link it left there would lead the agent elsewhere.
async fn wait_for_socket(client: &FcClient, pid: u32, uid: &str, vmms: &process::Vmms) -> Result<(), AgentError> {
    use std::os::unix::fs::FileTypeExt;
    let socket = client.socket().to_path_buf();
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let watch = crate::dirwatch::DirWatch::new(dir).map_err(AgentError::io("watching for the VMM's API socket"))?;
    let deadline = tokio::time::Instant::now() + SOCKET_WAIT;
    loop {
        if std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            match client.describe_instance().await {
                Ok(_) => return Ok(()),
                Err(source) if !source.is_retryable() => {
                    return Err(AgentError::Firecracker { step: "describe", source });
                }
                // Bound, not yet listening.
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        } else {
            tokio::select! {
                woken = watch.changed() => woken.map_err(AgentError::io("watching for the VMM's API socket"))?,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        if !process::alive(pid) || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    vmms.stop(pid, uid, Duration::ZERO).await;
    Err(AgentError::VmmDidNotStart { socket: client.socket().display().to_string(), seconds: SOCKET_WAIT.as_secs() })
}

/// Points Firecracker's log and metrics at the VM's files (as the jailed
/// VMM sees them): the only configuration a snapshot load allows first.
pub async fn configure_observability(client: &FcClient) -> Result<(), AgentError> {
    use crate::jail::inside;
    let fc = |step: &'static str| move |source| AgentError::Firecracker { step, source };
    client
        .put_logger(&models::Logger {
            log_path: inside::LOG.into(),
            level: Some("Info".into()),
            show_level: Some(true),
            show_log_origin: Some(false),
        })
        .await
        .map_err(fc("logger"))?;
    client.put_metrics(&models::Metrics { metrics_path: inside::METRICS.into() }).await.map_err(fc("metrics"))
}

/// Sends the full pre-boot configuration, then InstanceStart, naming the
/// VM's files as the jailed VMM sees them. The pre-boot requests do not
/// depend on one another, so they are all sent at once, each on its own
/// connection; Firecracker answers them in turn.
pub async fn configure(client: &FcClient, req: &EnsureVm, tap: &str) -> Result<(), AgentError> {
    use crate::jail::inside;
    let fc = |step: &'static str| move |source| AgentError::Firecracker { step, source };
    let machine = models::MachineConfiguration {
        vcpu_count: req.vcpu,
        mem_size_mib: req.mem_mib,
        smt: None,
        track_dirty_pages: None,
    };
    let boot = models::BootSource {
        kernel_image_path: inside::KERNEL.into(),
        boot_args: Some(req.boot_args.clone()),
        initrd_path: req.initrd_path.as_ref().map(|_| inside::INITRD.to_string()),
    };
    let drive = models::Drive {
        drive_id: "rootfs".into(),
        path_on_host: inside::ROOTFS.into(),
        is_root_device: true,
        is_read_only: false,
    };
    let nic = models::NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: tap.to_string(),
        guest_mac: Some(req.mac.clone()),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    };
    tokio::try_join!(
        configure_observability(client),
        async { client.put_machine_config(&machine).await.map_err(fc("machine-config")) },
        async { client.put_boot_source(&boot).await.map_err(fc("boot-source")) },
        async { client.put_drive(&drive).await.map_err(fc("drives")) },
        async { client.put_network_interface(&nic).await.map_err(fc("network-interfaces")) },
    )?;
    client.instance_start().await.map_err(fc("InstanceStart"))
}

fn read_ip(paths: &VmPaths) -> Option<std::net::Ipv4Addr> {
    std::fs::read_to_string(paths.ip()).ok()?.trim().parse().ok()
}

fn read_restarts(paths: &VmPaths) -> u32 {
    std::fs::read_to_string(paths.restarts()).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn read_pid(paths: &VmPaths) -> Option<u32> {
    std::fs::read_to_string(paths.pid()).ok()?.trim().parse().ok()
}

fn read_started(paths: &VmPaths) -> (Option<chrono::DateTime<Utc>>, Option<u64>) {
    let Ok(text) = std::fs::read_to_string(paths.started()) else {
        return (None, None);
    };
    let mut lines = text.lines();
    let at = lines.next().and_then(|l| chrono::DateTime::parse_from_rfc3339(l).ok()).map(|t| t.with_timezone(&Utc));
    let millis = lines.next().and_then(|l| l.parse().ok());
    (at, millis)
}

/// Removes `dir` and everything in it, trying again for a moment when
/// something still writes into it (a process that just ended, its reaper).
async fn remove_dir_all_settled(dir: &Path) -> Result<(), AgentError> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => return Err(AgentError::io(format!("removing {}", dir.display()))(e)),
        }
    }
}

fn remove_if_exists(path: &Path) -> Result<(), AgentError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("removing {}", path.display()))(e)),
    }
}
