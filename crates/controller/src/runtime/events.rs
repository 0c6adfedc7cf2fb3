//! Events: decisions and failures worth seeing in `describe`. One Event
//! object per (object, reason); a repeat bumps its count and time instead
//! of adding another. They are written in batches, off the reconcilers'
//! path, with `POST /v1/events:record`.

use chrono::Utc;
use nexus_api::event::{EventType, ObjectReference};
use nexus_api::{Event, EventSpec, Object, ResourceSpec};
use nexus_client::Client;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Component name written into every event.
pub const COMPONENT: &str = "nexus-controller";

/// Writes events for the controller, off the reconcilers' path: `publish`
/// hands the event to a background writer and returns at once, so a
/// reconcile never waits on an Event's round trips.
#[derive(Debug, Clone)]
pub struct Recorder {
    queue: mpsc::Sender<Pending>,
}

/// Events waiting for the writer; beyond this many, new ones are dropped
/// (with a warning) rather than slowing reconciles down.
const QUEUE: usize = 4096;

/// Requests the background writer has in flight at once. While they are
/// out, new events wait in the queue and go together in the next request.
const IN_FLIGHT: usize = 2;

/// Most events in one request.
const BATCH: usize = nexus_api::event::MAX_RECORDED;

/// How long the writer waits, from the first event of a request, for
/// others to go with it: events are for people reading `describe`, and a
/// burst (a fleet starting) goes out in a few requests instead of one or
/// two per VM.
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// One event on its way to the apiserver.
#[derive(Debug)]
struct Pending {
    involved: ObjectReference,
    /// What the event's name is derived from, with its reason.
    key: String,
    type_: EventType,
    reason: String,
    message: String,
    at: chrono::DateTime<Utc>,
    /// The request id of the reconcile that published it.
    request_id: Option<String>,
}

/// A stable event name for (object uid, reason): a DNS label.
fn event_name(uid: &str, reason: &str) -> String {
    let hash = nexus_api::fnv::fnv1a(uid.bytes().chain([0]).chain(reason.bytes()));
    format!("ev-{}-{hash:016x}", reason.to_lowercase().chars().take(24).collect::<String>())
}

/// A reference to `obj`, as events carry it.
pub fn reference<S: ResourceSpec>(obj: &Object<S>) -> ObjectReference {
    ObjectReference {
        kind: S::KIND.into(),
        name: obj.name().to_string(),
        project: obj.metadata.project.clone(),
        uid: obj.metadata.uid.clone(),
    }
}

impl Recorder {
    /// A recorder writing through `api`, from a task on the current runtime.
    pub fn new(api: Client) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(write_all(api, pending));
        Recorder { queue }
    }

    /// Records that `reason` happened to `obj`. Failures to record are
    /// logged, never returned: an event must not fail or slow a reconcile.
    pub async fn publish<S: ResourceSpec>(&self, obj: &Object<S>, type_: EventType, reason: &str, message: &str) {
        self.enqueue(reference(obj), obj.uid().to_string(), type_, reason, message);
    }

    /// Records that `reason` happened on node `node` (one event per message).
    pub async fn node(&self, node: &str, reason: &str, message: &str) {
        let reference = ObjectReference {
            kind: nexus_api::NodeSpec::KIND.into(),
            name: node.to_string(),
            project: None,
            uid: None,
        };
        self.enqueue(reference, format!("node/{node}/{message}"), EventType::Normal, reason, message);
    }

    fn enqueue(&self, involved: ObjectReference, key: String, type_: EventType, reason: &str, message: &str) {
        let pending = Pending {
            involved,
            key,
            type_,
            reason: reason.into(),
            message: message.into(),
            at: Utc::now(),
            request_id: nexus_client::trace::current(),
        };
        if let Err(e) = self.queue.try_send(pending) {
            let dropped = match &e {
                mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
            };
            tracing::warn!(name = %dropped.involved.name, reason = %dropped.reason, "event dropped: the writer is behind");
        }
    }
}

/// Writes queued events until every recorder is gone: what is queued when
/// a request slot frees up, and what comes within [`LINGER`] of it, goes
/// in one request.
async fn write_all(api: Client, mut pending: mpsc::Receiver<Pending>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let mut batch = Vec::new();
        if pending.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        if batch.len() < BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH
                && let Ok(more) = pending.try_recv()
            {
                batch.push(more);
            }
        }
        let api = api.clone();
        // The request carries the id of the reconcile of its first event.
        let id = batch[0].request_id.clone().unwrap_or_else(nexus_client::trace::new_id);
        let write = async move {
            write_batch(&api, &batch).await;
            drop(permit);
        };
        tokio::spawn(nexus_client::trace::scope(id, write).in_current_span());
    }
}

/// The Event that records `event` (a first occurrence: the apiserver folds
/// it into the one of its name, if there is one).
fn event_object(event: &Pending) -> Event {
    let spec = EventSpec {
        involved_object: event.involved.clone(),
        type_: event.type_,
        reason: event.reason.clone(),
        message: event.message.clone(),
        count: 1,
        first_timestamp: Some(event.at),
        last_timestamp: Some(event.at),
        reporting_component: COMPONENT.into(),
    };
    Event::new(&event_name(&event.key, &event.reason), None, spec)
}

/// Writes `batch` in one request (the apiserver folds each event into the
/// one of its name, if there is one). One event refused refuses the whole
/// request: the others are then written one by one, so that only the
/// refused one is lost.
async fn write_batch(api: &Client, batch: &[Pending]) {
    match api.record_events(batch.iter().map(event_object).collect()).await {
        Ok(_) => {}
        Err(e) if e.status() == Some(422) && batch.len() > 1 => {
            for event in batch {
                if let Err(e) = api.record_events(vec![event_object(event)]).await {
                    tracing::warn!(name = %event.involved.name, reason = %event.reason, error = %e, "recording an event failed");
                }
            }
        }
        Err(e) => tracing::warn!(events = batch.len(), error = %e, "recording events failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_stable_dns_labels_per_object_and_reason() {
        let a = event_name("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11", "Scheduled");
        assert_eq!(a, event_name("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11", "Scheduled"));
        assert_ne!(a, event_name("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11", "Started"));
        let mut errors = nexus_api::validation::FieldErrors::default();
        nexus_api::validation::validate_dns_label(&mut errors, "name", &a);
        assert!(errors.is_empty(), "{a}");
    }
}
