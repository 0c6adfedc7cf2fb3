//! The guarded Firecracker passthrough `/v1/vms/{uid}/proxy/{fc path}`.
//!
//! Only allow-listed (method, path) pairs pass; the path may hold only
//! plain segments (no `..`, no percent-encoding); the socket must resolve,
//! symlinks followed, to a socket inside that VM's run directory; no
//! incoming header is forwarded (so no Host); Firecracker's status and body
//! come back unchanged, and a VMM that does not answer in time is a 504.

use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::firecracker::{FcClient, FcError};
use crate::paths::{RunDir, Uid};

/// Time a proxied request may take before the caller gets 504.
pub const PROXY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a proxied request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("the Firecracker path {0:?} is malformed: use plain segments such as vm/config, without '..' or %-escapes")]
    BadPath(String),
    #[error("{method} {path} is not allowed through the proxy")]
    NotAllowed { method: String, path: String },
    #[error("the request body is not allowed through the proxy: {0}")]
    BadBody(String),
    #[error("the VM's API socket resolves outside its run directory")]
    OutsideRunDir,
    #[error("no VMM socket for this VM on this node")]
    NoSocket,
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the VMM could not be reached: {0}")]
    Unreachable(String),
}

impl ProxyError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ProxyError::BadPath(_) | ProxyError::BadBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotAllowed { .. } | ProxyError::OutsideRunDir => StatusCode::FORBIDDEN,
            ProxyError::NoSocket => StatusCode::NOT_FOUND,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = nexus_api::ErrorBody {
            error: format!("{status}").split_whitespace().skip(1).collect::<Vec<_>>().join(""),
            message: self.to_string(),
            status: status.as_u16(),
            fault_message: None,
            suggestion: match self {
                ProxyError::NotAllowed { .. } => Some(format!(
                    "allowed: {}",
                    ALLOWED.iter().map(|(m, p)| format!("{m} /{p}")).collect::<Vec<_>>().join(", ")
                )),
                _ => None,
            },
            request_id: String::new(),
        };
        (status, axum::Json(body)).into_response()
    }
}

/// (method, path template) pairs that may pass; `*` is one plain segment.
const ALLOWED: &[(&str, &str)] = &[
    ("GET", ""),
    ("GET", "version"),
    ("GET", "vm/config"),
    ("GET", "machine-config"),
    // What the guest reads; the document itself is the agent's to write.
    ("GET", "mmds"),
    ("PATCH", "vm"),
    ("PATCH", "drives/*"),
    ("PATCH", "network-interfaces/*"),
    ("PUT", "actions"),
];

/// Checks the Firecracker path: plain segments of `[A-Za-z0-9_-]`.
pub fn check_path(raw: &str) -> Result<Vec<String>, ProxyError> {
    let bad = || ProxyError::BadPath(raw.chars().take(100).collect());
    if raw.len() > 256 {
        return Err(bad());
    }
    let trimmed = raw.strip_prefix('/').unwrap_or(raw);
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    trimmed
        .split('/')
        .map(|seg| {
            let ok = !seg.is_empty()
                && seg.len() <= 64
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if ok { Ok(seg.to_string()) } else { Err(bad()) }
        })
        .collect()
}

fn allowed(method: &Method, segments: &[String]) -> Option<&'static str> {
    ALLOWED.iter().find_map(|(m, tpl)| {
        let t: Vec<&str> = if tpl.is_empty() { Vec::new() } else { tpl.split('/').collect() };
        let matches = *m == method.as_str()
            && t.len() == segments.len()
            && t.iter().zip(segments).all(|(a, b)| *a == "*" || a == b);
        matches.then_some(*m)
    })
}

/// Rejects bodies that would reach outside the VM: a new backing file for a
/// drive, or actions other than FlushMetrics and SendCtrlAltDel.
fn check_body(segments: &[String], body: &[u8]) -> Result<(), ProxyError> {
    let first = segments.first().map(String::as_str);
    if !matches!(first, Some("drives") | Some("actions")) {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| ProxyError::BadBody(format!("not JSON: {e}")))?;
    match first {
        Some("drives") if v.get("path_on_host").is_some() => {
            Err(ProxyError::BadBody("path_on_host cannot be changed through the proxy; only rate_limiter".into()))
        }
        Some("actions") if !matches!(v["action_type"].as_str(), Some("FlushMetrics") | Some("SendCtrlAltDel")) => {
            Err(ProxyError::BadBody("only FlushMetrics and SendCtrlAltDel actions pass the proxy".into()))
        }
        _ => Ok(()),
    }
}

/// Resolves the VM's API socket, refusing anything that leaves its directory.
pub fn socket_for(run: &RunDir, uid: &Uid) -> Result<std::path::PathBuf, ProxyError> {
    let paths = run.vm(uid);
    let dir = paths.dir.canonicalize().map_err(|_| ProxyError::NoSocket)?;
    // The VM directory itself must be the real one under <run>/vms.
    if dir.parent() != Some(run.vms().as_path()) {
        return Err(ProxyError::OutsideRunDir);
    }
    // The socket, in the jail's run/, must be no link the VMM left there.
    let socket = paths.socket().canonicalize().map_err(|_| ProxyError::NoSocket)?;
    if socket.parent() != Some(dir.join("root/run").as_path()) && socket.parent() != Some(dir.as_path()) {
        return Err(ProxyError::OutsideRunDir);
    }
    let meta = std::fs::metadata(&socket).map_err(|_| ProxyError::NoSocket)?;
    if !meta.file_type().is_socket() {
        return Err(ProxyError::NoSocket);
    }
    Ok(socket)
}

/// Forwards one request; returns Firecracker's status and body unchanged.
pub async fn forward(
    run: &RunDir,
    uid: &Uid,
    method: &Method,
    raw_path: &str,
    body: Bytes,
) -> Result<Response, ProxyError> {
    let segments = check_path(raw_path)?;
    let Some(m) = allowed(method, &segments) else {
        return Err(ProxyError::NotAllowed { method: method.to_string(), path: format!("/{}", segments.join("/")) });
    };
    check_body(&segments, &body)?;
    let socket = socket_for(run, uid)?;
    let path = format!("/{}", segments.join("/"));
    let client = FcClient::new(&socket).with_request_timeout(PROXY_TIMEOUT);
    let body = (!body.is_empty()).then(|| body.to_vec());
    match client.send_raw(m, &path, body).await {
        Ok((status, bytes)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            if bytes.is_empty() {
                Ok(status.into_response())
            } else {
                Ok((status, [(axum::http::header::CONTENT_TYPE, "application/json")], bytes).into_response())
            }
        }
        Err(FcError::Timeout { timeout, .. }) => Err(ProxyError::Timeout(timeout)),
        Err(e) => Err(ProxyError::Unreachable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_segments_pass() {
        assert_eq!(check_path("vm/config").unwrap(), vec!["vm", "config"]);
        assert_eq!(check_path("").unwrap(), Vec::<String>::new());
        for bad in ["..", "vm/../x", "%2e%2e", "drives/a%2Fb", "a//b", "vm/config/", "x\0y", "./vm", &"a".repeat(300)] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_allow_list_and_body_rules_hold() {
        let seg = |p: &str| check_path(p).unwrap();
        assert!(allowed(&Method::GET, &seg("vm/config")).is_some());
        assert!(allowed(&Method::PATCH, &seg("drives/rootfs")).is_some());
        assert!(allowed(&Method::PUT, &seg("machine-config")).is_none());
        assert!(allowed(&Method::GET, &seg("mmds")).is_some());
        assert!(allowed(&Method::PUT, &seg("mmds")).is_none() && allowed(&Method::PATCH, &seg("mmds")).is_none());
        assert!(allowed(&Method::PUT, &seg("snapshot/create")).is_none());
        assert!(allowed(&Method::DELETE, &seg("vm")).is_none());
        assert!(check_body(&seg("drives/rootfs"), br#"{"drive_id":"rootfs","path_on_host":"/etc/shadow"}"#).is_err());
        assert!(check_body(&seg("drives/rootfs"), br#"{"drive_id":"rootfs","rate_limiter":{}}"#).is_ok());
        assert!(check_body(&seg("actions"), br#"{"action_type":"InstanceStart"}"#).is_err());
        assert!(check_body(&seg("actions"), br#"{"action_type":"FlushMetrics"}"#).is_ok());
    }
}
