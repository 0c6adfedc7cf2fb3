//! Client for node agents' APIs.

use std::time::Duration;

use nexus_api::ErrorBody;
use nexus_api::agent::{Collect, EnsureVm, Inventory, VmReport};

/// Failures calling an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// The agent refused the request; sending it again will not help.
    #[error("the node agent rejected the request: {0}")]
    Rejected(ErrorBody),
    /// The agent failed or could not be reached; worth retrying.
    #[error("the node agent at {url} is unavailable: {message}")]
    Unavailable { url: String, message: String },
}

/// Calls node agents with the shared node credential.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    token: String,
}

impl AgentClient {
    pub fn new(token: String) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a TLS-less reqwest client always builds");
        Self { http, token }
    }

    /// Asks the agent at `base` to bring the VM to `req.state`.
    pub async fn ensure(&self, base: &str, req: &EnsureVm) -> Result<VmReport, AgentCallError> {
        let url = format!("{base}/v1/vms/{}", req.uid);
        self.call(self.http.put(&url).json(req), &url).await
    }

    /// Asks the agent at `base` to remove every trace of VM `uid`.
    pub async fn remove(&self, base: &str, uid: &str) -> Result<VmReport, AgentCallError> {
        let url = format!("{base}/v1/vms/{uid}");
        self.call(self.http.delete(&url), &url).await
    }

    /// What the agent at `base` finds on its host.
    pub async fn inventory(&self, base: &str) -> Result<Inventory, AgentCallError> {
        let url = format!("{base}/v1/inventory");
        self.call(self.http.get(&url), &url).await
    }

    /// Asks the agent at `base` to remove unclaimed things; returns what went.
    pub async fn collect(&self, base: &str, req: &Collect) -> Result<Vec<String>, AgentCallError> {
        let url = format!("{base}/v1/gc");
        let answer: serde_json::Value = self.call(self.http.post(&url).json(req), &url).await?;
        Ok(answer["removed"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, AgentCallError> {
        let unavailable = |message: String| AgentCallError::Unavailable { url: url.to_string(), message };
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| unavailable(e.to_string()))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("undecodable report: {e}")));
        }
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            error: "Unknown".into(),
            message: String::from_utf8_lossy(&bytes).into_owned(),
            status: status.as_u16(),
            fault_message: None,
            suggestion: None,
            request_id: String::new(),
        });
        // 401 means our credential is wrong: a retry may succeed once it is fixed.
        if status.is_client_error() && status.as_u16() != 401 {
            Err(AgentCallError::Rejected(body))
        } else {
            Err(unavailable(body.to_string()))
        }
    }
}
