//! The edge of the API, before any handler: request bodies are JSON or
//! nothing (a web page cannot send one without a CORS preflight), browsers
//! may call only from the origins on the allow-list, a server on the
//! loopback answers only to its own names (no DNS rebinding), and a panic
//! in a handler becomes a 500 in the error contract instead of a dropped
//! connection.

use std::panic::AssertUnwindSafe;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::FutureExt;

use crate::error::ApiError;
use crate::state::SharedState;

/// Why an origin cannot be on the CORS allow-list.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error(
        "--cors-origin {0:?}: \"*\" would let any web page call the API with a visitor's token; name each origin (https://console.example.com)"
    )]
    Wildcard(String),
    #[error("--cors-origin {0:?}: an origin is scheme://host[:port] with no path, such as https://console.example.com")]
    Malformed(String),
}

/// Checks one `--cors-origin` value: `http(s)://host[:port]`, nothing more.
pub fn parse_origin(origin: &str) -> Result<axum::http::HeaderValue, OriginError> {
    if origin.trim() == "*" {
        return Err(OriginError::Wildcard(origin.to_string()));
    }
    let malformed = || OriginError::Malformed(origin.to_string());
    let (scheme, rest) = origin.split_once("://").ok_or_else(malformed)?;
    let host_ok = !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        && !rest.starts_with(':');
    if !matches!(scheme, "http" | "https") || !host_ok {
        return Err(malformed());
    }
    axum::http::HeaderValue::from_str(&origin.to_ascii_lowercase()).map_err(|_| malformed())
}

/// The CORS layer for `origins`; `None` when there are none (then no CORS
/// header is ever sent and browsers keep other origins out).
pub fn cors(origins: &[axum::http::HeaderValue]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins.iter().cloned()))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([header::RETRY_AFTER, header::HeaderName::from_static("x-request-id")])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Which `Host` headers the server answers to.
#[derive(Debug, Clone, Default)]
pub enum HostPolicy {
    /// Any (a server on a routable address, behind TLS and tokens).
    #[default]
    Any,
    /// Only these names (without port); for a server on the loopback.
    Only(Vec<String>),
}

impl HostPolicy {
    /// The names a loopback server answers to, plus `extra`.
    pub fn loopback(extra: &[String]) -> Self {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]", "::1"].iter().map(|s| s.to_string()).collect();
        names.extend(extra.iter().map(|s| s.to_lowercase()));
        HostPolicy::Only(names)
    }

    fn allows(&self, host: Option<&str>) -> bool {
        let HostPolicy::Only(names) = self else { return true };
        let Some(host) = host else { return false };
        let host = host.to_lowercase();
        // Strip a port, minding IPv6 brackets.
        let name = match host.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') => n,
            _ => host.as_str(),
        };
        names.iter().any(|n| n == name)
    }
}

fn has_body(req: &Request) -> bool {
    let len =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match len {
        Some(n) => n > 0,
        None => req.headers().contains_key(header::TRANSFER_ENCODING),
    }
}

fn content_type(req: &Request) -> Option<String> {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
}

fn is_json(req: &Request) -> bool {
    content_type(req).as_deref() == Some("application/json")
}

/// A create sent as YAML (the web console's "create from YAML").
fn is_yaml_create(req: &Request) -> bool {
    *req.method() == Method::POST
        && matches!(content_type(req).as_deref(), Some("application/yaml" | "application/x-yaml" | "text/yaml"))
}

/// Middleware: the Host check and JSON-only bodies (YAML for a create).
pub async fn layer(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    if !state.hosts.allows(host) {
        return ApiError::Refused {
            message: format!(
                "this server does not answer to Host {:?}",
                nexus_api::validation::truncate(host.unwrap_or(""), 80)
            ),
            suggestion: "call it by its own name (localhost or 127.0.0.1), or start it with --server-name".into(),
        }
        .into_response();
    }
    let writes = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    // An Image's file is the one body that is not JSON.
    let file_upload = *req.method() == Method::PUT && req.uri().path().ends_with("/content");
    if writes && has_body(&req) && !is_json(&req) && !is_yaml_create(&req) && !file_upload {
        return ApiError::UnsupportedMediaType.into_response();
    }
    next.run(req).await
}

/// Middleware: a handler's panic is answered with a 500 (logged, counted).
pub async fn catch_panics(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            tracing::error!(method = %method, path = %path, panic = %what, "a handler panicked");
            metrics::counter!("nexus_apiserver_panics_total").increment(1);
            let mut resp = ApiError::Internal("the request could not be served".into()).into_response();
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn boom() -> &'static str {
        let v: Vec<u8> = Vec::new();
        if v.is_empty() {
            panic!("index out of bounds");
        }
        "unreachable"
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_with_a_500_in_the_contract() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/boom", axum::routing::get(boom))
            .layer(axum::middleware::from_fn(catch_panics))
            .layer(axum::middleware::from_fn(crate::request_id::layer));
        let resp = app.oneshot(Request::builder().uri("/boom").body(axum::body::Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((v["status"].as_u64(), v["error"].as_str()), (Some(500), Some("InternalError")));
        assert!(v["requestId"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    }

    #[test]
    fn a_loopback_server_answers_only_to_its_own_names() {
        let p = HostPolicy::loopback(&["nexus.internal".into()]);
        for ok in ["localhost", "localhost:7443", "127.0.0.1:7443", "[::1]:7443", "NEXUS.internal:1"] {
            assert!(p.allows(Some(ok)), "{ok}");
        }
        for bad in ["evil.example", "evil.example:7443", "127.0.0.1.evil.example", "localhost.evil"] {
            assert!(!p.allows(Some(bad)), "{bad}");
        }
        assert!(!p.allows(None));
        assert!(HostPolicy::Any.allows(Some("anything")));
    }
}
