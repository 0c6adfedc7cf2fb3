//! Watch streams: replay from the change log, then follow live changes,
//! with periodic BOOKMARKs, as newline-delimited JSON.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use nexus_api::{WatchEvent, WatchEventType};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::selector::Selector;
use crate::state::AppState;
use crate::store::{Change, ChangeType};

/// Which changes a watch wants.
#[derive(Debug, Clone)]
pub struct Filter {
    pub kind: String,
    pub project: Option<String>,
    pub labels: Selector,
    pub fields: Selector,
    /// The projects the caller may read, when not all: objects of other
    /// projects (Events about them) are left out.
    pub visible: Option<std::collections::BTreeSet<String>>,
}

impl Filter {
    /// Whether an object passes the project and selector filters.
    pub fn matches(&self, obj: &Value) -> bool {
        let project_ok = match &self.project {
            Some(p) => obj["metadata"]["project"].as_str() == Some(p.as_str()),
            None => true,
        };
        let visible = match &self.visible {
            None => true,
            Some(projects) => {
                // An Event's project is its object's; node events have none.
                let project =
                    obj["metadata"]["project"].as_str().or_else(|| obj["spec"]["involvedObject"]["project"].as_str());
                project.is_none_or(|p| projects.contains(p))
            }
        };
        project_ok && visible && self.labels.matches_object_labels(obj) && self.fields.matches_fields(obj)
    }

    fn wants(&self, change: &Change) -> bool {
        change.kind == self.kind && self.matches(&change.object)
    }
}

fn event_line(type_: WatchEventType, object: Value) -> Bytes {
    event_line_from(type_, object, String::new())
}

fn event_line_from(type_: WatchEventType, object: Value, request_id: String) -> Bytes {
    let mut line = serde_json::to_vec(&WatchEvent { type_, object, request_id }).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

/// The change's line, serialized once however many watches send it.
fn change_line(change: &Change) -> Bytes {
    let line = change.line.get_or_init(|| {
        let t = match change.type_ {
            ChangeType::Added => WatchEventType::Added,
            ChangeType::Modified => WatchEventType::Modified,
            ChangeType::Deleted => WatchEventType::Deleted,
        };
        event_line_from(t, change.object.clone(), change.request_id.clone())
    });
    line.clone()
}

fn bookmark_line(rv: i64) -> Bytes {
    event_line(WatchEventType::Bookmark, json!({"metadata": {"resourceVersion": rv.to_string()}}))
}

/// Starts a watch. With `since`, replays changes after it (410 when they
/// are no longer retained); without, begins with ADDED for every object.
/// `slot` holds the watch's place in its caller's budget until it ends.
pub async fn stream(
    state: AppState,
    filter: Filter,
    since: Option<i64>,
    slot: crate::limits::WatchSlot,
) -> Result<Response, ApiError> {
    // Subscribe before reading the store so no change falls between the two.
    let mut live = state.store.subscribe();
    let mut initial: Vec<Bytes> = Vec::new();
    let last = match since {
        Some(rv) => {
            let mut last = rv;
            for change in state.store.changes_since(&filter.kind, rv).await? {
                last = change.resource_version;
                if filter.wants(&change) {
                    initial.push(change_line(&change));
                }
            }
            last
        }
        None => {
            let (items, rv) = state.store.list(&filter.kind, filter.project.as_deref()).await?;
            for obj in items.into_iter().filter(|o| filter.matches(o)) {
                initial.push(event_line(WatchEventType::Added, obj));
            }
            rv
        }
    };
    let mut last = last;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let bookmark_every = state.bookmark_interval;
    let mut shutting_down = state.shutting_down.clone();
    tokio::spawn(async move {
        let _slot = slot;
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let mut ticker = tokio::time::interval(bookmark_every);
        ticker.tick().await;
        loop {
            let line = tokio::select! {
                _ = ticker.tick() => bookmark_line(last),
                _ = tx.closed() => return,
                _ = shutting_down.changed() => return,
                received = live.recv() => match received {
                    Ok(change) => {
                        if change.resource_version <= last {
                            continue;
                        }
                        last = change.resource_version;
                        if !filter.wants(&change) {
                            continue;
                        }
                        change_line(&change)
                    }
                    Err(RecvError::Lagged(_)) => {
                        // Fell behind the broadcast: catch up from the log.
                        match catch_up(&state, &filter, &mut last, &tx).await {
                            Ok(()) => continue,
                            Err(e) => {
                                let body = serde_json::to_value(e.body()).unwrap_or_default();
                                let _ = tx.send(Ok(event_line(WatchEventType::Error, body))).await;
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([("content-type", "application/json; stream=watch")], body).into_response())
}

async fn catch_up(
    state: &AppState,
    filter: &Filter,
    last: &mut i64,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), ApiError> {
    for change in state.store.changes_since(&filter.kind, *last).await? {
        *last = change.resource_version;
        if filter.wants(&change) && tx.send(Ok(change_line(&change))).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Default time between BOOKMARK events on an idle watch.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(10);
