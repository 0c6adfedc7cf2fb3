//! The images a VM boots from: confined to the node's image roots and
//! checked against their Images' checksums before a VMM opens them, and
//! downloaded first when this node lacks them or holds a bad copy (see
//! [`crate::host::Host::image`]).

use std::path::PathBuf;

use nexus_api::agent::EnsureVm;

use super::owner::VmOwner;
use crate::error::AgentError;

impl VmOwner {
    /// Confines the kernel and root filesystem to the image roots and checks
    /// them against their Images' checksums, before a VMM opens them.
    /// Returns the kernel's and the initrd's paths on the host.
    pub(super) async fn check_images(&self, req: &EnsureVm) -> Result<(PathBuf, Option<PathBuf>), AgentError> {
        let kernel = self
            .host
            .image("kernel", &req.kernel_path, req.kernel_sha256.as_deref(), req.kernel_source.as_deref())
            .await?;
        self.host.image("rootfs", &req.rootfs_path, req.rootfs_sha256.as_deref(), req.rootfs_source.as_deref()).await?;
        let initrd = match &req.initrd_path {
            Some(path) => {
                Some(self.host.image("initrd", path, req.initrd_sha256.as_deref(), req.initrd_source.as_deref()).await?)
            }
            None => None,
        };
        Ok((kernel, initrd))
    }
}
