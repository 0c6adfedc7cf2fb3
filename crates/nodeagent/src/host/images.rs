//! Which host files a VM may boot from, and whether they are what their
//! Image says. The agent is the one that opens kernels and disks, so it is
//! the one that confines them: a path must be a regular file (not a
//! symlink, not a device) under one of the configured image roots, and
//! when the Image names a sha256, the file must hash to it. A file is
//! hashed before its first use and again when its size or mtime change.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::Digest;

use crate::error::AgentError;

/// Where images may live, canonicalized.
#[derive(Debug, Clone)]
pub struct ImageRoots(Vec<PathBuf>);

impl ImageRoots {
    /// The roots as given (they need not exist yet); each is canonicalized
    /// when it does.
    pub fn new(roots: &[PathBuf]) -> Self {
        ImageRoots(roots.iter().map(|r| r.canonicalize().unwrap_or_else(|_| r.clone())).collect())
    }

    /// The roots, for messages and the node's status.
    pub fn list(&self) -> Vec<String> {
        self.0.iter().map(|r| r.display().to_string()).collect()
    }

    /// Checks that `path` (from field `field` of a request) is a regular
    /// file under a root, reached without symlinks.
    pub fn check(&self, field: &str, path: &str) -> Result<PathBuf, AgentError> {
        let p = Path::new(path);
        let refuse = |why: &str| {
            AgentError::Forbidden(format!(
                "{field} {path:?} {why}; images must be regular files under {}",
                if self.0.is_empty() {
                    "an --image-root (none is configured)".to_string()
                } else {
                    self.list().join(", ")
                }
            ))
        };
        let meta = std::fs::symlink_metadata(p).map_err(|_| refuse("does not exist"))?;
        if meta.file_type().is_symlink() {
            return Err(refuse("is a symlink"));
        }
        if !meta.file_type().is_file() {
            return Err(refuse("is not a regular file (devices and directories are refused)"));
        }
        let real = p.canonicalize().map_err(|_| refuse("cannot be resolved"))?;
        if real != p {
            return Err(refuse("is reached through a symlink or '.' components"));
        }
        if !self.0.iter().any(|root| real.starts_with(root)) {
            return Err(refuse("is outside the image roots"));
        }
        Ok(real)
    }
}

impl ImageRoots {
    /// Where a download of `path` (from field `field`) may be written: an
    /// absolute path of plain components under a root, whose directory, once
    /// made, resolves under that root too.
    pub fn target(&self, field: &str, path: &str) -> Result<PathBuf, AgentError> {
        use std::path::Component;
        let p = Path::new(path);
        let refuse = |why: &str| {
            AgentError::Forbidden(format!("{field} {path:?} {why}; downloads go under {}", self.list().join(", ")))
        };
        if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(refuse("is not a plain absolute path"));
        }
        let Some(root) = self.0.iter().find(|root| p.starts_with(root) && p != root.as_path()) else {
            return Err(refuse("is outside the image roots"));
        };
        let dir = p.parent().unwrap_or(root);
        std::fs::create_dir_all(dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        if !dir.canonicalize().is_ok_and(|real| real.starts_with(root)) {
            return Err(refuse("leads out of the image roots through a symlink"));
        }
        if std::fs::symlink_metadata(p).is_ok_and(|m| !m.file_type().is_file()) {
            return Err(refuse("is there and is not a regular file"));
        }
        Ok(p.to_path_buf())
    }
}

/// A file as it was when it was hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    size: u64,
    modified: Option<SystemTime>,
    sha256: String,
}

/// Hashes images and remembers the result while the file stays the same.
#[derive(Debug, Default)]
pub struct Verifier {
    seen: Mutex<HashMap<PathBuf, Seen>>,
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

impl Verifier {
    /// Checks that `path` hashes to `expected` (lower-case hex), hashing on
    /// the blocking pool unless the file is unchanged since it was hashed.
    pub async fn verify(&self, field: &str, path: &Path, expected: &str) -> Result<(), AgentError> {
        let meta = std::fs::metadata(path).map_err(AgentError::io(format!("reading {}", path.display())))?;
        let (size, modified) = (meta.len(), meta.modified().ok());
        let known = self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(path).cloned();
        let sha256 = match known.filter(|s| s.size == size && s.modified == modified) {
            Some(s) => s.sha256,
            None => {
                let p = path.to_path_buf();
                let started = std::time::Instant::now();
                let sum = tokio::task::spawn_blocking(move || hash_file(&p))
                    .await
                    .map_err(|e| AgentError::Io {
                        what: "hashing".into(),
                        source: std::io::Error::other(e.to_string()),
                    })?
                    .map_err(AgentError::io(format!("hashing {}", path.display())))?;
                tracing::info!(path = %path.display(), bytes = size, millis = started.elapsed().as_millis() as u64, "image hashed");
                self.seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(path.to_path_buf(), Seen { size, modified, sha256: sum.clone() });
                sum
            }
        };
        if sha256 != expected {
            return Err(AgentError::ImageInvalid(format!(
                "{field} image {}: its sha256 is {sha256}, the Image says {expected}",
                path.display()
            )));
        }
        Ok(())
    }
}

impl super::Host {
    /// The image at `path`, confined and checked; one with a source that
    /// is missing here or does not match `sha256` is downloaded first.
    pub async fn image(
        &self,
        field: &str,
        path: &str,
        sha256: Option<&str>,
        source: Option<&str>,
    ) -> Result<PathBuf, AgentError> {
        let roots = &self.cfg.image_roots;
        let (Some(sum), Some(source)) = (sha256, source) else {
            let real = roots.check(field, path)?;
            if let Some(sum) = sha256 {
                self.verifier.verify(field, &real, sum).await?;
            }
            return Ok(real);
        };
        let _held = self.fetcher.hold(Path::new(path)).await;
        if std::fs::symlink_metadata(path).is_ok() {
            let real = roots.check(field, path)?;
            match self.verifier.verify(field, &real, sum).await {
                Ok(()) => return Ok(real),
                Err(AgentError::ImageInvalid(why)) => {
                    tracing::warn!(field, path, %why, "this node's copy of the image is corrupt; downloading it again");
                }
                Err(e) => return Err(e),
            }
        }
        let target = roots.target(field, path)?;
        self.fetcher.fetch(field, &target, source, sum).await?;
        let real = roots.check(field, path)?;
        self.verifier.verify(field, &real, sum).await?;
        Ok(real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_under_a_root_reached_directly_pass() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("vmlinux"), b"k").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("link")).unwrap();
        let roots = ImageRoots::new(std::slice::from_ref(&root));
        let real_root = root.canonicalize().unwrap();
        let ok = real_root.join("vmlinux");
        assert_eq!(roots.check("kernel", ok.to_str().unwrap()).unwrap(), ok);
        for bad in [
            "/etc/shadow".to_string(),
            "/dev/sda".to_string(),
            real_root.join("link").display().to_string(),
            format!("{}/../images/vmlinux", real_root.display()),
            real_root.display().to_string(),
        ] {
            let err = roots.check("kernel", &bad).unwrap_err().to_string();
            assert!(err.contains("images must be regular files under"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_wrong_checksum_is_refused_and_a_changed_file_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rootfs.ext4");
        std::fs::write(&f, b"hello").unwrap();
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let v = Verifier::default();
        v.verify("rootfs", &f, good).await.unwrap();
        let err = v.verify("rootfs", &f, &"0".repeat(64)).await.unwrap_err();
        assert!(matches!(err, AgentError::ImageInvalid(_)), "{err}");
        std::fs::write(&f, b"hello, changed").unwrap();
        assert!(v.verify("rootfs", &f, good).await.is_err(), "the new content is hashed, not the remembered sum");
    }
}
