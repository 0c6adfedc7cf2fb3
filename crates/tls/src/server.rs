//! Serving HTTPS: a rustls configuration from PEM files, and an axum
//! listener that completes handshakes away from its accept loop and
//! answers plain HTTP on the TLS port with a clear error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to send its first byte and finish the
/// handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once
/// (a flood of idle sockets must not pin memory or tasks).
const MAX_HANDSHAKES: usize = 1024;
/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Failures loading a certificate and key.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every nexus process uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration for the certificate chain in `cert` and the key
/// in `key` (both PEM), speaking HTTP/1.1 over TLS 1.2 or 1.3.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let cert_pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsConfigError::Pem { path: cert.to_path_buf(), message: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsConfigError::NoCertificate { path: cert.to_path_buf() });
    }
    let key_pem = read(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsConfigError::NoKey { path: key.to_path_buf() },
        e => TlsConfigError::Pem { path: key.to_path_buf(), message: e.to_string() },
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read { path: path.to_path_buf(), source })
}

/// An HTTPS listener for `axum::serve`.
///
/// A task accepts TCP connections and hands each to a task of its own for
/// the handshake, so a slow or silent client never holds up the others. A
/// connection whose first byte is not a TLS handshake gets a `400` in the
/// error contract that says to use `https://`, then is closed.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TlsListener {
    /// Serves TLS with `config` on `tcp`. Must be called within a tokio
    /// runtime.
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(256);
        let acceptor = TlsAcceptor::from(config);
        let accept_task = tokio::spawn(accept_loop(tcp, acceptor, tx));
        Ok(TlsListener { ready, local, accept_task })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop never ends on its own; if it is gone the
            // listener is being dropped: wait for that.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(tcp: TcpListener, acceptor: TlsAcceptor, ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: back off a little
                // rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Handshake flights are small writes: without this, Nagle's
        // algorithm and delayed ACKs add tens of milliseconds to each.
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many TLS handshakes in progress; closing the connection");
            continue;
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, &acceptor)).await {
                Ok(Ok(Some(tls))) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Ok(None)) => tracing::debug!(%peer, "plain HTTP on the TLS port; told the client to use https"),
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Completes the handshake, or answers a plain-HTTP client and returns
/// `None`.
async fn handshake(stream: TcpStream, acceptor: &TlsAcceptor) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        return acceptor.accept(stream).await.map(Some);
    }
    answer_plain_http(stream).await?;
    Ok(None)
}

/// The body sent to a plain-HTTP request on a TLS port.
pub fn plain_http_body() -> String {
    serde_json::json!({
        "error": "BadRequest",
        "status": 400,
        "message": "this port serves HTTPS and the request came as plain HTTP",
        "suggestion": "use an https:// URL, with the cluster's CA file (ca.crt) as the trusted certificate authority",
        "requestId": "",
    })
    .to_string()
}

async fn answer_plain_http(mut stream: TcpStream) -> std::io::Result<()> {
    // Read the request head first: closing a socket with unread bytes
    // resets the connection, and the client would see that instead of
    // the answer.
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = plain_http_body();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// How a server listens.
#[derive(Debug, Clone)]
pub enum Serving {
    /// HTTPS with this configuration.
    Tls(Arc<ServerConfig>),
    /// Plain HTTP, asked for explicitly.
    Plain,
}

/// Failures choosing how to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error(
        "no TLS certificate: pass --tls-cert and --tls-key (make them with `nexus-apiserver init-pki`), or --plain-http to serve without TLS"
    )]
    NoCertificate,
    #[error("--tls-cert and --tls-key go together; only {given} was given")]
    Half { given: &'static str },
    #[error("--plain-http and --tls-cert/--tls-key contradict each other; choose one")]
    Both,
    #[error(transparent)]
    Config(#[from] TlsConfigError),
}

/// Decides how to serve from the flags: the certificate and key given,
/// else those in `default` (a `(cert, key)` pair used when both files
/// exist), else plain HTTP when `plain` says so, else an error.
pub fn serving(
    cert: Option<&Path>,
    key: Option<&Path>,
    plain: bool,
    default: Option<(PathBuf, PathBuf)>,
) -> Result<Serving, ServingError> {
    match (cert, key, plain) {
        (Some(_), Some(_), true) | (Some(_), None, true) | (None, Some(_), true) => Err(ServingError::Both),
        (Some(cert), Some(key), false) => Ok(Serving::Tls(server_config(cert, key)?)),
        (Some(_), None, false) => Err(ServingError::Half { given: "--tls-cert" }),
        (None, Some(_), false) => Err(ServingError::Half { given: "--tls-key" }),
        (None, None, true) => Ok(Serving::Plain),
        (None, None, false) => match default {
            Some((cert, key)) if cert.exists() && key.exists() => Ok(Serving::Tls(server_config(&cert, &key)?)),
            _ => Err(ServingError::NoCertificate),
        },
    }
}

/// Serves `app` on `tcp` as `serving` says until `shutdown` completes.
/// Warns when plain HTTP is served beyond the loopback.
pub async fn serve(
    tcp: TcpListener,
    serving: Serving,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match serving {
        Serving::Tls(config) => {
            let listener = TlsListener::new(tcp, config)?;
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
        Serving::Plain => {
            let local = tcp.local_addr()?;
            if !local.ip().is_loopback() {
                tracing::warn!(
                    listen = %local,
                    "serving plain HTTP beyond the loopback: tokens cross the network in clear text; serve TLS with --tls-cert and --tls-key"
                );
            }
            let tcp = axum::serve::ListenerExt::tap_io(tcp, |io| {
                let _ = io.set_nodelay(true);
            });
            axum::serve(tcp, app).with_graceful_shutdown(shutdown).await
        }
    }
}

impl Serving {
    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Serving::Tls(_) => "https",
            Serving::Plain => "http",
        }
    }
}
