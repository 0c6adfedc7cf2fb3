//! Logs and metrics of VMs and nodes, read from the node agent that has
//! them: the apiserver finds the VM's node, calls that node's agent with
//! the node's own credential, and passes the answer on. Who may read a
//! VM's logs and metrics is who may read the VM (the auth layer decides
//! these subresources as `get` of their object).
//!
//! Logs stream as chunked `text/plain` (see decision 0012): the agent
//! writes plain lines, so a follow is a byte copy, `curl -N` shows it, and
//! nexusctl prints it as it comes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use futures::TryStreamExt;
use nexus_api::agent::{NodeStats, VmStats};
use nexus_api::{Node, NodeSpec, ResourceSpec, Vm, VmSpec};
use nexus_client::agent::{AgentCallError, AgentClient, AgentEndpoint};
use serde::Deserialize;

use crate::error::ApiError;
use crate::state::{AppState, SharedState};

/// How the apiserver reaches node agents.
#[derive(Debug, Clone)]
pub struct Agents {
    client: AgentClient,
}

impl Agents {
    /// Agents whose certificates `trust` verifies (the cluster's CA).
    pub fn new(trust: &nexus_client::tls::Trust) -> Self {
        Agents { client: AgentClient::new(trust) }
    }
}

/// The routes that read through to node agents.
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/v1/projects/{project}/vms/{name}/log", get(vm_log))
        .route("/v1/projects/{project}/vms/{name}/metrics", get(vm_metrics))
        .route("/v1/nodes/{name}/metrics", get(node_metrics))
}

/// Which log: the guest's serial console or the VMM's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    #[default]
    Console,
    Vmm,
}

/// Query of `GET .../vms/{name}/log`, as `kubectl logs` has it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default)]
    source: LogSource,
    /// The last N lines (default 100, at most 10,000).
    tail: Option<usize>,
    #[serde(default)]
    follow: bool,
    /// Only lines of the last duration (`30s`, `5m`, `2h`; the VMM's log only).
    since: Option<String>,
}

/// Most lines a tail may ask for (the agent's bound too).
const MAX_TAIL: usize = 10_000;

/// `30s`, `5m`, `2h`, `1d` → a duration, at most a year (366 days).
pub fn parse_duration(text: &str) -> Option<Duration> {
    nexus_api::validation::parse_duration(text).filter(|d| d.as_secs() <= 366 * 86_400)
}

async fn vm_log(
    State(state): State<SharedState>,
    Path((project, name)): Path<(String, String)>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::BadRequest(format!("{e}; use source=console|vmm, tail=N, follow=true, since=5m (the VMM's log only)"))
    })?;
    let tail = q.tail.unwrap_or(100);
    if tail > MAX_TAIL {
        return Err(ApiError::BadRequest(format!("tail={tail} is more than {MAX_TAIL}; ask for fewer lines")));
    }
    let since = match &q.since {
        None => None,
        Some(_) if q.source == LogSource::Console => {
            return Err(ApiError::BadRequest(
                "since= applies to source=vmm only: the guest console's lines carry no time; use tail=N".into(),
            ));
        }
        Some(text) => {
            let d = parse_duration(text).ok_or_else(|| {
                ApiError::BadRequest(format!("since={text:?} is not a duration; use a number and s, m, h or d: 5m"))
            })?;
            Some(Utc::now() - chrono::Duration::from_std(d).unwrap_or_default())
        }
    };
    let (vm, to) = vm_agent(&state, &project, &name).await?;
    let mut agent_query = vec![
        ("file", if q.source == LogSource::Console { "console" } else { "firecracker" }.to_string()),
        ("tail", tail.to_string()),
        ("follow", q.follow.to_string()),
    ];
    if let Some(t) = since {
        agent_query.push(("since", t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)));
    }
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let agents = agents(&state)?;
    let resp = with_trace(agents.client.logs(&to, &uid, &agent_query))
        .await
        .map_err(|e| agent_error(e, &format!("VM {project}/{name}")))?;
    let body = axum::body::Body::from_stream(resp.bytes_stream().map_err(std::io::Error::other));
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        [(header::HeaderName::from_static("x-content-type-options"), "nosniff")],
        body,
    )
        .into_response())
}

async fn vm_metrics(
    State(state): State<SharedState>,
    Path((project, name)): Path<(String, String)>,
) -> Result<axum::Json<VmStats>, ApiError> {
    let (vm, to) = vm_agent(&state, &project, &name).await?;
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let stats = with_trace(agents(&state)?.client.vm_stats(&to, &uid))
        .await
        .map_err(|e| agent_error(e, &format!("VM {project}/{name}")))?;
    Ok(axum::Json(stats))
}

async fn node_metrics(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<axum::Json<NodeStats>, ApiError> {
    let node = read_node(&state, &name).await?;
    let to = endpoint(&state, &node).await?;
    let stats = with_trace(agents(&state)?.client.node_stats(&to))
        .await
        .map_err(|e| agent_error(e, &format!("node {name}")))?;
    Ok(axum::Json(stats))
}

/// Runs an onward call under the request's trace id, so the agent logs it.
async fn with_trace<F: std::future::Future>(call: F) -> F::Output {
    nexus_client::trace::scope(crate::request_id::current_trace(), call).await
}

fn agents(state: &AppState) -> Result<&Arc<Agents>, ApiError> {
    state.agents.as_ref().ok_or_else(|| ApiError::Unavailable {
        message: "this apiserver does not call node agents".into(),
        suggestion: "start it with the cluster's CA in its PKI directory, or --agent-ca-file".into(),
    })
}

/// The VM and the agent of the node it runs on.
async fn vm_agent(state: &AppState, project: &str, name: &str) -> Result<(Vm, AgentEndpoint), ApiError> {
    let not_found = || ApiError::NotFound { kind: VmSpec::KIND.into(), project: project.into(), name: name.into() };
    let value = state.store.get(VmSpec::KIND, project, name).await?.ok_or_else(not_found)?;
    let vm: Vm = serde_json::from_value(value)?;
    let Some(node_name) = vm.status_or_default().node_name.or_else(|| vm.spec.node_name.clone()) else {
        return Err(ApiError::Unavailable {
            message: format!("VM {project}/{name} has not been placed on a node yet, so it has no logs or metrics"),
            suggestion: format!("see why with `nexusctl describe vm {name}`"),
        });
    };
    let node = read_node(state, &node_name).await?;
    Ok((vm, endpoint(state, &node).await?))
}

async fn read_node(state: &AppState, name: &str) -> Result<Node, ApiError> {
    let value = state.store.get(NodeSpec::KIND, "", name).await?.ok_or_else(|| ApiError::NotFound {
        kind: NodeSpec::KIND.into(),
        project: String::new(),
        name: name.into(),
    })?;
    Ok(serde_json::from_value(value)?)
}

async fn endpoint(state: &AppState, node: &Node) -> Result<AgentEndpoint, ApiError> {
    let name = node.name();
    let base = node.status_or_default().address;
    if base.is_empty() {
        return Err(ApiError::Unavailable {
            message: format!("node {name} has no agent address: its agent never reported"),
            suggestion: format!("check the node agent on {name} (`nexusctl describe node {name}`)"),
        });
    }
    let credential = state.store.node_credential(name).await?.ok_or_else(|| ApiError::Unavailable {
        message: format!("node {name} has set no agent credential"),
        suggestion: format!("restart the node agent on {name} so it registers again"),
    })?;
    Ok(AgentEndpoint { base, credential: credential.secret })
}

fn agent_error(e: AgentCallError, what: &str) -> ApiError {
    match e {
        AgentCallError::Rejected(body) => ApiError::Upstream {
            status: body.status,
            message: format!("the node agent of {what} answered: {}", body.message),
            suggestion: body.suggestion,
        },
        AgentCallError::Unavailable { message, .. } => ApiError::Unavailable {
            message: format!("cannot reach the node agent of {what}: {message}"),
            suggestion: "retry; if it persists, check the node (`nexusctl get nodes`)".into(),
        },
        AgentCallError::Failed(body) => ApiError::Unavailable {
            message: format!("the node agent of {what} failed: {}", body.message),
            suggestion: body.suggestion.unwrap_or_else(|| "retry; if it persists, check the node".into()),
        },
        AgentCallError::Unauthorized { .. } => ApiError::Unavailable {
            message: format!("the node agent of {what} refused the credential it registered"),
            suggestion: "retry in a few seconds: the agent may have just rotated it".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_since() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        for bad in ["", "5", "m", "5x", "-5m", "99999999999999999999s", "400d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
