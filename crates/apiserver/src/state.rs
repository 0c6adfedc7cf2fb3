//! The state every handler shares: the store, the caches of tokens and
//! bindings, the edge's policies and budgets, and the clients it calls on.

use std::time::Duration;

use crate::store::Store;
use crate::{audit, auth, edge, limits, observe, watch};

/// The state handlers and middleware are given: one [`AppState`] behind
/// an `Arc`, so that each request's extractors clone a pointer rather than
/// every field.
pub type SharedState = std::sync::Arc<AppState>;

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
