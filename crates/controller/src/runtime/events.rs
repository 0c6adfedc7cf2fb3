//! Events: decisions and failures worth seeing in `describe`. One Event
//! object per (object, reason); a repeat bumps its count and time instead
//! of adding another.

use chrono::Utc;
use nexus_api::client::Client;
use nexus_api::event::{EventType, ObjectReference};
use nexus_api::{Event, EventSpec, Object, ResourceSpec};

/// Component name written into every event.
pub const COMPONENT: &str = "nexus-controller";

/// Writes events for the controller.
#[derive(Debug, Clone)]
pub struct Recorder {
    api: Client,
}

/// A stable event name for (object uid, reason): a DNS label.
fn event_name(uid: &str, reason: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes().chain([0]).chain(reason.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
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
    pub fn new(api: Client) -> Self {
        Recorder { api }
    }

    /// Records that `reason` happened to `obj`. Failures to record are
    /// logged, never returned: an event must not fail a reconcile.
    pub async fn publish<S: ResourceSpec>(&self, obj: &Object<S>, type_: EventType, reason: &str, message: &str) {
        if let Err(e) = self.record(reference(obj), obj.uid(), type_, reason, message).await {
            tracing::warn!(kind = S::KIND, name = %obj.name(), reason, error = %e, "recording an event failed");
        }
    }

    /// Records that `reason` happened on node `node` (one event per message).
    pub async fn node(&self, node: &str, reason: &str, message: &str) {
        let reference = ObjectReference { kind: "Node".into(), name: node.to_string(), project: None, uid: None };
        let key = format!("node/{node}/{message}");
        if let Err(e) = self.record(reference, &key, EventType::Normal, reason, message).await {
            tracing::warn!(node, reason, error = %e, "recording an event failed");
        }
    }

    async fn record(
        &self,
        involved: ObjectReference,
        uid: &str,
        type_: EventType,
        reason: &str,
        message: &str,
    ) -> Result<(), nexus_api::client::ClientError> {
        let name = event_name(uid, reason);
        let now = Utc::now();
        for _ in 0..3 {
            match self.api.get::<EventSpec>("", &name).await {
                Ok(mut existing) => {
                    existing.spec.count += 1;
                    existing.spec.last_timestamp = Some(now);
                    existing.spec.message = message.to_string();
                    existing.spec.type_ = type_;
                    match self.api.replace(&existing).await {
                        Err(e) if e.is_conflict() => continue,
                        other => return other.map(|_| ()),
                    }
                }
                Err(e) if e.is_not_found() => {
                    let spec = EventSpec {
                        involved_object: involved.clone(),
                        type_,
                        reason: reason.to_string(),
                        message: message.to_string(),
                        count: 1,
                        first_timestamp: Some(now),
                        last_timestamp: Some(now),
                        reporting_component: COMPONENT.into(),
                    };
                    match self.api.create(&Event::new(&name, None, spec)).await {
                        Err(e) if e.is_conflict() => continue,
                        other => return other.map(|_| ()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
