//! Downloads of Image files a node lacks, or holds a bad copy of: from the
//! apiserver (an Image uploaded with `nexusctl image import`, read with the
//! node's own token) or from a URL. A download is written beside its final
//! name, hashed as it arrives, and renamed into place only when it matches
//! the Image's sha256: a node never boots from a partial or wrong file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::error::AgentError;

/// Fetches Image files; one download per file at a time.
#[derive(Debug, Default)]
pub struct Fetcher {
    /// The node's apiserver client (with its token); `None` when the agent
    /// runs without one (then only URL sources can be fetched).
    api: Option<nexus_client::Client>,
    busy: std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

fn failed(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

impl Fetcher {
    pub fn new(api: Option<nexus_client::Client>) -> Self {
        Self { api, busy: Default::default() }
    }

    /// Holds the download of `path`: a second caller waits, then finds the
    /// file in place.
    pub async fn hold(&self, path: &Path) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.busy.lock().unwrap_or_else(|p| p.into_inner()).entry(path.to_path_buf()).or_default().clone();
        lock.lock_owned().await
    }

    /// Downloads `source` (a URL, or a path on the apiserver starting with
    /// `/v1/`) to `path` if it hashes to `sha256`; returns its size.
    pub async fn fetch(&self, field: &str, path: &Path, source: &str, sha256: &str) -> Result<u64, AgentError> {
        let started = Instant::now();
        let (client, at) = match source.strip_prefix("/v1/") {
            Some(_) => {
                let api = self.api.clone().ok_or_else(|| {
                    AgentError::ImageInvalid(format!(
                        "{field} image is in the apiserver, and this agent has none to ask"
                    ))
                })?;
                (api, source.to_string())
            }
            None => {
                let (origin, at) = split_url(source).ok_or_else(|| {
                    AgentError::ImageInvalid(format!("{field} image source {source:?} is not an http(s) URL"))
                })?;
                (nexus_client::Client::new(origin, None), at.to_string())
            }
        };
        let mut stream = client
            .get_stream(&at)
            .await
            .map_err(|e| AgentError::ImageInvalid(format!("{field} image cannot be downloaded from {source}: {e}")))?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(failed(format!("creating {}", dir.display())))?;
        }
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        let mut file =
            tokio::fs::File::create(&partial).await.map_err(failed(format!("creating {}", partial.display())))?;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        let written: Result<(), AgentError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    AgentError::ImageInvalid(format!("{field} image download from {source} was cut short: {e}"))
                })?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(failed(format!("writing {}", partial.display())))?;
            }
            file.sync_all().await.map_err(failed(format!("flushing {}", partial.display())))
        }
        .await;
        let got = hex::encode(hasher.finalize());
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        if got != sha256 {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(AgentError::ImageInvalid(format!(
                "{field} image downloaded from {source} has sha256 {got}, the Image says {sha256}"
            )));
        }
        // Readable by VMM users (kernels are bind-mounted into their jails).
        {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644))
                .await
                .map_err(failed(format!("mode of {}", partial.display())))?;
        }
        tokio::fs::rename(&partial, path).await.map_err(failed(format!("moving {} into place", path.display())))?;
        tracing::info!(
            field,
            path = %path.display(),
            source,
            bytes = size,
            millis = started.elapsed().as_millis() as u64,
            "image downloaded and verified"
        );
        Ok(size)
    }
}

/// `scheme://authority` and the rest (`/path?query`, at least `/`) of an
/// http(s) URL.
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let scheme_len = url.len() - rest.len();
    match rest.find('/') {
        Some(i) if i > 0 => Some((&url[..scheme_len + i], &rest[i..])),
        None if !rest.is_empty() => Some((url, "/")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_origin_and_path() {
        assert_eq!(split_url("https://h.example:8443/a/b?c=d"), Some(("https://h.example:8443", "/a/b?c=d")));
        assert_eq!(split_url("http://h"), Some(("http://h", "/")));
        assert_eq!(split_url("ftp://h/x"), None);
        assert_eq!(split_url("https:///x"), None);
    }
}
