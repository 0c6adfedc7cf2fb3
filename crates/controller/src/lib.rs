//! The nexus controller: reconciles spec against status, level-triggered.
//!
//! [`runtime`] is the reusable machinery (reflectors, stores, queues,
//! `Controller`, leader election); each other module is one controller
//! built on it, exposing `controller(&Context)`. Adding a controller is a
//! new module and one line in `main.rs`.

pub mod agents;
pub mod fleet_metrics;
pub mod gc;
pub mod node_lifecycle;
pub mod pool;
pub mod quota;
pub mod runtime;
pub mod snapshot;
pub mod vm;
pub mod volume;

use std::time::Duration;

use nexus_client::Client;

use runtime::Reflectors;
use runtime::events::Recorder;

/// Tunables every controller may read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Keys reconciled at once by the VM controller.
    pub workers: usize,
    /// Agent calls in flight to any one node at once.
    pub per_node_concurrency: usize,
    /// How often every object is queued again.
    pub resync: Duration,
    /// How often a converged VM is checked against its node.
    pub recheck: Duration,
    /// Heartbeats older than this make a node not Ready.
    pub node_grace: chrono::Duration,
    /// Time between garbage-collection passes over one node.
    pub gc_interval: Duration,
    /// Time a thing must stay unclaimed before it is collected.
    pub gc_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            workers: 64,
            per_node_concurrency: 8,
            resync: Duration::from_secs(300),
            recheck: Duration::from_secs(5),
            node_grace: chrono::Duration::seconds(6),
            gc_interval: Duration::from_secs(10),
            gc_grace: Duration::from_secs(60),
        }
    }
}

/// What controllers are built from: clients, the shared stores, settings.
#[derive(Debug, Clone)]
pub struct Context {
    pub api: Client,
    /// Node agents, each called with its own credential.
    pub agents: std::sync::Arc<agents::Agents>,
    pub events: Recorder,
    pub reflectors: Reflectors,
    pub settings: Settings,
}

impl Context {
    /// A context talking to `api` (whose token is the controller's).
    pub fn new(api: Client, settings: Settings) -> Self {
        Context {
            events: Recorder::new(api.clone()),
            reflectors: Reflectors::new(api.clone()),
            agents: std::sync::Arc::new(agents::Agents::new(api.clone())),
            api,
            settings,
        }
    }
}
