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
use crate::state::{AppState, SharedState};
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
    let mut line = serde_json::to_vec(&WatchEvent { type_, object, request_id: String::new() }).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

/// The change's line, made once however many watches send it, around
/// the object's stored JSON (the fields in [`WatchEvent`]'s order).
fn change_line(change: &Change) -> Bytes {
    let line = change.line.get_or_init(|| {
        let t = match change.type_ {
            ChangeType::Added => WatchEventType::Added,
            ChangeType::Modified => WatchEventType::Modified,
            ChangeType::Deleted => WatchEventType::Deleted,
        };
        // A unit variant and a string serialize to JSON without fail.
        let mut line = Vec::with_capacity(change.body.len() + change.request_id.len() + 48);
        line.extend_from_slice(b"{\"type\":");
        line.extend_from_slice(&serde_json::to_vec(&t).unwrap_or_default());
        line.extend_from_slice(b",\"object\":");
        line.extend_from_slice(change.body.as_bytes());
        if !change.request_id.is_empty() {
            line.extend_from_slice(b",\"requestId\":");
            line.extend_from_slice(&serde_json::to_vec(&change.request_id).unwrap_or_default());
        }
        line.extend_from_slice(b"}\n");
        line.into()
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
    state: SharedState,
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
                received = live.recv() => {
                    let (lines, lagged) = match received {
                        Ok(change) => ready_lines(&change, &mut live, &filter, &mut last),
                        Err(RecvError::Lagged(_)) => (None, true),
                        Err(RecvError::Closed) => return,
                    };
                    if let Some(lines) = lines
                        && tx.send(Ok(lines)).await.is_err()
                    {
                        return;
                    }
                    // Fell behind the broadcast: catch up from the log.
                    if lagged
                        && let Err(e) = catch_up(&state, &filter, &mut last, &tx).await
                    {
                        let body = serde_json::to_value(e.body()).unwrap_or_default();
                        let _ = tx.send(Ok(event_line(WatchEventType::Error, body))).await;
                        return;
                    }
                    continue;
                }
            };
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([("content-type", "application/json; stream=watch")], body).into_response())
}

/// Most bytes of changes sent in one write.
const BATCH_BYTES: usize = 64 << 10;

/// The lines of `first` and of the changes already waiting behind it (up
/// to [`BATCH_BYTES`]) that the watch wants, as one write: under a burst
/// of changes a watcher gets them in a few large writes rather than one
/// write, TLS record and wake-up each. Also returns whether the broadcast
/// was found to have run ahead of this watch (catch up from the log).
fn ready_lines(
    first: &Change,
    live: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<Change>>,
    filter: &Filter,
    last: &mut i64,
) -> (Option<Bytes>, bool) {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut lines: Vec<Bytes> = wanted(first, filter, last).into_iter().collect();
    let mut size = lines.iter().map(Bytes::len).sum::<usize>();
    let mut lagged = false;
    while size < BATCH_BYTES {
        match live.try_recv() {
            Ok(change) => {
                if let Some(line) = wanted(&change, filter, last) {
                    size += line.len();
                    lines.push(line);
                }
            }
            Err(TryRecvError::Lagged(_)) => {
                lagged = true;
                break;
            }
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
        }
    }
    let batch = match lines.len() {
        0 => None,
        1 => lines.pop(),
        _ => Some(Bytes::from(lines.concat())),
    };
    (batch, lagged)
}

/// The line of `change` if it is new to the watch (past `last`, which it
/// advances) and the watch wants it.
fn wanted(change: &Change, filter: &Filter, last: &mut i64) -> Option<Bytes> {
    if change.resource_version <= *last {
        return None;
    }
    *last = change.resource_version;
    filter.wants(change).then(|| change_line(change))
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn change(rv: i64, kind: &str, project: &str) -> Arc<Change> {
        let object =
            json!({"metadata": {"name": format!("o{rv}"), "project": project, "resourceVersion": rv.to_string()}});
        Arc::new(Change {
            resource_version: rv,
            kind: kind.into(),
            project: project.into(),
            type_: ChangeType::Modified,
            body: object.to_string(),
            object,
            request_id: String::new(),
            line: Default::default(),
        })
    }

    #[test]
    fn a_change_line_is_its_watch_event_around_the_stored_body() {
        for request_id in ["", "req-\"1\""] {
            let mut c = Arc::into_inner(change(3, "VM", "p")).unwrap();
            c.request_id = request_id.into();
            let line = change_line(&c);
            assert_eq!(line.last(), Some(&b'\n'));
            let event: WatchEvent = serde_json::from_slice(&line).unwrap();
            let want =
                WatchEvent { type_: WatchEventType::Modified, object: c.object.clone(), request_id: request_id.into() };
            assert_eq!(event, want);
            assert_eq!(line[..line.len() - 1], serde_json::to_vec(&want).unwrap()[..], "as serde writes it");
        }
    }

    fn filter() -> Filter {
        Filter {
            kind: "VM".into(),
            project: Some("p".into()),
            labels: Selector::default(),
            fields: Selector::default(),
            visible: None,
        }
    }

    fn names(batch: &Bytes) -> Vec<String> {
        batch
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<Value>(l).unwrap()["object"]["metadata"]["name"].as_str().unwrap().into())
            .collect()
    }

    #[test]
    fn changes_waiting_together_go_out_in_one_write_without_what_the_watch_does_not_want() {
        let (tx, mut rx) = tokio::sync::broadcast::channel(16);
        let first = change(5, "VM", "p");
        for c in [change(4, "VM", "p"), change(6, "Node", ""), change(7, "VM", "q"), change(8, "VM", "p")] {
            tx.send(c).unwrap();
        }
        let mut last = 4;
        let (batch, lagged) = ready_lines(&first, &mut rx, &filter(), &mut last);
        assert!(!lagged);
        assert_eq!(names(&batch.unwrap()), ["o5", "o8"], "in order, each once, only the project's VMs");
        assert_eq!(last, 8, "what was skipped is passed too");
        // Nothing waiting: the one line, shared with every other watch.
        let only = change(9, "VM", "p");
        let (batch, _) = ready_lines(&only, &mut rx, &filter(), &mut last);
        assert_eq!(batch.unwrap(), *only.line.get().unwrap());
    }

    #[test]
    fn a_watch_the_broadcast_ran_ahead_of_is_told_to_catch_up() {
        let (tx, mut rx) = tokio::sync::broadcast::channel(2);
        for rv in 2..=5 {
            tx.send(change(rv, "VM", "p")).unwrap();
        }
        let mut last = 1;
        let (batch, lagged) = ready_lines(&change(1, "VM", "p"), &mut rx, &filter(), &mut last);
        assert!(lagged && batch.is_none(), "rv 1 is old; 2 and 3 were lost to the broadcast");
        assert_eq!(last, 1);
    }
}
