//! Reflectors keep a store current from the apiserver: list once, then watch
//! from the list's version. A broken watch resumes from the last version it
//! delivered (an object's or a BOOKMARK's); only a 410 (that version was
//! compacted away) makes it list again. An idle or flaky connection
//! therefore costs watches, not lists.
//!
//! [`Reflectors`] runs one reflector per kind for the whole process, started
//! on first use and shared by every controller that reads the kind; they run
//! whether or not this process leads, so a standby takes over with its
//! caches warm.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nexus_api::ResourceSpec;
use nexus_client::{Client, Event, ListParams};

use super::store::{Store, Writer, store};

/// Keeps `writer`'s store equal to the apiserver's objects of kind `S`,
/// forever.
pub async fn run<S: ResourceSpec>(api: Client, writer: Writer<S>) {
    let mut version: Option<String> = None;
    let mut delays = super::retry_delays();
    loop {
        if version.is_none() {
            match api.list::<S>(None, &ListParams::default()).await {
                Ok(list) => {
                    metrics::counter!("nexus_controller_lists_total", "kind" => S::KIND).increment(1);
                    writer.count_list();
                    version = list.metadata.resource_version.clone();
                    tracing::debug!(kind = S::KIND, version = ?version, objects = list.items.len(), "listed");
                    writer.replace(list.items);
                    metrics::gauge!("nexus_controller_cache_objects", "kind" => S::KIND)
                        .set(writer.store().len() as f64);
                    delays = super::retry_delays();
                }
                Err(e) => {
                    tracing::warn!(kind = S::KIND, error = %e, "listing failed");
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
                    continue;
                }
            }
        }
        let stream = match api.watch_traced::<S>(None, &ListParams::default(), version.as_deref()).await {
            Ok(s) => s,
            Err(e) if e.is_gone() => {
                tracing::info!(kind = S::KIND, "watch version expired; listing again");
                version = None;
                continue;
            }
            Err(e) => {
                tracing::warn!(kind = S::KIND, error = %e, "watching failed");
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
                continue;
            }
        };
        tracing::debug!(kind = S::KIND, from = ?version, "watching");
        metrics::counter!("nexus_controller_watches_total", "kind" => S::KIND).increment(1);
        writer.count_watch();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok((Event::Added(obj) | Event::Modified(obj), request_id)) => {
                    tracing::trace!(kind = S::KIND, name = obj.name(), version = ?obj.metadata.resource_version, request_id, "changed");
                    version = obj.metadata.resource_version.clone().or(version);
                    writer.apply_traced(obj, request_id);
                }
                Ok((Event::Deleted(obj), _)) => {
                    version = obj.metadata.resource_version.clone().or(version);
                    writer.delete(obj);
                }
                Ok((Event::Bookmark(rv), _)) => {
                    if !rv.is_empty() {
                        version = Some(rv);
                    }
                }
                Err(e) if e.is_gone() => {
                    tracing::info!(kind = S::KIND, "watch version expired; listing again");
                    version = None;
                    break;
                }
                Err(e) => {
                    tracing::info!(kind = S::KIND, error = %e, "watch broke; resuming");
                    break;
                }
            }
            // Something arrived: the connection is healthy again.
            delays = super::retry_delays();
        }
        metrics::gauge!("nexus_controller_cache_objects", "kind" => S::KIND).set(writer.store().len() as f64);
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
    }
}

/// One reflector and store per kind, shared by the whole process.
#[derive(Clone)]
pub struct Reflectors {
    api: Client,
    stores: Arc<Mutex<HashMap<&'static str, Box<dyn Any + Send>>>>,
}

impl std::fmt::Debug for Reflectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<&str> = self.stores.lock().map(|s| s.keys().copied().collect()).unwrap_or_default();
        f.debug_struct("Reflectors").field("kinds", &kinds).finish()
    }
}

impl Reflectors {
    pub fn new(api: Client) -> Self {
        Reflectors { api, stores: Default::default() }
    }

    /// The store of kind `S`, starting its reflector on first use (inside a
    /// tokio runtime).
    pub fn store<S: ResourceSpec>(&self) -> Store<S> {
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = stores.get(S::KIND).and_then(|b| b.downcast_ref::<Store<S>>()) {
            return existing.clone();
        }
        let (writer, store) = store::<S>();
        tokio::spawn(run(self.api.clone(), writer));
        stores.insert(S::KIND, Box::new(store.clone()));
        store
    }
}
