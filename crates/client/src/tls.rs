//! Which certificate authorities a client trusts for `https://` URLs.
//!
//! Every nexus client (nexusctl, the controller, the node agent, the
//! tests) builds its HTTP client through [`Trust`], so they all verify
//! servers the same way: against the cluster's CA file when one is given,
//! otherwise against the system's roots.

use std::path::{Path, PathBuf};
use std::sync::Once;

/// Failures reading a CA file.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("reading the CA file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the CA file {path} holds no PEM certificate ({detail})")]
    NotPem { path: PathBuf, detail: String },
}

/// The certificate authorities a client trusts.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Only these (PEM certificates of the cluster CA); `None`: the
    /// system's roots.
    only: Option<Vec<reqwest::Certificate>>,
}

impl Trust {
    /// Trust the system's root certificates (a server with a public
    /// certificate).
    pub fn system() -> Trust {
        Trust::default()
    }

    /// Trust only the certificates in the PEM file at `path` (the
    /// cluster's `ca.crt`).
    pub fn ca_file(path: &Path) -> Result<Trust, TrustError> {
        let pem = std::fs::read(path).map_err(|source| TrustError::Read { path: path.to_path_buf(), source })?;
        Trust::ca_pem(&pem).map_err(|detail| TrustError::NotPem { path: path.to_path_buf(), detail })
    }

    /// [`Trust::ca_file`] when given a path, else [`Trust::system`].
    pub fn ca_file_or_system(path: Option<&Path>) -> Result<Trust, TrustError> {
        path.map(Trust::ca_file).unwrap_or_else(|| Ok(Trust::system()))
    }

    /// Trust only the PEM certificates in `pem`.
    pub fn ca_pem(pem: &[u8]) -> Result<Trust, String> {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
        if certs.is_empty() {
            return Err("no BEGIN CERTIFICATE block".into());
        }
        Ok(Trust { only: Some(certs) })
    }

    /// `builder` set up to verify servers with this trust.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        install_crypto_provider();
        match &self.only {
            Some(certs) => builder.tls_certs_only(certs.iter().cloned()),
            None => builder,
        }
    }
}

/// Makes ring the process's TLS crypto provider (once; harmless when one
/// is installed already).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The TLS failure behind `e`, if that is what stopped the request.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // rustls errors reach reqwest wrapped in io::Errors (nested), whose
        // `source()` skips the wrapped error itself: unwrap them here.
        let mut io = err.downcast_ref::<std::io::Error>();
        while let Some(inner) = io.and_then(std::io::Error::get_ref) {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls.to_string());
            }
            io = inner.downcast_ref::<std::io::Error>();
        }
        cur = err.source();
    }
    None
}
