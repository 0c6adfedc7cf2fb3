//! A VM's metadata service: Firecracker's MMDS (version 2, session tokens
//! required) on `eth0` at 169.254.169.254, holding the document
//! `nexus_api::guest::document` makes of the VM. Configured before boot,
//! filled again after a snapshot is loaded (Firecracker does not keep a
//! store's contents in a snapshot: a restored VM never sees its source's),
//! and replaced on a running VM whenever the document changes. What the
//! VMM holds is recorded in `mmds.json`.

use serde_json::Value;

use super::owner::VmOwner;
use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::firecracker::models::{MmdsConfig, MmdsVersion};
use crate::paths::VmPaths;
use nexus_api::agent::EnsureVm;

/// The metadata service's configuration: version 2 on `eth0`, at
/// Firecracker's default address.
pub fn config() -> MmdsConfig {
    MmdsConfig { version: MmdsVersion::V2, network_interfaces: vec!["eth0".into()], ipv4_address: None }
}

/// What the document is for `req` on this node (None: the request names
/// no guest identity, as a request from an older controller).
pub fn document(paths: &VmPaths, uid: &str, req: &EnsureVm) -> Option<Value> {
    let id = req.guest.as_ref()?;
    let address = super::files::read_ip(paths).map(|ip| ip.to_string());
    Some(nexus_api::guest::document(id, uid, address.as_deref()))
}

/// Records `doc` as what the VMM's metadata service holds.
pub fn record(paths: &VmPaths, doc: &Value) -> Result<(), AgentError> {
    std::fs::write(paths.mmds(), serde_json::to_vec(doc).unwrap_or_default())
        .map_err(AgentError::io("recording the metadata document"))
}

/// What the VMM's metadata service holds, as recorded.
pub fn recorded(paths: &VmPaths) -> Option<Value> {
    std::fs::read(paths.mmds()).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

impl VmOwner {
    /// Puts the VM's document into its running VMM when it differs from
    /// what the VMM holds (labels, metadata or user data were edited).
    pub(super) async fn apply_mmds(
        &self,
        paths: &VmPaths,
        req: &EnsureVm,
        client: &FcClient,
    ) -> Result<(), AgentError> {
        let Some(doc) = document(paths, self.uid.as_str(), req) else { return Ok(()) };
        if recorded(paths).as_ref() == Some(&doc) {
            return Ok(());
        }
        client.put_mmds(&doc).await.map_err(|source| AgentError::Firecracker { step: "mmds", source })?;
        tracing::info!(uid = %self.uid, "metadata document updated");
        record(paths, &doc)
    }
}
