//! The manager runs every controller while this process leads. Reflectors
//! run all the time (a standby's caches are warm when it takes over); the
//! controllers' queues and workers exist only for a leadership term and are
//! stopped, in the same process, when the lease is lost.

use std::sync::Arc;

use super::controller::Runnable;
use super::leader::Elector;

/// The controllers of this process and the election that gates them.
#[derive(Default)]
pub struct Manager {
    controllers: Vec<Box<dyn Runnable>>,
    elector: Option<Arc<Elector>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.controllers.iter().map(|c| c.name()).collect();
        f.debug_struct("Manager").field("controllers", &names).field("elected", &self.elector.is_some()).finish()
    }
}

impl Manager {
    /// A manager that acts only while `elector` holds the lease, or always
    /// when `None` (a single controller without election).
    pub fn new(elector: Option<Arc<Elector>>) -> Self {
        Manager { controllers: Vec::new(), elector }
    }

    /// Adds a controller.
    pub fn add(&mut self, controller: impl Runnable + 'static) {
        self.controllers.push(Box::new(controller));
    }

    /// Leads and runs the controllers, forever: after losing the lease it
    /// stops them, campaigns again and starts them afresh.
    pub async fn run(&self) {
        loop {
            if let Some(elector) = &self.elector {
                tracing::info!(identity = elector.identity(), "waiting to become the leader");
                elector.acquire().await;
                tracing::info!(identity = elector.identity(), "became the leader");
            }
            metrics::gauge!("nexus_controller_leader").set(1.0);
            let term = futures::future::join_all(self.controllers.iter().map(|c| c.run()));
            match &self.elector {
                Some(elector) => {
                    tokio::select! {
                        _ = term => tracing::error!("every controller stopped"),
                        _ = elector.hold() => tracing::warn!(
                            identity = elector.identity(),
                            "lost the lease; stopped the controllers, campaigning again"
                        ),
                    }
                }
                None => {
                    term.await;
                    tracing::error!("every controller stopped");
                }
            }
            metrics::gauge!("nexus_controller_leader").set(0.0);
        }
    }
}
