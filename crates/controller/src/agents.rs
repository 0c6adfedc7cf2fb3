//! Calling node agents, each with its own credential: the controller reads
//! a node's credential from the apiserver when it first calls it, keeps it,
//! and reads it again when the agent refuses it (the agent rotated it).
//! No secret is shared by all nodes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

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
        Agents { client: AgentClient::new(api.trust()), api, credentials: Mutex::default() }
    }

    async fn endpoint(&self, node: &Node) -> Result<AgentEndpoint, AgentCallError> {
        let name = node.name();
        let base = node.status_or_default().address;
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
