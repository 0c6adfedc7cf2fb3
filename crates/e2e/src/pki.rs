//! The test cluster's PKI, made as an operator makes it (`nexus-apiserver
//! init-pki`, `issue-cert`), and clients that trust it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::*;

/// Makes the cluster's CA in `pki` (kept if there) with `nexus-apiserver
/// init-pki`, as an operator would. Returns the CA file.
pub fn init_pki(pki: &Path) -> PathBuf {
    let dir = pki.display().to_string();
    run_pki(&["init-pki", "--dir", &dir]);
    pki.join("ca.crt")
}

/// Issues serving certificate `name` for `sans` from the CA in `pki` with
/// `nexus-apiserver issue-cert`. Returns (certificate, key).
pub fn issue_cert(pki: &Path, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
    let dir = pki.display().to_string();
    let mut args = vec!["issue-cert", "--dir", &dir, "--name", name];
    for san in sans {
        args.extend(["--san", san]);
    }
    run_pki(&args);
    (pki.join(format!("{name}.crt")), pki.join(format!("{name}.key")))
}

fn run_pki(args: &[&str]) {
    let out = Command::new(bin("nexus-apiserver")).args(args).output().expect("running nexus-apiserver");
    assert!(out.status.success(), "nexus-apiserver {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Trust in the CA file `ca` (panics when it cannot be read).
pub fn trust(ca: &Path) -> nexus_client::tls::Trust {
    nexus_client::tls::Trust::ca_file(ca).unwrap_or_else(|e| panic!("{e}"))
}

/// A raw HTTP client that trusts the CA file `ca`, for requests the typed
/// client cannot make.
pub fn https_client(ca: &Path) -> reqwest::Client {
    trust(ca).apply(reqwest::Client::builder().timeout(Duration::from_secs(30))).build().expect("an HTTPS client")
}

/// A byte stream to a server: plain TCP or TLS.
pub trait RawIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawIo for T {}

/// Completes a TLS handshake over `tcp` with the server named `name`,
/// trusting only the CA file `ca`.
pub async fn tls_connect(
    tcp: tokio::net::TcpStream,
    ca: &Path,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(std::io::Error::other)? {
        roots.add(cert.map_err(std::io::Error::other)?).map_err(std::io::Error::other)?;
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await
}

/// A plain HTTP client (metrics endpoints and the like).
pub fn http_client() -> reqwest::Client {
    nexus_client::tls::Trust::system()
        .apply(reqwest::Client::builder().timeout(Duration::from_secs(30)))
        .build()
        .expect("an HTTP client")
}
