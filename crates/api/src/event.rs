//! The `Event` kind: something worth seeing in `describe`, written by the system.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Readers, Writers};
use crate::registry::{Column, Format};

use crate::meta::{Object, ResourceSpec};
use crate::validation::FieldErrors;

/// A recorded decision or failure about one object.
pub type Event = Object<EventSpec>;

/// What happened, to which object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventSpec {
    pub involved_object: ObjectReference,
    #[serde(rename = "type")]
    pub type_: EventType,
    /// A short CamelCase cause, such as `Scheduled` or `Failed`.
    pub reason: String,
    pub message: String,
    /// How many times this happened (repeats are folded into one event).
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_timestamp: Option<DateTime<Utc>>,
    /// The component that wrote it (`nexus-controller`).
    #[serde(default)]
    pub reporting_component: String,
}

fn one() -> u32 {
    1
}

/// The object an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// Severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EventType {
    Normal,
    Warning,
}

/// Events carry no observed state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventStatus {}

impl ResourceSpec for EventSpec {
    type Status = EventStatus;
    const KIND: &'static str = "Event";
    const PLURAL: &'static str = "events";
    const NAMESPACED: bool = false;
    const POLICY: Policy =
        Policy::cluster(Readers::EveryoneInTheirProjects, Writers::System).written_by_the_controller();
    const ALIASES: &'static [&'static str] = &["event", "ev"];
    const FIELD_SELECTORS: &'static [&'static str] =
        &["spec.involvedObject.kind", "spec.involvedObject.name", "spec.involvedObject.project", "spec.reason"];
    const COLUMNS: &'static [Column] = &[
        Column::new("LAST SEEN", &["spec.lastTimestamp", "metadata.creationTimestamp"], Format::Age),
        Column::new("TYPE", &["spec.type"], Format::Text),
        Column::new("REASON", &["spec.reason"], Format::Text),
        Column::new("OBJECT", &["spec.involvedObject"], Format::Reference),
        Column::new("MESSAGE", &["spec.message"], Format::Text),
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        let camel = !self.reason.is_empty()
            && self.reason.len() <= 64
            && self.reason.bytes().all(|b| b.is_ascii_alphanumeric())
            && self.reason.starts_with(|c: char| c.is_ascii_uppercase());
        if !camel {
            errors.add(
                "spec.reason",
                &self.reason,
                "must be a CamelCase word of at most 64 letters or digits, such as Scheduled",
            );
        }
        if self.message.len() > 4096 {
            errors.add("spec.message", format!("<{} bytes>", self.message.len()), "must be at most 4096 bytes");
        }
    }
}

/// Most events one `POST /v1/events:record` carries.
pub const MAX_RECORDED: usize = 100;

/// The body of `POST /v1/events:record`: events written in one request.
/// Each is created, or, when an Event of its name exists, folded into that
/// one (see [`EventSpec::fold`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventRecordRequest {
    /// 1 to [`MAX_RECORDED`] events, each with its name.
    pub items: Vec<Event>,
}

/// What `POST /v1/events:record` stored: one entry per event sent, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventRecordResult {
    pub items: Vec<RecordedEvent>,
}

/// One event as stored by `POST /v1/events:record`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordedEvent {
    pub name: String,
    /// Its count after this record: 1 (or the count sent) for a new event.
    pub count: u32,
    pub resource_version: String,
}

impl EventSpec {
    /// Folds a repeat, `again`, into this event: its count grows by the
    /// repeat's, and the repeat's type, message and last time replace
    /// this one's (the first time and the object it is about stay).
    pub fn fold(&mut self, again: &EventSpec) {
        self.count = self.count.saturating_add(again.count.max(1));
        self.type_ = again.type_;
        self.message.clone_from(&again.message);
        self.last_timestamp = again.last_timestamp.or(again.first_timestamp).or(self.last_timestamp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(message: &str, at: i64) -> EventSpec {
        let at = DateTime::from_timestamp(at, 0);
        EventSpec {
            involved_object: ObjectReference {
                kind: "VM".into(),
                name: "a".into(),
                project: Some("p".into()),
                uid: None,
            },
            type_: EventType::Normal,
            reason: "Started".into(),
            message: message.into(),
            count: 1,
            first_timestamp: at,
            last_timestamp: at,
            reporting_component: "nexus-controller".into(),
        }
    }

    #[test]
    fn a_repeat_adds_its_count_and_brings_its_message_type_and_time() {
        let mut first = spec("started in 300 ms", 100);
        let mut again = spec("started in 250 ms", 160);
        again.type_ = EventType::Warning;
        again.count = 2;
        first.fold(&again);
        assert_eq!(first.count, 3);
        assert_eq!((first.message.as_str(), first.type_), ("started in 250 ms", EventType::Warning));
        assert_eq!(first.first_timestamp, DateTime::from_timestamp(100, 0), "the first time stays");
        assert_eq!(first.last_timestamp, DateTime::from_timestamp(160, 0));
        // A repeat with no times keeps the last one known.
        let mut bare = spec("again", 0);
        (bare.first_timestamp, bare.last_timestamp, bare.count) = (None, None, 0);
        first.fold(&bare);
        assert_eq!((first.count, first.last_timestamp), (4, DateTime::from_timestamp(160, 0)));
    }
}
