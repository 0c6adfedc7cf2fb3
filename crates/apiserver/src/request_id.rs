//! Request ids and the access log: every request gets an id, every error
//! body carries it, and every request is logged once with its latency.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Header a request id is read from (when sane) and echoed in.
pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served, or `""` outside a request.
pub fn current() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Rewrites a plain-text error (from the router or an extractor: 405, a bad
/// query string, an oversized body) into the error contract.
async fn to_error_contract(resp: Response, id: &str) -> Response {
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let reason = status.canonical_reason().unwrap_or("Error").replace(' ', "");
    let suggestion = match status.as_u16() {
        405 => Some("see /openapi.json for the methods each path accepts".to_string()),
        413 => Some("objects must be smaller than 2 MiB".to_string()),
        415 => Some("send the body as JSON with Content-Type: application/json".to_string()),
        _ => None,
    };
    let body = nexus_api::ErrorBody {
        error: reason.clone(),
        message: if text.is_empty() { reason } else { text },
        status: status.as_u16(),
        fault_message: None,
        suggestion,
        request_id: id.to_string(),
    };
    (status, axum::Json(body)).into_response()
}

/// Middleware: assigns the request id, logs method, path, status and latency.
pub async fn layer(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if resp.status().as_u16() >= 400 && !is_json(&resp) {
        resp = to_error_contract(resp, &id).await;
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(HEADER, v);
    }
    tracing::info!(
        request_id = %id,
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    resp
}
