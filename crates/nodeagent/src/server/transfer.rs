//! Serving a snapshot this node took to other nodes:
//! `GET /v1/snapshots/{uid}/transfer` (the report and the sha256 this node
//! recorded of each file) and `GET /v1/snapshots/{uid}/transfer/{file}`.
//!
//! The caller is another node's agent, which does not hold this node's
//! credential: it presents its own node token, which this agent has the
//! apiserver vouch for (`GET /v1/whoami` with that token, remembered for a
//! minute). Only node subjects are served, and only these two reads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use nexus_api::agent::SnapshotManifest;
use sha2::Digest;

use super::AgentState;
use crate::error::AgentError;
use crate::paths::Uid;

/// How long the apiserver's word on a token is trusted.
const VOUCHED_FOR: Duration = Duration::from_secs(60);

/// Node tokens the apiserver vouched for, by their sha256: the node they
/// stand for and when that was said.
#[derive(Debug, Default)]
pub struct Peers {
    vouched: Mutex<HashMap<String, (String, Instant)>>,
}

/// Whether `path` is one of the transfer routes (served to other nodes,
/// not behind this node's credential).
pub fn is_transfer(path: &str) -> bool {
    path.strip_prefix("/v1/snapshots/").is_some_and(|rest| {
        let mut parts = rest.split('/');
        matches!((parts.next(), parts.next(), parts.next(), parts.next()), (Some(_), Some("transfer"), _, None))
    })
}

impl Peers {
    /// The node whose token `headers` carry, as the apiserver says.
    async fn node(&self, state: &AgentState, headers: &HeaderMap) -> Result<String, AgentError> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| !t.is_empty())
            .ok_or(AgentError::Unauthorized)?;
        let key = hex::encode(sha2::Sha256::digest(token.as_bytes()));
        if let Some((node, at)) = self.vouched.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < VOUCHED_FOR
        {
            return Ok(node.clone());
        }
        let api = state.runtime.host().cfg.api.as_ref().ok_or_else(|| {
            AgentError::Forbidden("this agent has no apiserver to check another node's token with".into())
        })?;
        let asking = nexus_client::Client::with_trust(api.base(), Some(token.to_string()), api.trust().clone());
        let who = asking.whoami().await.map_err(|e| match e.status() {
            Some(401) => AgentError::Unauthorized,
            _ => AgentError::SnapshotCopy(format!("the apiserver could not vouch for the caller: {e}")),
        })?;
        let node = who.subject.strip_prefix("node:").map(str::to_string).ok_or_else(|| {
            AgentError::Forbidden(format!("{} is not a node; only nodes copy snapshots from each other", who.subject))
        })?;
        let mut vouched = self.vouched.lock().unwrap_or_else(|p| p.into_inner());
        vouched.retain(|_, (_, at)| at.elapsed() < VOUCHED_FOR);
        vouched.insert(key, (node.clone(), Instant::now()));
        Ok(node)
    }
}

/// The report and sha256 of a snapshot this node took.
pub async fn manifest(
    State(state): State<AgentState>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<SnapshotManifest>, AgentError> {
    let node = state.peers.node(&state, &headers).await?;
    let uid = Uid::parse(&uid)?;
    let host = state.runtime.host();
    let snap = host.cfg.run_dir.snapshot(&uid);
    let report = {
        let _files = host.snapshot_files.hold(&uid).await;
        crate::vm::snapshots::completed(&snap)
            .ok_or_else(|| AgentError::NotFound(format!("no complete snapshot {uid} on this node")))?
    };
    if snap.dir.join("copy.json").exists() {
        return Err(AgentError::NotFound(format!("snapshot {uid} is a copy here; copy it from the node that took it")));
    }
    let sums = tokio::task::spawn_blocking(move || crate::vm::snapshot_copy::sums(&snap))
        .await
        .map_err(|e| AgentError::Invalid(e.to_string()))?
        .map_err(AgentError::io(format!("hashing snapshot {uid}")))?;
    tracing::info!(snapshot = %uid, to = %node, "serving a snapshot's manifest");
    Ok(axum::Json(SnapshotManifest { report, sha256: sums }))
}

/// One file of a snapshot this node took, streamed.
pub async fn file(
    State(state): State<AgentState>,
    Path((uid, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, AgentError> {
    let node = state.peers.node(&state, &headers).await?;
    let uid = Uid::parse(&uid)?;
    let snap = state.runtime.host().cfg.run_dir.snapshot(&uid);
    let path = crate::vm::snapshot_copy::file(&snap, &name).ok_or_else(|| {
        AgentError::Invalid(format!("{name:?} is not a snapshot file; ask for one of state, memory, disk"))
    })?;
    if crate::vm::snapshots::completed(&snap).is_none() {
        return Err(AgentError::NotFound(format!("no complete snapshot {uid} on this node")));
    }
    let file = tokio::fs::File::open(&path).await.map_err(AgentError::io(format!("opening {}", path.display())))?;
    let bytes = file.metadata().await.map_err(AgentError::io(format!("reading {}", path.display())))?.len();
    tracing::info!(snapshot = %uid, file = %name, to = %node, bytes, "serving a snapshot file");
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    Ok(([(axum::http::header::CONTENT_LENGTH, bytes.to_string())], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_transfer_routes_are_transfers() {
        assert!(is_transfer("/v1/snapshots/u/transfer"));
        assert!(is_transfer("/v1/snapshots/u/transfer/memory"));
        assert!(!is_transfer("/v1/snapshots/u"));
        assert!(!is_transfer("/v1/snapshots/u/transfer/memory/x"));
        assert!(!is_transfer("/v1/vms/u/transfer"));
        assert!(!is_transfer("/v1/snapshots/u/other"));
    }
}
