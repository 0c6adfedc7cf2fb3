//! HTTP/1.1 client for one Firecracker API socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::models::*;

/// Time allowed to connect to the socket.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed for one request, from send to the full response.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Failures talking to Firecracker.
#[derive(Debug, thiserror::Error)]
pub enum FcError {
    #[error("cannot connect to the Firecracker socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Firecracker did not answer {method} {path} within {timeout:?}")]
    Timeout { method: &'static str, path: String, timeout: Duration },
    #[error("HTTP exchange with Firecracker failed on {method} {path}")]
    Http {
        method: &'static str,
        path: String,
        #[source]
        source: hyper::Error,
    },
    /// Firecracker answered with an error status and its `fault_message`.
    #[error("Firecracker refused {method} {path} ({status}): {fault_message}")]
    Api { method: &'static str, path: String, status: u16, fault_message: String },
    #[error("unexpected response to {method} {path}: {message}")]
    Decode { method: &'static str, path: String, message: String },
}

impl FcError {
    /// Whether the same request may succeed if sent again later: connection
    /// trouble and timeouts are; Firecracker's 4xx verdicts are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            FcError::Connect { .. } | FcError::Timeout { .. } | FcError::Http { .. } => true,
            FcError::Api { status, .. } => *status >= 500,
            FcError::Decode { .. } => false,
        }
    }

    /// Firecracker's own message, when it gave one.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            FcError::Api { fault_message, .. } => Some(fault_message),
            _ => None,
        }
    }
}

/// A client for the Firecracker API on one unix socket. Each request uses
/// its own connection, so a client is cheap to clone and never wedged by a
/// half-finished exchange.
#[derive(Debug, Clone)]
pub struct FcClient {
    socket: PathBuf,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// Whether a request that changes the VMM is logged at info when it
    /// succeeds (at debug otherwise); a refusal is always logged at info.
    log_changes: bool,
}

impl FcClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            log_changes: true,
        }
    }

    /// This client, logging its successful requests at debug only: for a
    /// sequence its caller sums up in one line (a VMM's configuration
    /// before boot, in "VMM booted").
    pub fn quiet(mut self) -> Self {
        self.log_changes = false;
        self
    }

    /// Overrides the per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; returns the status and the body.
    ///
    /// # Errors
    /// `Api` for any non-2xx status, carrying Firecracker's `fault_message`.
    pub async fn send(&self, method: &'static str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Bytes), FcError> {
        let (status, bytes) = self.send_raw(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok((status, bytes));
        }
        let fault_message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(FcError::Api { method, path: path.to_string(), status, fault_message })
    }

    /// Sends one request and returns Firecracker's status and body as they
    /// are, whatever the status. Only transport failures are errors.
    pub async fn send_raw(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), FcError> {
        // Polls (GET) and the metrics sampler's flushes are many; what
        // changes the VMM is logged at info.
        let routine = method == "GET" || body.as_deref().is_some_and(|b| b.windows(12).any(|w| w == b"FlushMetrics"));
        let started = std::time::Instant::now();
        let result = self.exchange(method, path, body).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let upstream_status = result.as_ref().map(|(s, _)| *s).unwrap_or(0);
        let summed_up = !self.log_changes && (200..300).contains(&upstream_status);
        if routine || summed_up {
            tracing::debug!(method, path, upstream_status, latency_ms, "firecracker call");
        } else {
            tracing::info!(method, path, upstream_status, latency_ms, "firecracker call");
        }
        result
    }

    async fn exchange(&self, method: &'static str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Bytes), FcError> {
        let stream = tokio::time::timeout(self.connect_timeout, UnixStream::connect(&self.socket))
            .await
            .map_err(|_| FcError::Timeout { method, path: path.to_string(), timeout: self.connect_timeout })?
            .map_err(|source| FcError::Connect { path: self.socket.clone(), source })?;
        let exchange =
            async {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|source| FcError::Http { method, path: path.to_string(), source })?;
                let conn_task = tokio::spawn(conn);
                let mut builder = Request::builder()
                    .method(method)
                    .uri(path)
                    .header("Host", "localhost")
                    .header("Accept", "application/json");
                if body.is_some() {
                    builder = builder.header("Content-Type", "application/json");
                }
                let req = builder
                    .body(Full::new(Bytes::from(body.unwrap_or_default())))
                    .map_err(|e| FcError::Decode { method, path: path.to_string(), message: e.to_string() })?;
                let resp = sender.send_request(req).await.map_err(|source| FcError::Http {
                    method,
                    path: path.to_string(),
                    source,
                })?;
                let status = resp.status().as_u16();
                let bytes = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|source| FcError::Http { method, path: path.to_string(), source })?
                    .to_bytes();
                conn_task.abort();
                Ok::<_, FcError>((status, bytes))
            };
        tokio::time::timeout(self.request_timeout, exchange).await.map_err(|_| FcError::Timeout {
            method,
            path: path.to_string(),
            timeout: self.request_timeout,
        })?
    }

    async fn put<T: Serialize>(&self, method: &'static str, path: &str, body: &T) -> Result<(), FcError> {
        let json = serde_json::to_vec(body).map_err(|e| FcError::Decode {
            method,
            path: path.to_string(),
            message: e.to_string(),
        })?;
        self.send(method, path, Some(json)).await.map(|_| ())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, FcError> {
        let (_, bytes) = self.send("GET", path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| FcError::Decode {
            method: "GET",
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// `GET /`: instance id, state and version.
    pub async fn describe_instance(&self) -> Result<InstanceInfo, FcError> {
        self.get("/").await
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<FirecrackerVersion, FcError> {
        self.get("/version").await
    }

    /// `PUT /machine-config` (pre-boot only).
    pub async fn put_machine_config(&self, cfg: &MachineConfiguration) -> Result<(), FcError> {
        self.put("PUT", "/machine-config", cfg).await
    }

    /// `PUT /boot-source` (pre-boot only).
    pub async fn put_boot_source(&self, boot: &BootSource) -> Result<(), FcError> {
        self.put("PUT", "/boot-source", boot).await
    }

    /// `PUT /drives/{drive_id}` (pre-boot only).
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), FcError> {
        self.put("PUT", &format!("/drives/{}", drive.drive_id), drive).await
    }

    /// `PUT /network-interfaces/{iface_id}` (pre-boot only).
    pub async fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), FcError> {
        self.put("PUT", &format!("/network-interfaces/{}", iface.iface_id), iface).await
    }

    /// `PATCH /drives/{drive_id}` (post-boot only).
    pub async fn patch_drive(&self, drive: &PartialDrive) -> Result<(), FcError> {
        self.put("PATCH", &format!("/drives/{}", drive.drive_id), drive).await
    }

    /// `PATCH /network-interfaces/{iface_id}` (post-boot only).
    pub async fn patch_network_interface(&self, iface: &PartialNetworkInterface) -> Result<(), FcError> {
        self.put("PATCH", &format!("/network-interfaces/{}", iface.iface_id), iface).await
    }

    /// `PUT /logger`; the file or FIFO must already exist.
    pub async fn put_logger(&self, logger: &Logger) -> Result<(), FcError> {
        self.put("PUT", "/logger", logger).await
    }

    /// `PUT /metrics`; the file or FIFO must already exist.
    pub async fn put_metrics(&self, metrics: &Metrics) -> Result<(), FcError> {
        self.put("PUT", "/metrics", metrics).await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), FcError> {
        self.put("PUT", "/actions", &InstanceActionInfo { action_type }).await
    }

    /// `PUT /actions {InstanceStart}`: boots the guest.
    pub async fn instance_start(&self) -> Result<(), FcError> {
        self.action(ActionType::InstanceStart).await
    }

    /// `PUT /actions {FlushMetrics}`: writes the metrics now.
    pub async fn flush_metrics(&self) -> Result<(), FcError> {
        self.action(ActionType::FlushMetrics).await
    }

    /// `PUT /actions {SendCtrlAltDel}`: asks the guest to shut down.
    pub async fn send_ctrl_alt_del(&self) -> Result<(), FcError> {
        self.action(ActionType::SendCtrlAltDel).await
    }

    /// `PUT /snapshot/create` (the microVM must be Paused).
    pub async fn create_snapshot(&self, params: &SnapshotCreateParams) -> Result<(), FcError> {
        self.put("PUT", "/snapshot/create", params).await
    }

    /// `PUT /snapshot/load` (only on a VMM with nothing but logger and metrics configured).
    pub async fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), FcError> {
        self.put("PUT", "/snapshot/load", params).await
    }

    /// `PUT /mmds/config` (pre-boot only, after the interfaces it names).
    pub async fn put_mmds_config(&self, config: &MmdsConfig) -> Result<(), FcError> {
        self.put("PUT", "/mmds/config", config).await
    }

    /// `PUT /mmds`: replaces the metadata store's contents (any time).
    pub async fn put_mmds(&self, contents: &serde_json::Value) -> Result<(), FcError> {
        self.put("PUT", "/mmds", contents).await
    }

    /// `GET /mmds`: the metadata store's contents.
    pub async fn get_mmds(&self) -> Result<serde_json::Value, FcError> {
        self.get("/mmds").await
    }

    /// `GET /vm/config`: the full configuration as Firecracker holds it.
    pub async fn vm_config(&self) -> Result<serde_json::Value, FcError> {
        self.get("/vm/config").await
    }

    /// `PATCH /vm` (post-boot only).
    pub async fn set_vm_state(&self, state: VmState) -> Result<(), FcError> {
        self.put("PATCH", "/vm", &Vm { state }).await
    }
}
