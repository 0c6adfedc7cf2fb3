//! The guest address of each VM, from the node's subnet: kept in the VM's
//! run directory for its life, and unique among the node's VMs.

use super::files::read_ip;
use super::owner::VmOwner;
use crate::error::AgentError;
use crate::paths::VmPaths;

impl VmOwner {
    /// The VM's guest address: the one it already has, else a new one
    /// (recorded in its run directory). `None` when it asked for none.
    pub(super) fn assign_ip(
        &self,
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
        let _choosing = self.host.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let ip = choose(&self.host.cfg.run_dir.vms(), self.uid.as_str(), self.host.subnet(), request)?;
        std::fs::write(paths.ip(), ip.to_string()).map_err(AgentError::io("recording the guest address"))?;
        Ok(Some(ip))
    }
}

/// A free address for VM `uid` on a node whose VM directories are in
/// `vms`: `request` itself, or (`auto`) one no other VM has recorded. The
/// caller holds the node's address lock until it has recorded the answer.
fn choose(
    vms: &std::path::Path,
    uid: &str,
    subnet: Option<crate::host::ipam::Subnet>,
    request: &str,
) -> Result<std::net::Ipv4Addr, AgentError> {
    let mut used = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(vms).map_err(AgentError::io("listing VM directories"))?.flatten() {
        if entry.file_name().to_string_lossy() == uid {
            continue;
        }
        if let Some(ip) = read_ip(&VmPaths { dir: entry.path() }) {
            used.insert(ip);
        }
    }
    crate::host::ipam::assign(subnet, uid, request, &used).map_err(|e| AgentError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier, Mutex};

    use super::*;
    use crate::host::ipam::Subnet;

    #[test]
    fn vms_choosing_at_once_under_the_lock_get_addresses_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let vms = Arc::new(dir.path().to_path_buf());
        // 13 usable addresses besides the gateway: a dozen VMs must collide
        // on where their search starts.
        let subnet = Some(Subnet { gateway: "10.9.0.1".parse().unwrap(), len: 28 });
        let lock = Arc::new(Mutex::new(()));
        let start = Arc::new(Barrier::new(12));
        let threads: Vec<_> = (0..12)
            .map(|i| {
                let (vms, lock, start) = (vms.clone(), lock.clone(), start.clone());
                std::thread::spawn(move || {
                    let uid = format!("vm-{i}");
                    let paths = VmPaths { dir: vms.join(&uid) };
                    std::fs::create_dir_all(&paths.dir).unwrap();
                    start.wait();
                    let _choosing = lock.lock().unwrap();
                    let ip = choose(&vms, &uid, subnet, "auto").unwrap();
                    std::fs::write(paths.ip(), ip.to_string()).unwrap();
                    ip
                })
            })
            .collect();
        let ips: std::collections::BTreeSet<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(ips.len(), 12, "{ips:?}");
        assert!(!ips.contains(&"10.9.0.1".parse().unwrap()), "not the gateway");
        // One left; a request for a taken address is refused.
        std::fs::create_dir_all(vms.join("late")).unwrap();
        assert!(choose(&vms, "late", subnet, "auto").is_ok());
        let taken = ips.first().unwrap().to_string();
        assert!(choose(&vms, "late", subnet, &taken).is_err());
    }
}
