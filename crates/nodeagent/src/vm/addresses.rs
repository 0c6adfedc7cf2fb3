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
        let uid = &self.uid;
        let mut used = std::collections::BTreeSet::new();
        for entry in
            std::fs::read_dir(self.host.cfg.run_dir.vms()).map_err(AgentError::io("listing VM directories"))?.flatten()
        {
            if entry.file_name().to_string_lossy() == uid.as_str() {
                continue;
            }
            if let Some(ip) = read_ip(&VmPaths { dir: entry.path() }) {
                used.insert(ip);
            }
        }
        let ip = crate::host::ipam::assign(self.host.subnet(), uid.as_str(), request, &used)
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        std::fs::write(paths.ip(), ip.to_string()).map_err(AgentError::io("recording the guest address"))?;
        Ok(Some(ip))
    }
}
