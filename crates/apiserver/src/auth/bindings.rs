//! The roles each subject holds, from the RoleBinding and
//! ClusterRoleBinding objects, cached until a binding changes.
//!
//! A write of a binding on this apiserver drops the cache before it is
//! answered; a write on another replica (PostgreSQL) drops it when its
//! change arrives on the change feed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use nexus_api::rbac::Grants;
use nexus_api::{ClusterRoleBindingSpec, RoleBindingSpec};
use nexus_api::{Object, ResourceSpec};

use crate::error::ApiError;
use crate::store::Store;

/// Grants by subject (its text form).
type Table = HashMap<String, Grants>;

/// The cached binding table.
#[derive(Debug, Default)]
pub struct Bindings {
    table: RwLock<Option<Arc<Table>>>,
}

/// Whether `kind` is a binding kind (its changes invalidate the cache).
pub fn is_binding(kind: &str) -> bool {
    kind == RoleBindingSpec::KIND || kind == ClusterRoleBindingSpec::KIND
}

impl Bindings {
    /// Forgets the table; the next request reads the bindings again.
    pub fn invalidate(&self) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Drops the cache whenever a binding changes, on this server or another.
    pub fn follow(self: &Arc<Self>, store: &Store) {
        let mut changes = store.subscribe();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(c) if is_binding(&c.kind) => me.invalidate(),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => me.invalidate(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// What `subject` holds.
    pub async fn grants(&self, store: &Store, subject: &str) -> Result<Grants, ApiError> {
        let cached = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
        let table = match cached {
            Some(t) => t,
            None => {
                let t = Arc::new(load(store).await?);
                *self.table.write().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
                t
            }
        };
        Ok(table.get(subject).cloned().unwrap_or_default())
    }
}

async fn load(store: &Store) -> Result<Table, ApiError> {
    let mut table = Table::new();
    let (items, _) = store.list(RoleBindingSpec::KIND, None).await?;
    for v in items {
        let b: Object<RoleBindingSpec> = serde_json::from_value(v)?;
        let project = b.metadata.project.clone().unwrap_or_default();
        for s in &b.spec.subjects {
            table.entry(s.clone()).or_default().projects.entry(project.clone()).or_default().insert(b.spec.role);
        }
    }
    let (items, _) = store.list(ClusterRoleBindingSpec::KIND, None).await?;
    for v in items {
        let b: Object<ClusterRoleBindingSpec> = serde_json::from_value(v)?;
        for s in &b.spec.subjects {
            table.entry(s.clone()).or_default().cluster.insert(b.spec.role);
        }
    }
    Ok(table)
}
