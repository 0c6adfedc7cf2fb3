//! Checks of the fields of an `EnsureVm` the agent turns into host paths
//! or Firecracker settings, before anything is made for it.

use std::path::Path;

use nexus_api::agent::EnsureVm;

use crate::error::AgentError;

/// Refuses a request whose paths are not absolute (or climb with `..`),
/// whose machine is empty, or whose MAC is not one.
pub fn validate(req: &EnsureVm) -> Result<(), AgentError> {
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
