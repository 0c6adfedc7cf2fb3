//! Object metadata and the generic `Object<Spec>` envelope shared by every kind.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// What every kind's spec type declares about the kind it belongs to.
pub trait ResourceSpec:
    Serialize + DeserializeOwned + JsonSchema + Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// The status type written by the system for this kind.
    type Status: Serialize
        + DeserializeOwned
        + JsonSchema
        + Clone
        + PartialEq
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static;
    /// `kind` as it appears in objects (`VM`, `Node`).
    const KIND: &'static str;
    /// Lower-case plural used in URL paths (`vms`, `nodes`).
    const PLURAL: &'static str;
    /// Whether objects live in a project (`true`) or are cluster-wide.
    const NAMESPACED: bool;
    /// Other names `nexusctl` accepts for the kind (`vm`, `no`).
    const ALIASES: &'static [&'static str] = &[];
    /// Fields a `fieldSelector` may name besides `metadata.name` and
    /// `metadata.project`, as dotted paths (`spec.nodeName`).
    const FIELD_SELECTORS: &'static [&'static str] = &[];
    /// The columns of `nexusctl get`.
    const COLUMNS: &'static [crate::registry::Column] = &[crate::registry::NAME, crate::registry::AGE];
    /// Who may read and write the kind, and whether quotas count it.
    const POLICY: crate::policy::Policy;

    /// The raw host paths the spec names, as (field, path): allowed only in
    /// the apiserver's dev mode, to admins. Default: none.
    fn host_paths(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// The Images the spec's extra drives name, as (field, image name):
    /// admission checks each is a `Rootfs` Image when it exists. Default:
    /// none.
    fn drive_images(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Checks the spec's values, adding one error per bad field (paths start
    /// at `spec.`). The default accepts everything serde accepted.
    fn validate(&self, errors: &mut crate::validation::FieldErrors) {
        let _ = errors;
    }

    /// Adds an error for each change from `old` (the stored spec) that this
    /// kind does not allow, such as a field fixed at creation.
    fn validate_update(&self, old: &Self, errors: &mut crate::validation::FieldErrors) {
        let _ = (old, errors);
    }
}

/// Metadata every object carries; the system owns everything but `name`,
/// `project`, `labels`, `annotations`, `finalizers` and `ownerReferences`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Unique within its kind and project; a DNS label (`[a-z0-9-]`, at most 63).
    pub name: String,
    /// The project of a project-scoped object; absent for cluster-wide kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Assigned by the apiserver on create; never changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Opaque version of this object; send it back on update for optimistic concurrency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Incremented on every change of `spec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<DateTime<Utc>>,
    /// Set when deletion was requested; the object goes once `finalizers` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

/// Points at the object that owns this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    pub uid: String,
}

/// A nexus object: metadata, the desired `spec` and the observed `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[serde(bound(
    serialize = "S: Serialize, S::Status: Serialize",
    deserialize = "S: DeserializeOwned, S::Status: DeserializeOwned"
))]
#[schemars(bound = "S: JsonSchema, S::Status: JsonSchema")]
pub struct Object<S: ResourceSpec> {
    /// Always `nexus/v1`.
    pub api_version: String,
    /// The kind, matching the endpoint it is sent to.
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    /// Written by the system through the status endpoint only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<S::Status>,
}

impl<S: ResourceSpec> Object<S> {
    /// A new object of this kind with only a name, project and spec.
    pub fn new(name: &str, project: Option<&str>, spec: S) -> Self {
        Self {
            api_version: crate::API_VERSION.to_string(),
            kind: S::KIND.to_string(),
            metadata: ObjectMeta {
                name: name.to_string(),
                project: project.map(str::to_string),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The object's uid, or `""` before it was stored.
    pub fn uid(&self) -> &str {
        self.metadata.uid.as_deref().unwrap_or("")
    }

    /// Status, or the default when none was written yet.
    pub fn status_or_default(&self) -> S::Status {
        self.status.clone().unwrap_or_default()
    }

    /// Status, or the default when none was written yet, without copying a
    /// stored one: for reading ([`Object::status_or_default`] gives a status
    /// to change). Controllers read a node's status for every VM they touch.
    pub fn status_view(&self) -> std::borrow::Cow<'_, S::Status> {
        match &self.status {
            Some(status) => std::borrow::Cow::Borrowed(status),
            None => std::borrow::Cow::Owned(S::Status::default()),
        }
    }

    /// Whether deletion was requested.
    pub fn is_deleting(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }
}

/// List metadata: the version the list was read at and the paging token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

/// A page of objects of one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectList<T> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ListMeta,
    pub items: Vec<T>,
}

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// One observed aspect of an object, keyed by `type` within its list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: DateTime<Utc>,
}

/// Sets condition `type_` in `conditions`, keeping `lastTransitionTime` when
/// the status did not change. Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
) -> bool {
    let now = Utc::now();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let changed = existing.status != status || existing.reason != reason || existing.message != message;
            if existing.status != status {
                existing.last_transition_time = now;
            }
            existing.status = status;
            existing.reason = reason.to_string();
            existing.message = message.to_string();
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status,
                reason: reason.to_string(),
                message: message.to_string(),
                last_transition_time: now,
            });
            true
        }
    }
}

/// The condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut conditions = Vec::new();
        assert!(set_condition(&mut conditions, "Ready", ConditionStatus::False, "Booting", ""));
        let first = conditions[0].last_transition_time;
        assert!(set_condition(&mut conditions, "Ready", ConditionStatus::False, "Waiting", ""));
        assert_eq!(conditions[0].last_transition_time, first);
        assert!(!set_condition(&mut conditions, "Ready", ConditionStatus::False, "Waiting", ""));
        assert_eq!(conditions.len(), 1);
    }
}
