//! In-memory caches of the kinds the controller reads, each kept current by
//! a reflector: list, then watch from the list's version; list again when the
//! watch ends (a 410 included) and every resync period.
//!
//! Reconciles and the scheduler read these instead of the apiserver. A
//! store is *synced* once its first list is in; the runner starts no worker
//! before every store is synced, so no decision is made on a partial view.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use nexus_api::client::{Client, Event, ListParams};
use nexus_api::{ImageSpec, NodeSpec, Object, ResourceSpec, TemplateSpec, VmSpec};
use tokio::sync::watch;

/// `(project, name)`; the project is empty for cluster-wide kinds.
pub type ObjectKey = (String, String);

/// The key of `obj`.
pub fn key_of<S: ResourceSpec>(obj: &Object<S>) -> ObjectKey {
    (obj.metadata.project.clone().unwrap_or_default(), obj.name().to_string())
}

/// The numeric `metadata.resourceVersion` of `obj` (0 when absent).
pub fn version_of<S: ResourceSpec>(obj: &Object<S>) -> u64 {
    obj.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The objects of one kind, by key. Cheap to clone; clones share contents.
#[derive(Debug)]
pub struct Store<S: ResourceSpec> {
    objects: Arc<RwLock<HashMap<ObjectKey, Arc<Object<S>>>>>,
    synced: Arc<watch::Sender<bool>>,
}

impl<S: ResourceSpec> Clone for Store<S> {
    fn clone(&self) -> Self {
        Store { objects: self.objects.clone(), synced: self.synced.clone() }
    }
}

impl<S: ResourceSpec> Default for Store<S> {
    fn default() -> Self {
        Store { objects: Default::default(), synced: Arc::new(watch::channel(false).0) }
    }
}

impl<S: ResourceSpec> Store<S> {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ObjectKey, Arc<Object<S>>>> {
        self.objects.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ObjectKey, Arc<Object<S>>>> {
        self.objects.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached object `project/name` (`""` project for cluster-wide kinds).
    pub fn get(&self, project: &str, name: &str) -> Option<Arc<Object<S>>> {
        self.read().get(&(project.to_string(), name.to_string())).cloned()
    }

    /// Every cached object, in no particular order.
    pub fn list(&self) -> Vec<Arc<Object<S>>> {
        self.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Whether the first list has been loaded.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Returns once the first list has been loaded.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as the store, so this cannot fail.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Stores `obj` unless the cache already holds the same or a newer
    /// version. Writers call this with what the apiserver answered, so their
    /// next read sees their own write even before its watch event arrives.
    pub fn upsert(&self, obj: Object<S>) {
        let key = key_of(&obj);
        let mut objects = self.write();
        if objects.get(&key).is_some_and(|old| version_of(old) >= version_of(&obj)) {
            return;
        }
        objects.insert(key, Arc::new(obj));
    }

    fn delete(&self, obj: &Object<S>) {
        self.write().remove(&key_of(obj));
    }

    /// Replaces the contents with a fresh list; returns the objects that
    /// were cached but are not in it (deleted while nobody watched).
    fn replace(&self, items: Vec<Object<S>>) -> Vec<Arc<Object<S>>> {
        let fresh: HashMap<ObjectKey, Arc<Object<S>>> = items.into_iter().map(|o| (key_of(&o), Arc::new(o))).collect();
        let mut objects = self.write();
        let gone = objects.iter().filter(|(k, _)| !fresh.contains_key(*k)).map(|(_, v)| v.clone()).collect();
        *objects = fresh;
        drop(objects);
        self.synced.send_replace(true);
        gone
    }
}

/// Keeps `store` current forever. `on_change` runs after the store has
/// applied a change, for every object listed, added, modified or deleted
/// (including objects a relist finds gone), so whatever it queues reads a
/// cache at least as new as the change.
pub async fn reflect<S: ResourceSpec>(
    api: Client,
    store: Store<S>,
    resync: Duration,
    on_change: impl Fn(&Object<S>) + Send + Sync + 'static,
) {
    loop {
        let list = match api.list::<S>(None, &ListParams::default()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(kind = S::KIND, error = %e, "listing failed");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let rv = list.metadata.resource_version.clone();
        let listed = list.items.clone();
        for gone in store.replace(list.items) {
            on_change(&gone);
        }
        for obj in &listed {
            on_change(obj);
        }
        metrics::gauge!("nexus_controller_cache_objects", "kind" => S::KIND).set(store.len() as f64);
        let stream = match api.watch::<S>(None, &ListParams::default(), rv.as_deref()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(kind = S::KIND, error = %e, "watching failed");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        let deadline = tokio::time::sleep(resync);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                event = stream.next() => match event {
                    Some(Ok(Event::Added(obj) | Event::Modified(obj))) => {
                        store.upsert(obj.clone());
                        on_change(&obj);
                    }
                    Some(Ok(Event::Deleted(obj))) => {
                        store.delete(&obj);
                        on_change(&obj);
                    }
                    Some(Ok(Event::Bookmark(_))) => {}
                    Some(Err(e)) => {
                        tracing::info!(kind = S::KIND, error = %e, "watch ended; relisting");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

/// The caches the VM reconciler reads.
#[derive(Debug, Clone, Default)]
pub struct Caches {
    pub vms: Store<VmSpec>,
    pub nodes: Store<NodeSpec>,
    pub templates: Store<TemplateSpec>,
    pub images: Store<ImageSpec>,
}

impl Caches {
    /// Returns once every store has loaded its first list.
    pub async fn wait_synced(&self) {
        self.vms.wait_synced().await;
        self.nodes.wait_synced().await;
        self.templates.wait_synced().await;
        self.images.wait_synced().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::Node;

    fn node(name: &str, rv: u64) -> Node {
        let mut n = Node::new(name, None, NodeSpec::default());
        n.metadata.resource_version = Some(rv.to_string());
        n
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let store = Store::<NodeSpec>::default();
        store.upsert(node("a", 5));
        store.upsert(node("a", 4));
        assert_eq!(store.get("", "a").unwrap().metadata.resource_version.as_deref(), Some("5"));
        store.upsert(node("a", 6));
        assert_eq!(store.get("", "a").unwrap().metadata.resource_version.as_deref(), Some("6"));
    }

    #[tokio::test]
    async fn a_relist_reports_what_vanished_and_marks_the_store_synced() {
        let store = Store::<NodeSpec>::default();
        assert!(!store.is_synced());
        store.upsert(node("a", 1));
        store.upsert(node("b", 2));
        let gone = store.replace(vec![node("b", 3), node("c", 4)]);
        assert_eq!(gone.iter().map(|n| n.name().to_string()).collect::<Vec<_>>(), ["a"]);
        assert!(store.is_synced());
        tokio::time::timeout(Duration::from_millis(10), store.wait_synced()).await.expect("already synced");
        let mut names: Vec<_> = store.list().iter().map(|n| n.name().to_string()).collect();
        names.sort();
        assert_eq!(names, ["b", "c"]);
    }
}
