//! The agent's HTTP API for the controller. Every route requires the node
//! credential; every mutating call is declarative and safe to repeat. The
//! guarded Firecracker passthrough ([`proxy`]), the node's credentials
//! ([`credentials`]) and its registration and heartbeat ([`register`])
//! live beside it.

pub mod credentials;
pub mod fence;
pub mod proxy;
pub mod register;
pub mod transfer;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::{Path, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::{any, get};
use axum::{Json, Router};
use nexus_api::agent::{EnsureVm, Inventory, VmReport};
use serde::Deserialize;

use crate::error::AgentError;
use crate::paths::Uid;
use crate::vm::Runtime;

/// Shared state of the agent's handlers.
#[derive(Debug, Clone)]
pub struct AgentState {
    pub runtime: Arc<Runtime>,
    /// What callers must present.
    pub credential: Arc<crate::server::credentials::AgentCredential>,
    /// What this node offers.
    pub capacity: nexus_api::node::NodeCapacity,
    /// The node's name, a label of its metrics.
    pub node: String,
    /// Other nodes' tokens the apiserver vouched for (snapshot transfers).
    pub peers: Arc<transfer::Peers>,
}

/// The agent's routes.
pub fn router(state: AgentState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/v1/stats", get(node_stats))
        .route("/v1/vms/{uid}/stats", get(vm_stats))
        .route("/v1/inventory", get(inventory))
        .route("/v1/capacity", get(capacity))
        .route("/v1/gc", axum::routing::post(collect))
        .route("/v1/vms/{uid}", get(report).put(ensure).delete(remove))
        .route("/v1/vms/{uid}/proxy", any(proxy_root))
        .route("/v1/vms/{uid}/proxy/", any(proxy_root))
        .route("/v1/vms/{uid}/proxy/{*path}", any(proxy))
        .route("/v1/snapshots/{uid}", get(snapshot_report).put(snapshot).delete(delete_snapshot))
        .route("/v1/snapshots/{uid}/transfer", get(transfer::manifest))
        .route("/v1/snapshots/{uid}/transfer/{file}", get(transfer::file))
        .route("/v1/volumes/{uid}", get(volume_report).put(ensure_volume).delete(delete_volume))
        .route("/v1/vms/{uid}/logs", get(logs))
        .route("/v1/vms/{uid}/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(fence::Terms::default(), fence::layer))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(axum::middleware::from_fn(trace))
        .with_state(state)
}

/// Runs each request under its caller's request id (a fresh one when it
/// sent none): every line logged while serving it, the Firecracker calls
/// included, carries the id; the request itself is logged once, with its
/// status and latency (at debug for reads, which the controller makes often).
async fn trace(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(nexus_client::trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| nexus_client::trace::is_sane(v))
        .map(str::to_string)
        .unwrap_or_else(nexus_client::trace::new_id);
    let method = req.method().clone();
    let path: String = req.uri().path().chars().take(200).collect();
    let span = tracing::info_span!("request", request_id = %id);
    let started = std::time::Instant::now();
    let mut resp =
        nexus_client::trace::scope(id.clone(), tracing::Instrument::instrument(next.run(req), span.clone())).await;
    let status = resp.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if method == Method::GET && status < 400 {
            tracing::debug!(%method, path, status, latency_ms, "request");
        } else {
            tracing::info!(%method, path, status, latency_ms, "request");
        }
    });
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(nexus_client::trace::HEADER, v);
    }
    resp
}

/// Rejects requests without the node credential; the operations routes
/// (`/healthz`, `/readyz`, `/metrics`) are open, as the apiserver's are,
/// so probes and Prometheus need no secret.
async fn authenticate(State(state): State<AgentState>, req: Request, next: Next) -> Result<Response, AgentError> {
    // Other nodes copying a snapshot present their own token, checked there.
    if !req.uri().path().starts_with("/v1/") || transfer::is_transfer(req.uri().path()) {
        return Ok(next.run(req).await);
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !state.credential.accepts(presented) {
        return Err(AgentError::Unauthorized);
    }
    Ok(next.run(req).await)
}

/// Ready to run VMs: the bridge is there and the run directory writable.
async fn readyz(State(state): State<AgentState>) -> Response {
    match state.runtime.host().readiness().await {
        Ok(()) => "ok".into_response(),
        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

/// The per-VM series for Prometheus.
async fn prometheus(State(state): State<AgentState>) -> Response {
    let body = state.runtime.vm_metrics().render(&state.node);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn node_stats(State(state): State<AgentState>) -> Json<nexus_api::agent::NodeStats> {
    Json(state.runtime.vm_metrics().node())
}

async fn vm_stats(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
) -> Result<Json<nexus_api::agent::VmStats>, AgentError> {
    let uid = Uid::parse(&uid)?;
    state.runtime.vm_metrics().stats(uid.as_str()).map(Json).ok_or_else(|| {
        AgentError::NotFound(format!("no metrics for VM {uid} yet: its VMM is not running here, or not sampled yet"))
    })
}

async fn report(State(state): State<AgentState>, Path(uid): Path<String>) -> Result<Json<VmReport>, AgentError> {
    let uid = Uid::parse(&uid)?;
    Ok(Json(state.runtime.report(&uid).await?))
}

async fn ensure(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
    Json(req): Json<EnsureVm>,
) -> Result<Json<VmReport>, AgentError> {
    if req.uid != uid {
        return Err(AgentError::Invalid(format!("body uid {:?} does not match the path uid {uid:?}", req.uid)));
    }
    Ok(Json(state.runtime.ensure(&req).await?))
}

/// `202 Accepted` while the removal is under way, `200` once nothing is left.
async fn remove(State(state): State<AgentState>, Path(uid): Path<String>) -> Result<Response, AgentError> {
    let report = state.runtime.remove(&uid).await?;
    let status = if report.state == nexus_api::agent::ObservedState::Removing {
        axum::http::StatusCode::ACCEPTED
    } else {
        axum::http::StatusCode::OK
    };
    Ok((status, Json(report)).into_response())
}

async fn proxy_root(State(state): State<AgentState>, Path(uid): Path<String>, method: Method, body: Bytes) -> Response {
    proxy_to(&state, &uid, method, "", body).await
}

async fn proxy(State(state): State<AgentState>, Path((uid, _)): Path<(String, String)>, req: Request) -> Response {
    // The raw path, not the decoded one: %-escapes are refused, not interpreted.
    let raw = req.uri().path().to_string();
    let prefix = format!("/v1/vms/{uid}/proxy/");
    let fc_path = raw.strip_prefix(&prefix).unwrap_or("%").to_string();
    let method = req.method().clone();
    let body = match axum::body::to_bytes(req.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(_) => return AgentError::Invalid("the request body is larger than 64 KiB".into()).into_response(),
    };
    proxy_to(&state, &uid, method, &fc_path, body).await
}

async fn proxy_to(state: &AgentState, uid: &str, method: Method, fc_path: &str, body: Bytes) -> Response {
    let uid = match Uid::parse(uid) {
        Ok(u) => u,
        Err(e) => return AgentError::from(e).into_response(),
    };
    match state.runtime.proxy(&uid, &method, fc_path, body).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(uid = %uid, method = %method, path = %fc_path.chars().take(100).collect::<String>(), error = %e, "proxy request refused");
            e.into_response()
        }
    }
}

/// Query of the logs endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default)]
    file: crate::vm::logs::LogFile,
    #[serde(default = "default_tail")]
    tail: usize,
    #[serde(default)]
    follow: bool,
    /// Only lines stamped at or after this time (RFC 3339; Firecracker's
    /// log only: the console's lines carry no time).
    #[serde(default)]
    since: Option<chrono::DateTime<chrono::Utc>>,
}

fn default_tail() -> usize {
    100
}

async fn logs(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let uid = match Uid::parse(&uid) {
        Ok(u) => u,
        Err(e) => return AgentError::from(e).into_response(),
    };
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => {
            return AgentError::Invalid(format!(
                "{e}; use file=firecracker|console, tail=N (at most 10000), follow=true, since=RFC3339"
            ))
            .into_response();
        }
    };
    if q.tail > crate::vm::logs::MAX_TAIL {
        return AgentError::Invalid(format!("tail={} is more than {}", q.tail, crate::vm::logs::MAX_TAIL))
            .into_response();
    }
    if q.since.is_some() && q.file == crate::vm::logs::LogFile::Console {
        return AgentError::Invalid(
            "since= applies to the Firecracker log only: the guest console's lines carry no time; use tail=N".into(),
        )
        .into_response();
    }
    let vm = match state.runtime.vm_paths(&uid) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let path = q.file.path(&vm);
    if q.follow {
        if !path.exists() {
            return AgentError::NotFound(format!("no {:?} log for VM {uid} on this node", q.file)).into_response();
        }
        let stream = crate::vm::logs::follow(vm, q.file, q.tail, q.since);
        return (
            [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            axum::body::Body::from_stream(stream),
        )
            .into_response();
    }
    let lines = match q.since {
        Some(t) => crate::vm::logs::tail_since(&path, q.tail, t),
        None => crate::vm::logs::tail(&path, q.tail).map(|(lines, _)| lines),
    };
    match lines {
        Ok(lines) => {
            let mut text = lines.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            ([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            AgentError::NotFound(format!("no {:?} log for VM {uid} on this node", q.file)).into_response()
        }
        Err(e) => AgentError::io("reading the log")(e).into_response(),
    }
}

/// Query of the metrics endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsQuery {
    #[serde(default)]
    flush: bool,
}

async fn metrics(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
    Query(q): Query<MetricsQuery>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let uid = Uid::parse(&uid)?;
    let paths = state.runtime.vm_paths(&uid)?;
    if q.flush {
        state.runtime.flush_metrics(&uid).await;
    }
    match crate::vm::logs::latest_metrics(&paths) {
        Ok(Some(v)) => Ok(Json(v)),
        Ok(None) => Err(AgentError::NotFound(format!("VM {uid} has written no metrics yet; ask with flush=true"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(AgentError::NotFound(format!("no VM {uid} on this node")))
        }
        Err(e) => Err(AgentError::io("reading metrics")(e)),
    }
}

async fn snapshot(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
    Json(req): Json<nexus_api::agent::SnapshotRequest>,
) -> Result<Json<nexus_api::agent::SnapshotReport>, AgentError> {
    Ok(Json(state.runtime.snapshot(&uid, &req).await?))
}

async fn snapshot_report(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
) -> Result<Json<nexus_api::agent::SnapshotReport>, AgentError> {
    Ok(Json(state.runtime.snapshot_report(&uid).await?))
}

/// Removes a snapshot's files; answers whether there were any.
async fn delete_snapshot(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let removed = state.runtime.delete_snapshot(&uid).await?;
    Ok(Json(serde_json::json!({ "removed": removed })))
}

async fn ensure_volume(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
    Json(req): Json<nexus_api::agent::VolumeRequest>,
) -> Result<Json<nexus_api::agent::VolumeReport>, AgentError> {
    Ok(Json(state.runtime.ensure_volume(&uid, &req).await?))
}

async fn volume_report(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
) -> Result<Json<nexus_api::agent::VolumeReport>, AgentError> {
    Ok(Json(state.runtime.volume_report(&uid).await?))
}

/// Removes a volume's file; answers whether there was one.
async fn delete_volume(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let removed = state.runtime.delete_volume(&uid).await?;
    Ok(Json(serde_json::json!({ "removed": removed })))
}

/// What the node offers, what its VMs take, and how it runs them.
async fn capacity(State(state): State<AgentState>) -> Json<nexus_api::agent::CapacityReport> {
    let rt = &state.runtime;
    let host = rt.host();
    Json(nexus_api::agent::CapacityReport {
        capacity: state.capacity.clone(),
        allocated: rt.allocation(),
        subnet: host.subnet().map(|s| s.cidr()),
        process_manager: if host.cfg.scopes.is_some() { "systemd" } else { "direct" }.into(),
        cgroups: host.cfg.cgroups.is_some(),
        disk_clone: host.disk_clone().into(),
    })
}

async fn collect(
    State(state): State<AgentState>,
    Json(req): Json<nexus_api::agent::Collect>,
) -> Result<Json<nexus_api::agent::CollectReport>, AgentError> {
    let removed = state.runtime.collect(&req).await?;
    Ok(Json(nexus_api::agent::CollectReport { removed }))
}

/// `GET /v1/inventory` parameters.
#[derive(Debug, Default, serde::Deserialize)]
struct InventoryQuery {
    /// Include a report of every VM (each asks its VMM): off by default, as
    /// the garbage collector, which asks every few seconds, needs none.
    #[serde(default)]
    vms: bool,
}

async fn inventory(
    State(state): State<AgentState>,
    Query(q): Query<InventoryQuery>,
) -> Result<Json<Inventory>, AgentError> {
    Ok(Json(state.runtime.inventory(q.vms).await?))
}
