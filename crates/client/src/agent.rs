//! Typed client for a node agent's API: the one place the controller (and
//! the tests) speak the agent's contract.

use std::time::Duration;

use crate::tls::Trust;
use nexus_api::ErrorBody;
use nexus_api::agent::{
    CapacityReport, Collect, CollectReport, EnsureVm, Inventory, NodeStats, SnapshotReport, SnapshotRequest, VmReport,
    VmStats, VolumeReport, VolumeRequest,
};

/// Failures calling an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// The agent refused the request; sending it again will not help.
    #[error("the node agent rejected the request: {0}")]
    Rejected(ErrorBody),
    /// The agent answered that it failed, in a way worth retrying (its
    /// body says why: a full disk, a VMM that does not answer).
    #[error("the node agent failed: {0}")]
    Failed(ErrorBody),
    /// The agent could not be reached; worth retrying.
    #[error("the node agent at {url} is unavailable: {message}")]
    Unavailable { url: String, message: String },
    /// The agent did not accept the credential (it rotated it, or the
    /// caller holds a stale one): fetch it again and retry.
    #[error("the node agent at {url} refused the credential")]
    Unauthorized { url: String },
}

impl AgentCallError {
    /// The agent's error body, when it answered with one.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            AgentCallError::Rejected(b) | AgentCallError::Failed(b) => Some(b),
            AgentCallError::Unavailable { .. } | AgentCallError::Unauthorized { .. } => None,
        }
    }
}

/// One node agent: where it listens and the credential it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// Base URL (`http://10.0.0.5:7444`).
    pub base: String,
    /// That agent's own credential.
    pub credential: String,
}

/// Calls node agents, each with its own credential.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    /// The lease fence sent with every call, shared with an apiserver client.
    fence: std::sync::Arc<crate::fence::Slot>,
}

impl AgentClient {
    /// A client that verifies agents serving HTTPS with `trust` (the
    /// cluster's CA, which signs their certificates).
    pub fn new(trust: &Trust) -> Self {
        let http = trust
            .apply(crate::http_builder().connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(30)))
            .build()
            .expect("a client with rustls and loaded certificates always builds");
        Self { http, fence: Default::default() }
    }

    /// This client, sending the lease fence `api` sends (set by a leader,
    /// see [`crate::Client::set_fence`]); an agent's refusal of an ended
    /// term is told to those waiting on [`crate::Client::fenced_off`].
    pub fn fenced_like(self, api: &crate::Client) -> Self {
        Self { fence: api.fence_slot(), ..self }
    }

    /// Asks the agent at `base` to bring the VM to `req.state`.
    pub async fn ensure(&self, to: &AgentEndpoint, req: &EnsureVm) -> Result<VmReport, AgentCallError> {
        let url = format!("{}/v1/vms/{}", to.base, req.uid);
        self.call(to, self.http.put(&url).json(req), &url).await
    }

    /// What the agent at `base` observes of VM `uid`.
    pub async fn report(&self, to: &AgentEndpoint, uid: &str) -> Result<VmReport, AgentCallError> {
        let url = format!("{}/v1/vms/{uid}", to.base);
        self.call(to, self.http.get(&url), &url).await
    }

    /// Asks the agent at `base` to remove every trace of VM `uid`.
    pub async fn remove(&self, to: &AgentEndpoint, uid: &str) -> Result<VmReport, AgentCallError> {
        let url = format!("{}/v1/vms/{uid}", to.base);
        self.call(to, self.http.delete(&url), &url).await
    }

    /// Takes snapshot `uid` of the VM `req` names; repeating it returns the
    /// snapshot already made.
    pub async fn snapshot(
        &self,
        to: &AgentEndpoint,
        uid: &str,
        req: &SnapshotRequest,
    ) -> Result<SnapshotReport, AgentCallError> {
        let url = format!("{}/v1/snapshots/{uid}", to.base);
        // Writing a large guest's memory takes a while.
        let call = self.http.put(&url).json(req).timeout(std::time::Duration::from_secs(600));
        self.call(to, call, &url).await
    }

    /// Snapshot `uid`, when it is complete on the node.
    pub async fn snapshot_report(&self, to: &AgentEndpoint, uid: &str) -> Result<SnapshotReport, AgentCallError> {
        let url = format!("{}/v1/snapshots/{uid}", to.base);
        self.call(to, self.http.get(&url), &url).await
    }

    /// Removes snapshot `uid`'s files from the node (done when absent).
    pub async fn delete_snapshot(&self, to: &AgentEndpoint, uid: &str) -> Result<(), AgentCallError> {
        let url = format!("{}/v1/snapshots/{uid}", to.base);
        self.call::<serde_json::Value>(to, self.http.delete(&url), &url).await.map(|_| ())
    }

    /// Makes volume `uid` on the node (a no-op when it is there).
    pub async fn ensure_volume(
        &self,
        to: &AgentEndpoint,
        uid: &str,
        req: &VolumeRequest,
    ) -> Result<VolumeReport, AgentCallError> {
        let url = format!("{}/v1/volumes/{uid}", to.base);
        // A copy of a large image may take a while where the node has no reflinks.
        let call = self.http.put(&url).json(req).timeout(std::time::Duration::from_secs(600));
        self.call(to, call, &url).await
    }

    /// Removes volume `uid`'s file from the node (done when absent).
    pub async fn delete_volume(&self, to: &AgentEndpoint, uid: &str) -> Result<(), AgentCallError> {
        let url = format!("{}/v1/volumes/{uid}", to.base);
        self.call::<serde_json::Value>(to, self.http.delete(&url), &url).await.map(|_| ())
    }

    /// What the agent at `base` finds on its host.
    pub async fn inventory(&self, to: &AgentEndpoint) -> Result<Inventory, AgentCallError> {
        let url = format!("{}/v1/inventory", to.base);
        self.call(to, self.http.get(&url), &url).await
    }

    /// What the node at `base` offers and how it runs VMs.
    pub async fn capacity(&self, to: &AgentEndpoint) -> Result<CapacityReport, AgentCallError> {
        let url = format!("{}/v1/capacity", to.base);
        self.call(to, self.http.get(&url), &url).await
    }

    /// Asks the agent at `base` to remove unclaimed things; returns what went.
    pub async fn collect(&self, to: &AgentEndpoint, req: &Collect) -> Result<CollectReport, AgentCallError> {
        let url = format!("{}/v1/gc", to.base);
        self.call(to, self.http.post(&url).json(req), &url).await
    }

    /// VM `uid`'s recent metrics as its node sampled them.
    pub async fn vm_stats(&self, to: &AgentEndpoint, uid: &str) -> Result<VmStats, AgentCallError> {
        let url = format!("{}/v1/vms/{uid}/stats", to.base);
        self.call(to, self.http.get(&url), &url).await
    }

    /// The node's use of its host and its VMs' metrics.
    pub async fn node_stats(&self, to: &AgentEndpoint) -> Result<NodeStats, AgentCallError> {
        let url = format!("{}/v1/stats", to.base);
        self.call(to, self.http.get(&url), &url).await
    }

    /// Opens VM `uid`'s log (`query`: the agent's `file`, `tail`, `follow`,
    /// `since`) and returns the response, whose body streams the text for
    /// as long as the agent follows it.
    pub async fn logs(
        &self,
        to: &AgentEndpoint,
        uid: &str,
        query: &[(&str, String)],
    ) -> Result<reqwest::Response, AgentCallError> {
        let url = format!("{}/v1/vms/{uid}/logs", to.base);
        // A followed log stays open as long as the reader wants it.
        let req = self.http.get(&url).query(query).timeout(Duration::from_secs(7 * 24 * 3600));
        let req = crate::trace::tag(req).bearer_auth(&to.credential);
        let started = std::time::Instant::now();
        let sent = req.send().await;
        let upstream_status = sent.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(method = "GET", url, upstream_status, latency_ms, "agent call (log stream opened)");
        let resp = sent.map_err(|e| AgentCallError::Unavailable {
            url: url.clone(),
            message: match crate::tls::tls_failure(&e) {
                Some(tls) => format!("TLS failed: {tls}"),
                None => e.to_string(),
            },
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status.as_u16() == 401 {
            return Err(AgentCallError::Unauthorized { url });
        }
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = error_body(status, &bytes);
        if status.is_client_error() && status.as_u16() != 429 {
            Err(AgentCallError::Rejected(body))
        } else {
            Err(AgentCallError::Failed(body))
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        to: &AgentEndpoint,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, AgentCallError> {
        let unavailable = |message: String| AgentCallError::Unavailable { url: url.to_string(), message };
        let req = match self.fence.header() {
            Some(fence) => req.header(nexus_api::lease::FENCE_HEADER, fence),
            None => req,
        };
        let req = crate::trace::tag(req).bearer_auth(&to.credential).build().map_err(|e| unavailable(e.to_string()))?;
        let method = req.method().clone();
        let started = std::time::Instant::now();
        let sent = self.http.execute(req).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let upstream_status = sent.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
        // Reads are frequent (every report); what changes a node is logged.
        if method == reqwest::Method::GET {
            tracing::debug!(%method, url, upstream_status, latency_ms, "agent call");
        } else {
            tracing::info!(%method, url, upstream_status, latency_ms, "agent call");
        }
        let resp = sent.map_err(|e| {
            unavailable(match crate::tls::tls_failure(&e) {
                Some(tls) => format!("TLS failed: {tls}"),
                None => e.to_string(),
            })
        })?;
        let status = resp.status();
        if status.as_u16() == 401 {
            return Err(AgentCallError::Unauthorized { url: url.to_string() });
        }
        let bytes = resp.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("undecodable answer: {e}")));
        }
        let body = error_body(status, &bytes);
        if body.error == crate::fence::FENCED {
            self.fence.refused();
        }
        // 429 asks to come back later.
        if status.is_client_error() && status.as_u16() != 429 {
            Err(AgentCallError::Rejected(body))
        } else {
            Err(AgentCallError::Failed(body))
        }
    }
}

/// The agent's error body, or one made of whatever it sent.
fn error_body(status: reqwest::StatusCode, bytes: &[u8]) -> ErrorBody {
    serde_json::from_slice::<ErrorBody>(bytes).unwrap_or_else(|_| ErrorBody {
        error: "Unknown".into(),
        message: String::from_utf8_lossy(bytes).chars().take(1000).collect(),
        status: status.as_u16(),
        fault_message: None,
        suggestion: None,
        request_id: String::new(),
    })
}
