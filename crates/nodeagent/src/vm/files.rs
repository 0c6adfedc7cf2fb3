//! The small files a VM's owner keeps in its run directory (the VMM's pid,
//! the guest's address, its start and restart records), read back, and
//! the removals that tolerate what is already gone.

use std::path::Path;
use std::time::Duration;

use chrono::Utc;

use crate::error::AgentError;
use crate::paths::VmPaths;

/// The guest address recorded for the VM.
pub fn read_ip(paths: &VmPaths) -> Option<std::net::Ipv4Addr> {
    std::fs::read_to_string(paths.ip()).ok()?.trim().parse().ok()
}

/// Times the VMM was started again after ending on its own.
pub fn read_restarts(paths: &VmPaths) -> u32 {
    std::fs::read_to_string(paths.restarts()).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// The pid of the VM's VMM, as recorded at its launch.
pub fn read_pid(paths: &VmPaths) -> Option<u32> {
    std::fs::read_to_string(paths.pid()).ok()?.trim().parse().ok()
}

/// When the VMM booted, and how long that took.
pub fn read_started(paths: &VmPaths) -> (Option<chrono::DateTime<Utc>>, Option<u64>) {
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
pub async fn remove_dir_all_settled(dir: &Path) -> Result<(), AgentError> {
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

/// Removes the file at `path`, if there is one.
pub fn remove_if_exists(path: &Path) -> Result<(), AgentError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("removing {}", path.display()))(e)),
    }
}
