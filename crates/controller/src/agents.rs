//! Calling node agents, each with its own credential: the controller reads
//! a node's credential from the apiserver when it first calls it, keeps it,
//! and reads it again when the agent refuses it (the agent rotated it).
//! No secret is shared by all nodes. [`PerNode`] bounds the calls in
//! flight to each node, however many workers a controller runs.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use nexus_api::Node;
use nexus_client::Client;
use nexus_client::agent::{AgentCallError, AgentClient, AgentEndpoint};

/// The agents of every node.
#[derive(Debug)]
pub struct Agents {
    api: Client,
    client: AgentClient,
    credentials: Mutex<HashMap<String, String>>,
}

impl Agents {
    /// Agents whose credentials are read from `api`, verified (when they
    /// serve HTTPS) against the CA `api` trusts: one cluster CA signs the
    /// apiserver's certificate and the agents'.
    pub fn new(api: Client) -> Self {
        Agents { client: AgentClient::new(api.trust()).fenced_like(&api), api, credentials: Mutex::default() }
    }

    async fn endpoint(&self, node: &Node) -> Result<AgentEndpoint, AgentCallError> {
        let name = node.name();
        let base = node.status_view().address.clone();
        let cached = self.credentials.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
        let credential = match cached {
            Some(c) => c,
            None => {
                let cred = self.api.node_credential(name).await.map_err(|e| AgentCallError::Unavailable {
                    url: base.clone(),
                    message: format!("reading node {name}'s agent credential: {e}"),
                })?;
                self.credentials
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_string(), cred.secret.clone());
                cred.secret
            }
        };
        Ok(AgentEndpoint { base, credential })
    }

    fn forget(&self, node: &str) {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).remove(node);
    }

    /// Calls `node`'s agent with `call`; a refused credential is read again
    /// and the call made once more.
    pub async fn call<T, F, Fut>(&self, node: &Node, call: F) -> Result<T, AgentCallError>
    where
        F: Fn(AgentClient, AgentEndpoint) -> Fut,
        Fut: Future<Output = Result<T, AgentCallError>>,
    {
        let first = call(self.client.clone(), self.endpoint(node).await?).await;
        match first {
            Err(AgentCallError::Unauthorized { .. }) => {
                self.forget(node.name());
                call(self.client.clone(), self.endpoint(node).await?).await
            }
            other => other,
        }
    }
}

/// A semaphore per node: at most `limit` agent calls to one node at once,
/// however many workers the controller runs.
#[derive(Debug, Clone)]
pub struct PerNode {
    limit: usize,
    nodes: Arc<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

impl PerNode {
    pub fn new(limit: usize) -> Self {
        PerNode { limit: limit.max(1), nodes: Default::default() }
    }

    /// Waits for a slot on `node`; the slot is held until the permit drops.
    pub async fn slot(&self, node: &str) -> tokio::sync::OwnedSemaphorePermit {
        let sem = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.entry(node.to_string()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.limit))).clone()
        };
        sem.acquire_owned().await.expect("the semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn per_node_slots_bound_each_node_separately() {
        let per = PerNode::new(2);
        let a1 = per.slot("a").await;
        let _a2 = per.slot("a").await;
        assert!(
            tokio::time::timeout(Duration::from_millis(10), per.slot("a")).await.is_err(),
            "a third call to node a waits"
        );
        let _b = tokio::time::timeout(Duration::from_millis(10), per.slot("b")).await.expect("node b is not held up");
        drop(a1);
        let _a3 = tokio::time::timeout(Duration::from_millis(10), per.slot("a")).await.expect("a slot freed");
    }
}
