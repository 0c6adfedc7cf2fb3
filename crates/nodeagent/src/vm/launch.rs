//! Launch: a fresh VMM for a VM, in its jail, with its TAP, private disk,
//! cgroup or scope and address made while the process starts, then
//! configured (or loaded from its snapshot) and booted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use nexus_api::agent::EnsureVm;

use super::files::remove_if_exists;
use super::owner::VmOwner;
use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::firecracker::models;
use crate::host::{disk, process};
use crate::paths::VmPaths;

/// How long a new VMM gets to open its API socket.
pub const SOCKET_WAIT: Duration = Duration::from_secs(5);

impl VmOwner {
    /// Starts a fresh VMM for the VM and configures and boots it. A
    /// restored VM's snapshot files are `source` when the caller found them
    /// already (else they are found here).
    pub(super) async fn start(
        &self,
        paths: &VmPaths,
        req: &EnsureVm,
        source: Option<Source>,
        client: &FcClient,
    ) -> Result<models::InstanceInfo, AgentError> {
        let uid = &self.uid;
        self.stop_vmm(paths).await;
        remove_if_exists(&paths.socket())?;
        // Until it has booted, this VMM has not "run and ended".
        remove_if_exists(&paths.started())?;
        // Checked before anything is made for it.
        let restore = match (&req.restore, source) {
            (Some(_), Some(source)) => Some(source),
            (Some(from), None) => Some(self.host.snapshot_source(from).await?),
            (None, _) => None,
        };
        let (kernel, initrd) = match restore {
            Some(_) => (None, None),
            None => {
                remove_if_exists(&paths.restored())?;
                let (kernel, initrd) = self.check_images(req).await?;
                (Some(kernel), initrd)
            }
        };
        let drives = self.plan_drives(req).await?;
        let read_only_binds: Vec<_> = drives
            .iter()
            .filter_map(|d| match &d.backing {
                super::drives::Backing::Bound(file) => Some((file.clone(), d.inside())),
                _ => None,
            })
            .collect();
        // A restored VM takes a spare network namespace when one is ready
        // (else it gets a new one), and the VMM waiting in it when its
        // directory holds none of a VMM's files yet and no host file is
        // bound into its jail. A waiting VMM it cannot use is ended.
        let mut spare = if restore.is_some() { self.host.spares.take() } else { None };
        let fresh = !paths.jail().exists() && !paths.console().exists() && !paths.log().exists();
        let adopted = match spare.as_mut().and_then(crate::host::spares::Spare::take_vmm) {
            Some(warm) if fresh && read_only_binds.is_empty() => Some(warm.adopt(paths, uid)?),
            _ => None,
        };
        let user = self.host.users.user_of(paths)?;
        let jail = crate::host::jail::Jail {
            root: paths.jail(),
            skeleton: self.host.skeleton.clone(),
            uid: user,
            gid: user,
            binary: self.host.cfg.firecracker.clone(),
            kernel,
            initrd,
            read_only_binds,
        };
        jail.prepare()?;
        // The log and metrics files, which the VMM opens as it starts.
        jail.link_log_files(paths)?;
        // Its drives' files and mount points: the launch binds the latter.
        self.make_drives(paths, &jail, &drives).await?;
        // The VMM starts while its TAP and disk are made: it needs them only
        // when configured, after its API socket is up.
        std::fs::write(paths.launching(), b"").map_err(AgentError::io("marking the launch"))?;
        // The readiness probe reads this VMM's console from here on.
        let console_at = std::fs::metadata(paths.console()).map(|m| m.len()).unwrap_or(0);
        std::fs::write(paths.console_offset(), console_at.to_string())
            .map_err(AgentError::io("recording the console's length"))?;
        // A restored guest keeps its source's address; the VM gets one of
        // its own on the bridge, joined to the guest's by NAT. Known before
        // the launch, so that a spare's NAT is made while the VMM starts.
        let addresses = match &restore {
            Some((_, report)) => self.restored_addresses(paths, report)?,
            None => None,
        };
        let join = match (&spare, adopted) {
            (Some(s), None) => Some(s.netns().map_err(AgentError::io("opening a spare network namespace"))?),
            _ => None,
        };
        let launched = Instant::now();
        // The fork and the jail's set-up run on a blocking thread while this
        // task makes the TAP and the disk. The pid file is written there
        // too, so a request cut short (its caller gone) still leaves the
        // VMM recorded. An adopted VMM runs already.
        let launch = async {
            if let Some(pid) = adopted {
                remove_if_exists(&paths.launching())?;
                return Ok(pid);
            }
            let (jail, who, paths) = (jail.clone(), uid.to_string(), paths.clone());
            let exits = self.host.exits.clone();
            let own_netns = restore.is_some();
            tokio::task::spawn_blocking(move || -> Result<u32, AgentError> {
                let ended = {
                    let (who, reaped) = (who.clone(), paths.reaped());
                    move |record: process::Reaped| {
                        process::record_exit(&reaped, &record);
                        exits.record(&who, record.pid)
                    }
                };
                use crate::host::jail::VmmNet;
                let net = match (&join, own_netns) {
                    (Some(fd), _) => VmmNet::Join(std::os::fd::AsRawFd::as_raw_fd(fd)),
                    (None, true) => VmmNet::Own,
                    (None, false) => VmmNet::Host,
                };
                let pid = process::launch(&jail, &who, &paths.console(), net, ended)?;
                // The VMM holds the namespace now.
                drop(join);
                std::fs::write(paths.pid(), pid.to_string()).map_err(AgentError::io("writing the pid file"))?;
                remove_if_exists(&paths.launching())?;
                Ok(pid)
            })
            .await
            .map_err(|e| AgentError::Io {
                what: "launching the VMM".into(),
                source: std::io::Error::other(e.to_string()),
            })?
        };
        let (pid, made) =
            tokio::join!(launch, self.make_tap_and_disk(paths, req, restore.as_ref(), user, spare, addresses, fresh));
        let pid = pid?;
        tracing::info!(
            uid = %uid,
            vm = %req.display_name,
            pid,
            warm = adopted.is_some(),
            scoped = self.host.cfg.scopes.is_some(),
            launch_ms = launched.elapsed().as_secs_f64() * 1000.0,
            "VMM launched"
        );
        let socket_wait = async {
            wait_for_socket(client, pid, uid.as_str(), &self.host).await?;
            Ok(launched.elapsed())
        };
        let prepared = match made {
            Ok((bridge, claimed)) => {
                // A restored VM's namespace is set up while its VMM starts
                // (or was made ahead, a spare); its snapshot is loaded once
                // the TAP is there.
                let prepare = async {
                    let req = self.prepare(paths, req, restore.as_ref(), pid, &jail, &drives).await?;
                    let netns = match restore {
                        Some(_) => {
                            let owner = (user, user);
                            let prepared = launched.elapsed();
                            let spare = claimed.is_some();
                            let mut setup = match claimed {
                                Some(setup) => setup,
                                None => {
                                    crate::host::clonenet::start(&self.host.net, pid, uid, bridge, addresses, owner)
                                        .await?
                                }
                            };
                            let veth = launched.elapsed();
                            setup.tap_ready().await?;
                            tracing::debug!(
                                uid = %uid,
                                spare,
                                prepared_ms = prepared.as_secs_f64() * 1000.0,
                                veth_ms = veth.as_secs_f64() * 1000.0,
                                tap_ms = launched.elapsed().as_secs_f64() * 1000.0,
                                "restored VM's TAP ready"
                            );
                            Some((setup, spare))
                        }
                        None => None,
                    };
                    Ok::<_, AgentError>((netns, req))
                };
                tokio::try_join!(prepare, socket_wait).map(|(prepared, answered)| (bridge, prepared, answered))
            }
            Err(e) => Err(e),
        };
        let (_, (netns, req), answered) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                self.host.stop_vmm(pid, uid.as_str(), Duration::ZERO).await;
                return Err(e);
            }
        };
        let tap = uid.tap_name();
        let req = &req;
        // The guest's document, with the address just given to it.
        let mmds = super::mmds::document(paths, uid.as_str(), req);
        let configured = match &restore {
            Some(_) => {
                let restored = async {
                    let load_from = launched.elapsed();
                    // The guest runs once its network is whole. A spare's
                    // NAT was begun before the launch and is done by now (or
                    // nearly): the load resumes the guest. Otherwise the
                    // snapshot is loaded paused while the NAT is finished.
                    match netns {
                        Some((netns, true)) => {
                            netns.finished().await?;
                            super::snapshots::load(client, &tap, true).await?;
                        }
                        netns => {
                            super::snapshots::load(client, &tap, false).await?;
                            if let Some((netns, _)) = netns {
                                netns.finished().await?;
                            }
                            super::snapshots::resume(client).await?;
                        }
                    }
                    tracing::debug!(
                        uid = %uid,
                        from_ms = load_from.as_secs_f64() * 1000.0,
                        running_ms = launched.elapsed().as_secs_f64() * 1000.0,
                        "snapshot loaded and resumed"
                    );
                    // The snapshot kept the service's configuration, not
                    // its contents: this VM's own document.
                    match &mmds {
                        Some(doc) => client
                            .put_mmds(doc)
                            .await
                            .map_err(|source| AgentError::Firecracker { step: "mmds", source }),
                        None => Ok(()),
                    }
                };
                restored.await
            }
            None => super::configure::configure(client, req, &tap, &drives, mmds.as_ref()).await,
        };
        if restore.is_some() {
            // The spare it took (if any) is replaced once it runs.
            self.host.refill_spares();
        }
        if let Err(e) = configured {
            self.host.stop_vmm(pid, uid.as_str(), Duration::ZERO).await;
            return Err(e);
        }
        let boot_millis = launched.elapsed().as_millis() as u64;
        tracing::info!(
            uid = %uid,
            socket_ms = answered.as_secs_f64() * 1000.0,
            configure_ms = (launched.elapsed() - answered).as_secs_f64() * 1000.0,
            "VMM booted"
        );
        super::drives::write_limits(paths, &super::drives::wanted_limits(req))?;
        if let Some(doc) = &mmds {
            super::mmds::record(paths, doc)?;
        }
        let started = format!("{}\n{boot_millis}\n", Utc::now().to_rfc3339());
        std::fs::write(paths.started(), started).map_err(AgentError::io("writing the start record"))?;
        client.describe_instance().await.map_err(|source| AgentError::Firecracker { step: "describe", source })
    }

    /// What a new VMM needs besides itself that does not depend on its
    /// process, made while it is launched: the bridge and the VM's TAP (a
    /// restored VM's TAP is made inside the VMM's own namespace: at once in
    /// a `spare`, which is claimed here and finished with `addresses`, else
    /// once the VMM runs) and, at the same time, its private disk. `fresh`
    /// says no earlier start of the VM made anything. Returns the bridge's
    /// index and the claimed spare's set-up, under way.
    #[allow(clippy::too_many_arguments)]
    async fn make_tap_and_disk(
        &self,
        paths: &VmPaths,
        req: &EnsureVm,
        restore: Option<&Source>,
        user: u32,
        spare: Option<crate::host::spares::Spare>,
        addresses: Option<crate::host::clonenet::Addresses>,
        fresh: bool,
    ) -> Result<(u32, Option<crate::host::clonenet::Setup>), AgentError> {
        let uid = &self.uid;
        let began = Instant::now();
        let network = async {
            let bridge = self.host.bridge_index().await?;
            let tap = uid.tap_name();
            let claimed = match restore {
                Some(_) => {
                    // Links an earlier start of this VM left (none when
                    // nothing of a VMM was made for it yet).
                    if !fresh {
                        self.host.net.delete_link(&tap).await?;
                        // (A namespace made on demand removes its own.)
                        if spare.is_some() {
                            self.host.net.delete_link(&crate::host::clonenet::veth_name(uid)).await?;
                        }
                    }
                    match spare {
                        Some(spare) => {
                            Some(spare.claim(&self.host.net, uid, bridge, (user, user)).await?.finish(addresses))
                        }
                        None => None,
                    }
                }
                None => {
                    self.host.net.ensure_tap(&tap, bridge, (user, user)).await?;
                    None
                }
            };
            Ok::<_, AgentError>((bridge, claimed, began.elapsed()))
        };
        let disk = async {
            let method = match restore {
                // The snapshot's disk, taken with its memory, is the VM's disk.
                Some((snap, _)) => disk::ensure_disk(snap.rootfs(), paths.rootfs())
                    .await
                    .map_err(AgentError::io("copying the snapshot's disk"))?,
                None => disk::ensure_disk(PathBuf::from(&req.rootfs_path), paths.rootfs())
                    .await
                    .map_err(AgentError::io(format!("copying rootfs {}", req.rootfs_path)))?,
            };
            Ok((method, began.elapsed()))
        };
        let ((bridge, claimed, network), (method, copied)) = tokio::try_join!(network, disk)?;
        tracing::info!(
            uid = %uid,
            ?method,
            network_ms = network.as_secs_f64() * 1000.0,
            copy_ms = copied.as_secs_f64() * 1000.0,
            "disk ready"
        );
        Ok((bridge, claimed))
    }

    /// The rest of what a new VMM needs, once it runs: its systemd scope or
    /// cgroup, its disk, log and metrics files linked into its jail and its
    /// address (written into the request's boot arguments; a restored VM's
    /// was given before the launch). Returns the request to configure the
    /// VMM with.
    async fn prepare(
        &self,
        paths: &VmPaths,
        req: &EnsureVm,
        restore: Option<&Source>,
        pid: u32,
        jail: &crate::host::jail::Jail,
        drives: &[super::drives::Planned],
    ) -> Result<EnsureVm, AgentError> {
        let uid = &self.uid;
        use crate::host::jail::inside;
        if let Some(scopes) = &self.host.cfg.scopes {
            scopes.adopt(uid, pid, &format!("nexus VM {}", req.display_name)).await.map_err(|e| AgentError::Io {
                what: "placing the VMM in its systemd scope".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        } else if let Some(cg) = &self.host.cfg.cgroups {
            cg.confine(uid, pid, req.vcpu, req.mem_mib).map_err(AgentError::io("placing the VMM in its cgroup"))?;
        }
        jail.link(&paths.rootfs(), inside::ROOTFS)?;
        self.link_drives(paths, jail, drives)?;
        if let Some((snap, _)) = restore {
            jail.link_read_only(&snap.state(), inside::SNAPSHOT_STATE)?;
            jail.link_read_only(&snap.memory(), inside::SNAPSHOT_MEM)?;
        }
        let mut req = req.clone();
        if restore.is_none()
            && let Some(ip) = self.assign_ip(paths, req.ip.as_deref())?
        {
            let subnet = self.host.subnet().expect("an address implies a subnet");
            req.boot_args = format!("{} {}", req.boot_args, subnet.kernel_arg(ip));
        }
        if let Some((_, report)) = restore {
            let record = crate::paths::Restored {
                snapshot_uid: report.uid.clone(),
                mac: report.mac.clone(),
                guest_ip: report.ip.as_deref().and_then(|ip| ip.parse().ok()),
            };
            std::fs::write(paths.restored(), serde_json::to_vec(&record).unwrap_or_default())
                .map_err(AgentError::io("recording the VM's origin"))?;
        }
        Ok(req)
    }

    /// A restored VM's addresses: its guest's (its source's) and one of its
    /// own on the bridge, given now; `None` when the source had none from
    /// the node (or the node has no subnet).
    fn restored_addresses(
        &self,
        paths: &VmPaths,
        report: &nexus_api::agent::SnapshotReport,
    ) -> Result<Option<crate::host::clonenet::Addresses>, AgentError> {
        match (report.ip.as_deref().and_then(|ip| ip.parse().ok()), self.host.subnet()) {
            (Some(guest), Some(subnet)) => Ok(self
                .assign_ip(paths, Some("auto"))?
                .map(|own| crate::host::clonenet::Addresses { guest, own, subnet })),
            _ => {
                self.assign_ip(paths, None)?;
                Ok(None)
            }
        }
    }
}

/// A restored VM's snapshot files on this node and what was recorded of it.
pub(super) type Source = (crate::paths::SnapshotPaths, nexus_api::agent::SnapshotReport);

/// Waits until VMM `pid` of VM `uid` listens on its API socket. The
/// socket's creation wakes the wait (inotify on its directory); between
/// Firecracker binding the socket and listening on it a connect is refused,
/// and is tried again after a millisecond. A connection accepted is enough:
/// Firecracker serves its API from then on, and the first request is the
/// VM's own (no request is spent asking). The VMM's liveness is checked
/// every 50 ms. Only a socket counts: the VMM may write into that
/// directory, and a link it left there would lead the agent elsewhere.
async fn wait_for_socket(client: &FcClient, pid: u32, uid: &str, host: &crate::host::Host) -> Result<(), AgentError> {
    use std::os::unix::fs::FileTypeExt;
    let socket = client.socket().to_path_buf();
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let watch =
        crate::host::dirwatch::DirWatch::new(dir).map_err(AgentError::io("watching for the VMM's API socket"))?;
    let deadline = tokio::time::Instant::now() + SOCKET_WAIT;
    loop {
        if std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(_) => return Ok(()),
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
    host.stop_vmm(pid, uid, Duration::ZERO).await;
    Err(AgentError::VmmDidNotStart { socket: client.socket().display().to_string(), seconds: SOCKET_WAIT.as_secs() })
}
