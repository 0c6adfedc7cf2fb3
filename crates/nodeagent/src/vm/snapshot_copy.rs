//! Snapshots on nodes that did not take them. The node that took a
//! snapshot records the sha256 of each of its files (`sha256.json`, written
//! right after the snapshot, off the VM's critical path); another node that
//! needs the snapshot for a restore copies the files from it, agent to
//! agent, authenticated with its own node token, hashing them as they
//! arrive. A copy is kept only if every file matches what the origin
//! recorded; it is written beside its final place and renamed there whole,
//! with `copy.json` saying where it came from and what each file was.
//!
//! Before each use a copy is checked again: a file whose size or mtime
//! changed since it was copied is hashed, and a copy that no longer matches
//! is discarded and copied again.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use nexus_api::agent::{RestoreFrom, SNAPSHOT_FILES, SnapshotManifest, SnapshotOrigin, SnapshotReport};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::error::AgentError;
use crate::host::Host;
use crate::paths::{SnapshotPaths, Uid};

/// The path of file `name` (one of [`SNAPSHOT_FILES`]) of `snap`.
pub fn file(snap: &SnapshotPaths, name: &str) -> Option<PathBuf> {
    match name {
        "state" => Some(snap.state()),
        "memory" => Some(snap.memory()),
        "disk" => Some(snap.rootfs()),
        _ => None,
    }
}

fn sums_path(snap: &SnapshotPaths) -> PathBuf {
    snap.dir.join("sha256.json")
}

fn copy_path(snap: &SnapshotPaths) -> PathBuf {
    snap.dir.join("copy.json")
}

/// What a copy recorded of each file when it was checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Copied {
    /// The node it was copied from.
    origin: String,
    files: BTreeMap<String, CopiedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CopiedFile {
    sha256: String,
    bytes: u64,
    mtime_nanos: i128,
}

fn mtime_nanos(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hex::encode(hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// The sha256 of each file of complete snapshot `snap` on the node that
/// took it: as recorded, or computed and recorded now.
pub fn sums(snap: &SnapshotPaths) -> std::io::Result<BTreeMap<String, String>> {
    if let Some(sums) = std::fs::read(sums_path(snap)).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
        return Ok(sums);
    }
    let mut sums = BTreeMap::new();
    for name in SNAPSHOT_FILES {
        let path = file(snap, name).unwrap_or_default();
        sums.insert(name.to_string(), hash_file(&path)?);
    }
    let partial = snap.dir.join("sha256.json.partial");
    std::fs::write(&partial, serde_json::to_vec_pretty(&sums).unwrap_or_default())?;
    std::fs::rename(&partial, sums_path(snap))?;
    Ok(sums)
}

/// Whether the copy at `snap` still matches what was checked when it was
/// made; a snapshot this node took itself (no `copy.json`) is its own
/// reference. A file changed since (size or mtime) is hashed again.
fn intact(snap: &SnapshotPaths) -> bool {
    let Some(copied) = std::fs::read(copy_path(snap)).ok().and_then(|b| serde_json::from_slice::<Copied>(&b).ok())
    else {
        return !copy_path(snap).exists();
    };
    copied.files.iter().all(|(name, want)| {
        let Some(path) = file(snap, name) else { return false };
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == want.bytes && mtime_nanos(&meta) == want.mtime_nanos => true,
            Ok(_) => hash_file(&path).is_ok_and(|got| got == want.sha256),
            Err(_) => false,
        }
    })
}

impl Host {
    /// The files of the snapshot a VM restores from, on this node: the
    /// snapshot this node took, an intact copy, or (given an origin) a
    /// copy made now. Callers of one snapshot wait for one copy.
    pub async fn snapshot_source(&self, from: &RestoreFrom) -> Result<(SnapshotPaths, SnapshotReport), AgentError> {
        let uid = Uid::parse(&from.snapshot_uid)?;
        let snap = self.cfg.run_dir.snapshot(&uid);
        let _files = self.snapshot_files.hold(&uid).await;
        if let Some(report) = super::snapshots::completed(&snap) {
            // Taken on this node (no copy record): nothing to check. A copy
            // may need hashing, on a blocking thread.
            let checked = snap.clone();
            let ok = !copy_path(&snap).exists()
                || tokio::task::spawn_blocking(move || intact(&checked)).await.unwrap_or(false);
            if ok {
                return Ok((snap, report));
            }
            tracing::warn!(snapshot = %uid, "the copy of the snapshot on this node changed since it was checked; discarding it");
            remove_dir(&snap.dir)?;
            if from.origin.is_none() {
                return Err(AgentError::SnapshotCopy(format!(
                    "the copy of snapshot {uid} on this node is damaged and its origin is not known"
                )));
            }
        }
        let Some(origin) = &from.origin else {
            return Err(AgentError::NotFound(format!(
                "snapshot {uid} is not on this node (its files are gone or were never complete here); restore on the node that took it, or take it again"
            )));
        };
        self.copy_snapshot(&uid, &snap, origin).await?;
        let report = super::snapshots::completed(&snap)
            .ok_or_else(|| AgentError::SnapshotCopy(format!("snapshot {uid} was copied but is not complete")))?;
        Ok((snap, report))
    }

    /// Copies snapshot `uid` from `origin` into `snap`, checking every file
    /// against the sha256 the origin recorded. Nothing is left behind when
    /// a file does not match or the transfer breaks.
    async fn copy_snapshot(&self, uid: &Uid, snap: &SnapshotPaths, origin: &SnapshotOrigin) -> Result<(), AgentError> {
        let started = Instant::now();
        let api = self.cfg.api.as_ref().ok_or_else(|| {
            AgentError::SnapshotCopy("this agent has no apiserver token to present to other nodes".into())
        })?;
        let peer = nexus_client::Client::with_trust(&origin.address, api.token(), api.trust().clone());
        let from = |e: nexus_client::ClientError| {
            AgentError::SnapshotCopy(format!("copying snapshot {uid} from node {}: {e}", origin.node))
        };
        let base = format!("/v1/snapshots/{uid}/transfer");
        let manifest: SnapshotManifest = peer.raw(reqwest::Method::GET, &base, None).await.map_err(from)?;
        let staging = SnapshotPaths { dir: self.cfg.run_dir.snapshots().join(format!(".{uid}.copy")) };
        remove_dir(&staging.dir)?;
        std::fs::create_dir_all(&staging.dir).map_err(AgentError::io("creating the snapshot copy's directory"))?;
        let copied = async {
            let mut files = BTreeMap::new();
            for name in SNAPSHOT_FILES {
                let want = manifest.sha256.get(name).ok_or_else(|| {
                    AgentError::SnapshotCopy(format!("node {} recorded no sha256 for {name}", origin.node))
                })?;
                let path = file(&staging, name).unwrap_or_default();
                let got = download(&peer, &format!("{base}/{name}"), &path).await.map_err(|e| match e {
                    Download::Api(e) => from(e),
                    Download::Io(e) => AgentError::io(format!("writing {}", path.display()))(e),
                })?;
                if &got != want {
                    return Err(AgentError::SnapshotCopy(format!(
                        "the {name} file of snapshot {uid} copied from node {} has sha256 {got}, but that node \
                         recorded {want}; the copy was discarded and is made again",
                        origin.node
                    )));
                }
                let meta = std::fs::metadata(&path).map_err(AgentError::io(format!("reading {}", path.display())))?;
                let record = CopiedFile { sha256: got, bytes: meta.len(), mtime_nanos: mtime_nanos(&meta) };
                files.insert(name.to_string(), record);
            }
            let mut report = manifest.report.clone();
            for f in &mut report.files {
                f.path = file(snap, &f.name).unwrap_or_default().display().to_string();
            }
            let record = Copied { origin: origin.node.clone(), files };
            std::fs::write(copy_path(&staging), serde_json::to_vec_pretty(&record).unwrap_or_default())
                .map_err(AgentError::io("recording the snapshot copy"))?;
            std::fs::write(staging.done(), serde_json::to_vec_pretty(&report).unwrap_or_default())
                .map_err(AgentError::io("recording the snapshot copy"))?;
            remove_dir(&snap.dir)?;
            std::fs::rename(&staging.dir, &snap.dir).map_err(AgentError::io("moving the snapshot copy into place"))
        }
        .await;
        if let Err(e) = copied {
            let _ = std::fs::remove_dir_all(&staging.dir);
            tracing::warn!(snapshot = %uid, origin = %origin.node, error = %e.chain(), "copying a snapshot failed");
            return Err(e);
        }
        tracing::info!(
            snapshot = %uid,
            origin = %origin.node,
            bytes = manifest.report.size_bytes,
            millis = started.elapsed().as_millis() as u64,
            "snapshot copied and checked"
        );
        Ok(())
    }
}

enum Download {
    Api(nexus_client::ClientError),
    Io(std::io::Error),
}

/// Streams `GET path` from `peer` into a new file at `path`; its sha256.
/// Runs of zeros are not written (the file stays as sparse as a disk or a
/// guest's untouched memory is at the origin).
async fn download(peer: &nexus_client::Client, path_on_peer: &str, path: &Path) -> Result<String, Download> {
    use tokio::io::AsyncSeekExt;
    let mut stream = peer.get_stream(path_on_peer).await.map_err(Download::Api)?;
    let mut out = tokio::fs::File::create(path).await.map_err(Download::Io)?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Download::Api)?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        if chunk.iter().all(|&b| b == 0) {
            out.seek(std::io::SeekFrom::Current(chunk.len() as i64)).await.map_err(Download::Io)?;
        } else {
            out.write_all(&chunk).await.map_err(Download::Io)?;
        }
    }
    out.set_len(size).await.map_err(Download::Io)?;
    out.sync_all().await.map_err(Download::Io)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Readable by the VMMs restored from it, as the origin's files are.
        tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).await.map_err(Download::Io)?;
    }
    Ok(hex::encode(hasher.finalize()))
}

fn remove_dir(dir: &Path) -> Result<(), AgentError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("removing {}", dir.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_in(dir: &Path) -> SnapshotPaths {
        let snap = SnapshotPaths { dir: dir.to_path_buf() };
        for (name, body) in [("state", "s"), ("memory", "m"), ("disk", "d")] {
            std::fs::write(file(&snap, name).unwrap(), body).unwrap();
        }
        snap
    }

    #[test]
    fn sums_are_recorded_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot_in(dir.path());
        let first = sums(&snap).unwrap();
        assert_eq!(first["memory"], hex::encode(sha2::Sha256::digest(b"m")));
        // Recorded: a later change of a file does not change the record.
        std::fs::write(snap.memory(), "changed").unwrap();
        assert_eq!(sums(&snap).unwrap(), first);
    }

    #[test]
    fn a_copy_is_intact_until_a_file_differs_from_what_was_checked() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot_in(dir.path());
        assert!(intact(&snap), "a snapshot this node took is its own reference");
        let files = SNAPSHOT_FILES
            .iter()
            .map(|name| {
                let path = file(&snap, name).unwrap();
                let meta = std::fs::metadata(&path).unwrap();
                let sha256 = hash_file(&path).unwrap();
                (name.to_string(), CopiedFile { sha256, bytes: meta.len(), mtime_nanos: mtime_nanos(&meta) })
            })
            .collect();
        let record = Copied { origin: "n1".into(), files };
        std::fs::write(copy_path(&snap), serde_json::to_vec(&record).unwrap()).unwrap();
        assert!(intact(&snap));
        // Rewritten with the same bytes: hashed again, still intact.
        std::fs::write(snap.memory(), "m").unwrap();
        assert!(intact(&snap));
        // One byte flipped: not intact.
        std::fs::write(snap.memory(), "n").unwrap();
        assert!(!intact(&snap));
        std::fs::write(copy_path(&snap), "not json").unwrap();
        assert!(!intact(&snap), "an unreadable record is no proof");
    }
}
