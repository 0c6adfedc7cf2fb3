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
