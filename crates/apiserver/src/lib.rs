//! The nexus apiserver: versioned resources in SQLite, a REST API with
//! Kubernetes semantics, and watch streams.

pub mod access;
pub mod admission;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod content;
pub mod edge;
pub mod error;
pub mod event_record;
pub mod events;
pub mod fork;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod openapi;
pub mod request_id;
pub mod resources;
pub mod selector;
pub mod state;
pub mod store;
pub mod ui;
pub mod watch;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use nexus_api::ResourceSpec;
use nexus_api::registry::{KindVisitor, visit_kinds};
use serde_json::json;

use crate::error::ApiError;
pub use crate::state::{AppState, SharedState};

/// The routes of one kind, under its project-scoped or cluster-wide paths.
fn kind_routes<S: ResourceSpec>() -> Router<SharedState> {
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
fn all_kind_routes() -> Router<SharedState> {
    struct Routes(Router<SharedState>);
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
    let state: SharedState = std::sync::Arc::new(state);
    let router = all_kind_routes()
        .merge(access::routes())
        .merge(fork::routes())
        .merge(event_record::routes())
        .merge(observe::routes())
        .merge(content::routes())
        .merge(ui::routes())
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(|| async { axum::Json(openapi::document()) }))
        .route("/v1/kinds", get(|| async { axum::Json(nexus_api::registry::KindList::served()) }))
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
async fn readyz(State(state): State<SharedState>) -> Result<&'static str, ApiError> {
    state.store.ping().await?;
    if state.ready_without_nodes {
        return Ok("ok");
    }
    let (nodes, _) = state.store.list(nexus_api::NodeSpec::KIND, None).await?;
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

async fn render_metrics(State(state): State<SharedState>) -> String {
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
