//! Volumes on this node: `<run dir>/volumes/<uid>/disk`, an empty sparse
//! file or a copy of an image (a reflink where the filesystem has them),
//! made once and kept until the volume is deleted. Volumes are not any
//! VM's: removing a VM never touches them, and the garbage collector
//! neither lists nor removes them.

use std::path::Path;

use nexus_api::agent::VolumeReport;

use crate::error::AgentError;
use crate::host::disk;
use crate::paths::{Uid, VolumePaths};

/// What a volume was made from, as recorded beside it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub display_name: String,
    pub size_bytes: u64,
}

/// The volume at `paths`, when it is complete.
pub fn made(uid: &Uid, paths: &VolumePaths) -> Option<VolumeReport> {
    let record: Record = serde_json::from_slice(&std::fs::read(paths.record()).ok()?).ok()?;
    Some(VolumeReport { uid: uid.to_string(), path: paths.disk().display().to_string(), size_bytes: record.size_bytes })
}

/// Makes the volume at `paths` (unless it is made): an empty sparse disk
/// of `size_mib`, or a copy of `image` (checked by the caller). Its record
/// is written last, so a volume cut short is made again.
pub async fn ensure(
    uid: &Uid,
    paths: &VolumePaths,
    display_name: &str,
    size_mib: Option<u64>,
    image: Option<&Path>,
) -> Result<VolumeReport, AgentError> {
    if let Some(done) = made(uid, paths) {
        return Ok(done);
    }
    std::fs::create_dir_all(&paths.dir).map_err(AgentError::io(format!("creating {}", paths.dir.display())))?;
    let size_bytes = match (size_mib, image) {
        (_, Some(image)) => {
            let _ = std::fs::remove_file(paths.disk());
            disk::ensure_copy(image.to_path_buf(), paths.disk())
                .await
                .map_err(AgentError::io(format!("copying {} into the volume", image.display())))?;
            std::fs::metadata(paths.disk()).map_err(AgentError::io("reading the volume's size"))?.len()
        }
        (Some(mib), None) => {
            let bytes = mib << 20;
            let file = std::fs::File::create(paths.disk()).map_err(AgentError::io("creating the volume's disk"))?;
            file.set_len(bytes).map_err(AgentError::io("sizing the volume's disk"))?;
            file.sync_all().map_err(AgentError::io("flushing the volume's disk"))?;
            bytes
        }
        (None, None) => return Err(AgentError::Invalid("a volume needs sizeMib or an image".into())),
    };
    let record = Record { display_name: display_name.to_string(), size_bytes };
    std::fs::write(paths.record(), serde_json::to_vec(&record).unwrap_or_default())
        .map_err(AgentError::io("recording the volume"))?;
    tracing::info!(volume = %uid, name = display_name, size_bytes, "volume made");
    made(uid, paths).ok_or_else(|| AgentError::io("reading the volume's record")(std::io::ErrorKind::NotFound.into()))
}

/// Removes the volume at `paths`; answers whether there was one.
pub fn delete(paths: &VolumePaths) -> Result<bool, AgentError> {
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(AgentError::io(format!("removing {}", paths.dir.display()))(e)),
    }
}
