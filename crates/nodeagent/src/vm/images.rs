//! The images a VM boots from: confined to the node's image roots and
//! checked against their Images' checksums before a VMM opens them, and
//! downloaded first when this node lacks them or holds a bad copy.

use std::path::{Path, PathBuf};

use nexus_api::agent::EnsureVm;

use super::owner::VmOwner;
use crate::error::AgentError;

impl VmOwner {
    /// Confines the kernel and root filesystem to the image roots and checks
    /// them against their Images' checksums, before a VMM opens them.
    /// Returns the kernel's and the initrd's paths on the host.
    pub(super) async fn check_images(&self, req: &EnsureVm) -> Result<(PathBuf, Option<PathBuf>), AgentError> {
        let kernel =
            self.image("kernel", &req.kernel_path, req.kernel_sha256.as_deref(), req.kernel_source.as_deref()).await?;
        self.image("rootfs", &req.rootfs_path, req.rootfs_sha256.as_deref(), req.rootfs_source.as_deref()).await?;
        let initrd = match &req.initrd_path {
            Some(path) => {
                Some(self.image("initrd", path, req.initrd_sha256.as_deref(), req.initrd_source.as_deref()).await?)
            }
            None => None,
        };
        Ok((kernel, initrd))
    }

    /// The image at `path`, confined and checked; one with a source that
    /// is missing here or does not match `sha256` is downloaded first.
    async fn image(
        &self,
        field: &str,
        path: &str,
        sha256: Option<&str>,
        source: Option<&str>,
    ) -> Result<PathBuf, AgentError> {
        let roots = &self.host.cfg.image_roots;
        let (Some(sum), Some(source)) = (sha256, source) else {
            let real = roots.check(field, path)?;
            if let Some(sum) = sha256 {
                self.host.verifier.verify(field, &real, sum).await?;
            }
            return Ok(real);
        };
        let _held = self.host.fetcher.hold(Path::new(path)).await;
        if std::fs::symlink_metadata(path).is_ok() {
            let real = roots.check(field, path)?;
            match self.host.verifier.verify(field, &real, sum).await {
                Ok(()) => return Ok(real),
                Err(AgentError::ImageInvalid(why)) => {
                    tracing::warn!(field, path, %why, "this node's copy of the image is corrupt; downloading it again");
                }
                Err(e) => return Err(e),
            }
        }
        let target = roots.target(field, path)?;
        self.host.fetcher.fetch(field, &target, source, sum).await?;
        let real = roots.check(field, path)?;
        self.host.verifier.verify(field, &real, sum).await?;
        Ok(real)
    }
}
