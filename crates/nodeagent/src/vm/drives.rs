//! A VM's extra drives on this node, and the I/O limits of its devices.
//!
//! Each drive is seen by the VMM at `/drives/<name>` in its jail:
//! - a read-only Image drive is the node's checked image file itself, bind
//!   mounted read-only (never copied);
//! - a writable Image drive is the VM's private copy (a reflink where the
//!   filesystem has them), a scratch disk an empty sparse file of the VM's
//!   own, both in `drives/` of the VM's directory;
//! - a Volume drive is the volume's file (`<run dir>/volumes/<uid>/disk`).
//!
//! What the VMM was started with is recorded (`drives.json`); a request
//! naming other drives is reported as waiting for a restart. I/O limits
//! are applied at boot and changed on a running VMM with `PATCH`, the
//! limits in force recorded with the VM generation they came from
//! (`limits.json`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use nexus_api::agent::EnsureVm;
use nexus_api::storage::{AppliedLimits, DriveSource, DriveStatus, NetworkLimits, RateLimiter, TokenBucket};

use super::owner::VmOwner;
use crate::error::AgentError;
use crate::firecracker::{FcClient, models};
use crate::host::jail::{Jail, inside};
use crate::paths::{DriveName, Uid, VmPaths};

/// One extra drive, planned for a launch.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: DriveName,
    pub read_only: bool,
    pub rate_limiter: Option<RateLimiter>,
    pub backing: Backing,
    /// What backs it, in words, for the VM's status.
    pub source: String,
}

/// What a drive's file is on the host.
#[derive(Debug, Clone)]
pub enum Backing {
    /// The node's image file, bound read-only into the jail.
    Bound(PathBuf),
    /// A private copy of this image file, in the VM's directory.
    Copy(PathBuf),
    /// An empty sparse file of this many MiB, in the VM's directory.
    Scratch(u64),
    /// A volume's file.
    Volume(PathBuf),
}

impl Planned {
    /// The drive's path as the jailed VMM sees it.
    pub fn inside(&self) -> String {
        format!("{}/{}", inside::DRIVES, self.name.as_str())
    }

    /// The drive's file on the host.
    pub fn host_path(&self, paths: &VmPaths) -> PathBuf {
        match &self.backing {
            Backing::Bound(p) | Backing::Volume(p) => p.clone(),
            Backing::Copy(_) | Backing::Scratch(_) => paths.drive(&self.name),
        }
    }

    fn status(&self, paths: &VmPaths) -> DriveStatus {
        DriveStatus {
            name: self.name.as_str().to_string(),
            source: self.source.clone(),
            path: self.host_path(paths).display().to_string(),
            read_only: self.read_only,
        }
    }
}

impl VmOwner {
    /// Plans the request's drives: images confined and checked (downloaded
    /// when missing), volumes found on this node. Nothing is made yet.
    pub(super) async fn plan_drives(&self, req: &EnsureVm) -> Result<Vec<Planned>, AgentError> {
        let mut planned = Vec::with_capacity(req.drives.len());
        for (i, d) in req.drives.iter().enumerate() {
            let name = DriveName::parse(&d.name)?;
            let field = format!("drives[{i}]");
            let (backing, source) = match &d.source {
                DriveSource::Image { image, path, sha256, source } => {
                    let real = self.host.image(&field, path, sha256.as_deref(), source.as_deref()).await?;
                    let backing = if d.read_only { Backing::Bound(real) } else { Backing::Copy(real) };
                    (backing, format!("image {image}"))
                }
                DriveSource::Volume { volume, uid } => {
                    let vpaths = self.host.cfg.run_dir.volume(&Uid::parse(uid)?);
                    if crate::host::volumes::made(&Uid::parse(uid)?, &vpaths).is_none() {
                        return Err(AgentError::NotFound(format!(
                            "volume {volume} ({uid}) is not on this node: a VM runs on its volumes' node"
                        )));
                    }
                    (Backing::Volume(vpaths.disk()), format!("volume {volume}"))
                }
                DriveSource::Scratch { size_mib } => (Backing::Scratch(*size_mib), format!("{size_mib} MiB scratch")),
            };
            planned.push(Planned {
                name,
                read_only: d.read_only,
                rate_limiter: d.rate_limiter.clone(),
                backing,
                source,
            });
        }
        Ok(planned)
    }

    /// Makes the drives' mount points in the jail (before the VMM's
    /// launch: its jail binds them) and their private files (copies and
    /// scratch disks), which survive a restart of the VMM.
    pub(super) async fn make_drives(&self, paths: &VmPaths, jail: &Jail, drives: &[Planned]) -> Result<(), AgentError> {
        if drives.is_empty() {
            return Ok(());
        }
        for dir in [paths.drives(), jail.host(inside::DRIVES)] {
            std::fs::create_dir_all(&dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        }
        for d in drives {
            match &d.backing {
                Backing::Bound(_) => {
                    let point = jail.host(&d.inside());
                    if !point.exists() {
                        std::fs::write(&point, b"").map_err(AgentError::io(format!("creating {}", point.display())))?;
                    }
                }
                Backing::Copy(image) => {
                    crate::host::disk::ensure_copy(image.clone(), paths.drive(&d.name)).await.map_err(
                        AgentError::io(format!("copying {} for drive {}", image.display(), d.name.as_str())),
                    )?;
                }
                Backing::Scratch(mib) => {
                    let file = paths.drive(&d.name);
                    if !file.exists() {
                        let f = std::fs::File::create(&file).map_err(AgentError::io("creating a scratch disk"))?;
                        f.set_len(mib << 20).map_err(AgentError::io("sizing a scratch disk"))?;
                    }
                }
                Backing::Volume(_) => {}
            }
        }
        Ok(())
    }

    /// Links the drives the VMM writes into its jail (read-only images are
    /// bound at its launch) and records what it was started with.
    pub(super) fn link_drives(&self, paths: &VmPaths, jail: &Jail, drives: &[Planned]) -> Result<(), AgentError> {
        for d in drives {
            match &d.backing {
                Backing::Bound(_) => {}
                Backing::Copy(_) | Backing::Scratch(_) | Backing::Volume(_) => {
                    jail.link(&d.host_path(paths), &d.inside())?;
                }
            }
        }
        let statuses: Vec<DriveStatus> = drives.iter().map(|d| d.status(paths)).collect();
        std::fs::write(paths.started_drives(), serde_json::to_vec(&statuses).unwrap_or_default())
            .map_err(AgentError::io("recording the VM's drives"))
    }

    /// Brings the running VMM's I/O limits to the request's: each drive or
    /// interface whose limits differ from those applied is patched. Limits
    /// of drives the VMM does not have wait for its restart.
    pub(super) async fn apply_limits(
        &self,
        paths: &VmPaths,
        req: &EnsureVm,
        client: &FcClient,
    ) -> Result<(), AgentError> {
        let wanted = wanted_limits(req);
        let applied: Option<AppliedLimits> =
            std::fs::read(paths.limits()).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let Some(applied) = applied else {
            // A VMM this agent did not configure with limits: record them
            // as its request had them at its start (nothing to patch).
            return write_limits(paths, &wanted);
        };
        if same_limits(&applied, &wanted) {
            if applied.generation != wanted.generation {
                write_limits(paths, &wanted)?;
            }
            return Ok(());
        }
        let fc = |step: &'static str| move |source| AgentError::Firecracker { step, source };
        let started: Vec<DriveStatus> = std::fs::read(paths.started_drives())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if applied.rootfs != wanted.rootfs {
            let patch = models::PartialDrive {
                drive_id: nexus_api::storage::ROOT_DRIVE.into(),
                path_on_host: None,
                rate_limiter: Some(update(applied.rootfs.as_ref(), wanted.rootfs.as_ref())),
            };
            client.patch_drive(&patch).await.map_err(fc("PATCH /drives/rootfs"))?;
        }
        for d in &started {
            let (was, now) = (applied.drives.get(&d.name), wanted.drives.get(&d.name));
            if was != now {
                let patch = models::PartialDrive {
                    drive_id: d.name.clone(),
                    path_on_host: None,
                    rate_limiter: Some(update(was, now)),
                };
                client.patch_drive(&patch).await.map_err(fc("PATCH /drives"))?;
            }
        }
        let (was, now) = (applied.network.clone().unwrap_or_default(), wanted.network.clone().unwrap_or_default());
        if was != now {
            let patch = models::PartialNetworkInterface {
                iface_id: "eth0".into(),
                rx_rate_limiter: (was.rx != now.rx).then(|| update(was.rx.as_ref(), now.rx.as_ref())),
                tx_rate_limiter: (was.tx != now.tx).then(|| update(was.tx.as_ref(), now.tx.as_ref())),
            };
            client.patch_network_interface(&patch).await.map_err(fc("PATCH /network-interfaces/eth0"))?;
        }
        tracing::info!(uid = %self.uid, generation = wanted.generation, "I/O limits changed on the running VMM");
        // Drives the VMM does not have yet keep their wanted limits for its restart.
        let mut recorded = wanted;
        recorded.drives.retain(|name, _| started.iter().any(|d| &d.name == name));
        write_limits(paths, &recorded)
    }
}

/// Why the running VMM does not have the drives `req` asks for, if it
/// does not: drives are attached before boot only.
pub fn restart_pending(paths: &VmPaths, req: &EnsureVm) -> Option<String> {
    let started: Vec<DriveStatus> = serde_json::from_slice(&std::fs::read(paths.started_drives()).ok()?).ok()?;
    let wanted: Vec<(String, bool)> = req.drives.iter().map(|d| (d.name.clone(), d.read_only)).collect();
    let have: Vec<(String, bool)> = started.iter().map(|d| (d.name.clone(), d.read_only)).collect();
    let same_sources = req.drives.iter().zip(&started).all(|(d, s)| same_source(&d.source, &s.source));
    if wanted == have && same_sources {
        return None;
    }
    let names = |v: &[(String, bool)]| v.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
    Some(format!(
        "the VMM runs with drives [{}]; the spec asks for [{}]: drives are attached before boot, so the change takes \
         effect at the VM's next start (stop and start it)",
        names(&have),
        names(&wanted)
    ))
}

/// Whether a status' source words describe `source`.
fn same_source(source: &DriveSource, words: &str) -> bool {
    match source {
        DriveSource::Image { image, .. } => words == format!("image {image}"),
        DriveSource::Volume { volume, .. } => words == format!("volume {volume}"),
        DriveSource::Scratch { size_mib } => words == format!("{size_mib} MiB scratch"),
    }
}

/// The limits `req` asks for.
pub fn wanted_limits(req: &EnsureVm) -> AppliedLimits {
    AppliedLimits {
        generation: req.generation,
        rootfs: req.rootfs_rate_limiter.clone(),
        drives: req
            .drives
            .iter()
            .filter_map(|d| d.rate_limiter.clone().map(|l| (d.name.clone(), l)))
            .collect::<BTreeMap<_, _>>(),
        network: req.network_limits.clone().filter(|n| n != &NetworkLimits::default()),
    }
}

/// Records the limits in force.
pub fn write_limits(paths: &VmPaths, limits: &AppliedLimits) -> Result<(), AgentError> {
    std::fs::write(paths.limits(), serde_json::to_vec(limits).unwrap_or_default())
        .map_err(AgentError::io("recording the VM's I/O limits"))
}

fn same_limits(a: &AppliedLimits, b: &AppliedLimits) -> bool {
    a.rootfs == b.rootfs && a.drives == b.drives && a.network == b.network
}

/// The limiter to send Firecracker for a device whose limits go from
/// `was` to `now`: each bucket that changed is sent, one removed as a
/// bucket of size 0 (Firecracker's way to disable it); one unchanged is
/// left out (left as it is).
pub fn update(was: Option<&RateLimiter>, now: Option<&RateLimiter>) -> models::RateLimiter {
    let bucket = |was: Option<TokenBucket>, now: Option<TokenBucket>| match (was, now) {
        (a, b) if a == b => None,
        (_, Some(b)) => Some(to_model(b)),
        (Some(_), None) => Some(models::TokenBucket { size: 0, refill_time: 0, one_time_burst: None }),
        (None, None) => None,
    };
    models::RateLimiter {
        bandwidth: bucket(was.and_then(|w| w.bandwidth), now.and_then(|n| n.bandwidth)),
        ops: bucket(was.and_then(|w| w.ops), now.and_then(|n| n.ops)),
    }
}

/// A limiter in Firecracker's shape, for a device's configuration.
pub fn limiter(l: &RateLimiter) -> models::RateLimiter {
    models::RateLimiter { bandwidth: l.bandwidth.map(to_model), ops: l.ops.map(to_model) }
}

fn to_model(b: TokenBucket) -> models::TokenBucket {
    models::TokenBucket { size: b.size, refill_time: b.refill_time_ms, one_time_burst: b.one_time_burst }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(size: u64) -> RateLimiter {
        RateLimiter { bandwidth: Some(TokenBucket { size, refill_time_ms: 100, one_time_burst: None }), ops: None }
    }

    #[test]
    fn an_update_sends_what_changed_and_disables_what_went() {
        let both =
            RateLimiter { ops: Some(TokenBucket { size: 10, refill_time_ms: 1000, one_time_burst: None }), ..bw(1) };
        let u = update(Some(&both), Some(&bw(2)));
        assert_eq!(u.bandwidth.map(|b| b.size), Some(2), "changed");
        assert_eq!(u.ops.map(|b| (b.size, b.refill_time)), Some((0, 0)), "removed: disabled");
        let same = update(Some(&bw(1)), Some(&bw(1)));
        assert!(same.bandwidth.is_none() && same.ops.is_none(), "unchanged: left out");
        let first = update(None, Some(&bw(5)));
        assert_eq!(first.bandwidth.map(|b| (b.size, b.refill_time)), Some((5, 100)));
    }
}
