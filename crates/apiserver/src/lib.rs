//! The nexus apiserver: versioned resources in SQLite, a REST API with
//! Kubernetes semantics, and watch streams.

pub mod access;
pub mod audit;
pub mod auth;
pub mod content;
pub mod edge;
pub mod error;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod openapi;
pub mod quota;
pub mod request_id;
pub mod resources;
pub mod selector;
pub mod store;
pub mod ui;
pub mod watch;

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use nexus_api::ResourceSpec;
use nexus_api::registry::{KindVisitor, visit_kinds};
use serde_json::json;

use crate::error::ApiError;
use crate::store::Store;

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub bookmark_interval: Duration,
    /// Turns true when the server shuts down; open watches end then.
    pub shutting_down: tokio::sync::watch::Receiver<bool>,
    /// Renders `/metrics`; `None` when no recorder is installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Issues and checks API tokens.
    pub tokens: std::sync::Arc<auth::tokens::Tokens>,
    /// Who holds which role.
    pub bindings: std::sync::Arc<auth::bindings::Bindings>,
    /// Bounds the audit records of refused anonymous requests.
    pub anonymous_budget: std::sync::Arc<audit::AnonymousBudget>,
    /// Dev mode: admins may name raw host paths as kernels and disks.
    pub allow_raw_paths: bool,
    /// Which Host headers are answered.
    pub hosts: edge::HostPolicy,
    /// Request budgets and watch caps per identity.
    pub limits: std::sync::Arc<limits::Limits>,
    /// Web origins allowed to call the API from a browser (none: no CORS
    /// headers, so browsers refuse cross-origin calls).
    pub cors_origins: Vec<axum::http::HeaderValue>,
    /// Reaches node agents for VM logs and metrics (`None`: those routes
    /// answer 503).
    pub agents: Option<std::sync::Arc<observe::Agents>>,
    /// `/readyz` asks only for storage, not also for a Ready node.
    pub ready_without_nodes: bool,
    /// Where uploaded Image files are kept (`None`: uploads answer 503).
    pub blob_dir: Option<std::path::PathBuf>,
}

impl AppState {
    /// State serving `store`, with authentication on and dev mode off.
    pub fn new(store: Store, shutting_down: tokio::sync::watch::Receiver<bool>) -> Self {
        let bindings = std::sync::Arc::new(auth::bindings::Bindings::default());
        bindings.follow(&store);
        AppState {
            store,
            bookmark_interval: watch::DEFAULT_BOOKMARK_INTERVAL,
            shutting_down,
            metrics: None,
            tokens: Default::default(),
            bindings,
            anonymous_budget: Default::default(),
            allow_raw_paths: false,
            hosts: edge::HostPolicy::Any,
            limits: Default::default(),
            cors_origins: Vec::new(),
            agents: None,
            ready_without_nodes: true,
            blob_dir: None,
        }
    }
}

/// The routes of one kind, under its project-scoped or cluster-wide paths.
fn kind_routes<S: ResourceSpec>() -> Router<AppState> {
    use resources::{create, delete, get as get_one, list, replace, replace_status};
    let plural = S::PLURAL;
    let (collection, object) = if S::NAMESPACED {
        (format!("/v1/projects/{{project}}/{plural}"), format!("/v1/projects/{{project}}/{plural}/{{name}}"))
    } else {
        (format!("/v1/{plural}"), format!("/v1/{plural}/{{name}}"))
    };
    let mut router = Router::new()
        .route(&collection, get(list::<S>).post(create::<S>))
        .route(&object, get(get_one::<S>).put(replace::<S>).delete(delete::<S>))
        .route(&format!("{object}/status"), put(replace_status::<S>));
    if S::NAMESPACED {
        // Across all projects: read-only.
        router = router.route(&format!("/v1/{plural}"), get(list::<S>));
    }
    router
}

/// The routes of every kind in the registry.
fn all_kind_routes() -> Router<AppState> {
    struct Routes(Router<AppState>);
    impl KindVisitor for Routes {
        fn visit<S: ResourceSpec>(&mut self) {
            self.0 = std::mem::take(&mut self.0).merge(kind_routes::<S>());
        }
    }
    let mut routes = Routes(Router::new());
    visit_kinds(&mut routes);
    routes.0
}

/// The full HTTP application.
pub fn app(state: AppState) -> Router {
    let cors = edge::cors(&state.cors_origins);
    let router = all_kind_routes()
        .merge(access::routes())
        .merge(observe::routes())
        .merge(content::routes())
        .merge(ui::routes())
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(|| async { axum::Json(openapi::document()) }))
        .fallback(fallback)
        .route_layer(axum::middleware::from_fn(metrics::layer))
        // Outermost last: request ids, panics, the edge checks, audit,
        // then authentication and authorization.
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::layer))
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit::layer))
        .layer(axum::middleware::from_fn_with_state(state.clone(), edge::layer))
        .layer(axum::middleware::from_fn(edge::catch_panics))
        .layer(axum::middleware::from_fn(request_id::layer))
        .with_state(state);
    // Outside everything: a preflight carries no token and is answered
    // here; every other answer gets the allow-list's headers.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// How recent a node's heartbeat must be for `/readyz` to count it.
const READY_NODE_GRACE: chrono::Duration = chrono::Duration::seconds(30);

/// Ready: storage answers and (unless relaxed) at least one node is Ready,
/// so a VM applied now can run.
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.store.ping().await?;
    if state.ready_without_nodes {
        return Ok("ok");
    }
    let (nodes, _) = state.store.list("Node", None).await?;
    let now = chrono::Utc::now();
    let ready = nodes
        .into_iter()
        .filter_map(|n| serde_json::from_value::<nexus_api::Node>(n).ok())
        .any(|n| n.status_or_default().is_ready(now, READY_NODE_GRACE));
    if ready {
        Ok("ok")
    } else {
        Err(ApiError::Unavailable {
            message: "no node is Ready: VMs applied now would wait".into(),
            suggestion: "start a node agent (`nexusctl get nodes`), or run the apiserver with --ready-without-nodes"
                .into(),
        })
    }
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.as_ref().map(|h| h.render()).unwrap_or_default()
}

async fn version() -> axum::Json<serde_json::Value> {
    axum::Json(
        json!({"component": "nexus-apiserver", "version": env!("CARGO_PKG_VERSION"), "apiVersion": nexus_api::API_VERSION}),
    )
}

async fn fallback(uri: axum::http::Uri) -> (StatusCode, axum::Json<nexus_api::ErrorBody>) {
    let body = nexus_api::ErrorBody {
        error: "NotFound".into(),
        message: format!("no route for {}", uri.path()),
        status: 404,
        fault_message: None,
        suggestion: Some(
            "resources live under /v1/projects/{project}/{plural} and /v1/{plural}, such as /v1/projects/default/vms"
                .into(),
        ),
        request_id: request_id::current(),
    };
    (StatusCode::NOT_FOUND, axum::Json(body))
}
