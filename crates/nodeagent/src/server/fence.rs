//! Fencing of a controller whose term has ended: a leader sends the lease
//! term it acts in with every call (`nexus-fence`, see
//! [`nexus_api::lease::Fence`]); the agent remembers the newest term it has
//! served for each lease and refuses changes from an older one. A paused
//! leader that wakes after another took over cannot start, stop or remove
//! a VM on a node its successor has already called. Reads, and callers
//! that send no fence, pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use nexus_api::lease::{FENCE_HEADER, Fence};

use crate::error::AgentError;

/// The newest term served, by lease name.
#[derive(Debug, Default, Clone)]
pub struct Terms(Arc<Mutex<HashMap<String, u32>>>);

impl Terms {
    /// Admits a change from `fence` unless a newer term of its lease was
    /// served already; remembers its term when it is the newest.
    pub fn admit(&self, fence: &Fence) -> Result<(), AgentError> {
        let mut newest = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match newest.get(&fence.lease) {
            Some(&seen) if seen > fence.transitions => Err(AgentError::Fenced(format!(
                "lease {:?}: {} acts in term {}, but this agent has served term {seen}; the change was not made",
                fence.lease, fence.holder, fence.transitions
            ))),
            _ => {
                newest.insert(fence.lease.clone(), fence.transitions);
                Ok(())
            }
        }
    }
}

/// Middleware: refuses changes fenced with an ended term.
pub async fn layer(State(terms): State<Terms>, req: Request, next: Next) -> Result<Response, AgentError> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let fence = req.headers().get(FENCE_HEADER).and_then(|v| v.to_str().ok()).and_then(Fence::parse);
        if let Some(fence) = fence {
            terms.admit(&fence).inspect_err(|e| tracing::warn!(error = %e, "refused a fenced-off call"))?;
        }
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(holder: &str, transitions: u32) -> Fence {
        Fence { lease: "nexus-controller".into(), holder: holder.into(), transitions }
    }

    #[test]
    fn an_older_term_is_refused_once_a_newer_one_was_served() {
        let terms = Terms::default();
        terms.admit(&fence("a", 0)).unwrap();
        terms.admit(&fence("b", 1)).unwrap();
        assert!(matches!(terms.admit(&fence("a", 0)), Err(AgentError::Fenced(_))));
        terms.admit(&fence("b", 1)).unwrap();
        terms.admit(&fence("a", 2)).unwrap();
        assert!(matches!(terms.admit(&fence("b", 1)), Err(AgentError::Fenced(_))));
        // Another lease is counted apart.
        terms.admit(&Fence { lease: "other".into(), holder: "c".into(), transitions: 0 }).unwrap();
    }
}
