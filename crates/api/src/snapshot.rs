//! The `Snapshot` kind: a paused VM's state and memory, saved on its node.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::registry::{AGE, Column, Format, NAME};

use crate::meta::{Condition, Object, ResourceSpec};
use crate::validation::{FieldErrors, validate_dns_label};

/// A snapshot of a VM.
pub type Snapshot = Object<SnapshotSpec>;

/// Which VM to snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// Name of the VM, in the snapshot's project.
    pub vm_name: String,
    /// Whether the VM runs on after the snapshot (else it stays Paused).
    #[serde(default = "default_true")]
    pub resume_after: bool,
}

fn default_true() -> bool {
    true
}

/// Progress of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SnapshotPhase {
    #[default]
    Pending,
    Creating,
    Ready,
    Failed,
}

/// Observed state of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotStatus {
    #[serde(default)]
    pub phase: SnapshotPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl ResourceSpec for SnapshotSpec {
    type Status = SnapshotStatus;
    const KIND: &'static str = "Snapshot";
    const PLURAL: &'static str = "snapshots";
    const NAMESPACED: bool = true;
    const ALIASES: &'static [&'static str] = &["snapshot", "snap"];
    const FIELD_SELECTORS: &'static [&'static str] = &["spec.vmName", "status.phase", "status.nodeName"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("VM", &["spec.vmName"], Format::Text),
        Column::new("PHASE", &["status.phase"], Format::Text).or("Pending"),
        Column::new("NODE", &["status.nodeName"], Format::Text),
        AGE,
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        validate_dns_label(errors, "spec.vmName", &self.vm_name);
    }
}
