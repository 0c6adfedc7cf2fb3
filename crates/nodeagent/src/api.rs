//! The agent's HTTP API for the controller. Every route requires the node
//! credential; every mutating call is declarative and safe to repeat.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use nexus_api::agent::{EnsureVm, Inventory, VmReport};

use crate::error::AgentError;
use crate::paths::Uid;
use crate::vms::Runtime;

/// Shared state of the agent's handlers.
#[derive(Debug, Clone)]
pub struct AgentState {
    pub runtime: Arc<Runtime>,
    pub token: Arc<String>,
}

/// The agent's routes.
pub fn router(state: AgentState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/inventory", get(inventory))
        .route("/v1/vms/{uid}", get(report).put(ensure).delete(remove))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Rejects requests without the node credential.
async fn authenticate(State(state): State<AgentState>, req: Request, next: Next) -> Result<Response, AgentError> {
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), state.token.as_bytes()) {
        return Err(AgentError::Unauthorized);
    }
    Ok(next.run(req).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

async fn remove(State(state): State<AgentState>, Path(uid): Path<String>) -> Result<Json<VmReport>, AgentError> {
    Ok(Json(state.runtime.remove(&uid).await?))
}

async fn inventory(State(state): State<AgentState>) -> Result<Json<Inventory>, AgentError> {
    Ok(Json(state.runtime.inventory().await?))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
