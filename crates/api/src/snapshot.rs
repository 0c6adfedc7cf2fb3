//! The `Snapshot` kind: a VM's state, memory and disk at one moment, saved
//! on its node; new VMs start from it (`spec.restoreFrom`).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{Policy, QuotaUse};
use crate::rbac::Role;
use crate::registry::{AGE, Column, Format, NAME};

use crate::meta::{Condition, Object, ResourceSpec};
use crate::validation::{FieldErrors, validate_dns_label};
use crate::vm::{ResolvedConfig, VmError};

/// A snapshot of a VM.
pub type Snapshot = Object<SnapshotSpec>;

/// Which VM to snapshot. The spec is fixed once the snapshot is taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// Name of the VM, in the snapshot's project.
    pub vm_name: String,
    /// Whether the VM runs on after the snapshot. When false the VM's
    /// `spec.state` is set to `Paused` before it is taken, so the VM
    /// stays paused afterwards.
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

/// One file of a snapshot on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotFile {
    /// `state`, `memory` or `disk`.
    pub name: String,
    /// Host path on the node.
    pub path: String,
    /// Bytes it takes on disk.
    pub bytes: u64,
}

/// Observed state of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotStatus {
    #[serde(default)]
    pub phase: SnapshotPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The node holding the files (the VM's node when it was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// uid of the VM it was taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_uid: Option<String>,
    /// The VM's `metadata.generation` when it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_generation: Option<i64>,
    /// The VM's machine configuration when it was taken: a VM restored
    /// from the snapshot runs with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ResolvedConfig>,
    /// The guest's MAC address, which a restored VM keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<SnapshotFile>,
    /// Other nodes holding a checked copy of the files (copied there, from
    /// `nodeName`, for a VM restored on them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<String>,
    /// Bytes all files take on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// When the files were complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// How long the VM was paused for it, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_millis: Option<u64>,
    /// Why it failed, with Firecracker's own words when it said any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<VmError>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl ResourceSpec for SnapshotSpec {
    type Status = SnapshotStatus;
    const KIND: &'static str = "Snapshot";
    const PLURAL: &'static str = "snapshots";
    const NAMESPACED: bool = true;
    const POLICY: Policy = Policy::project(Role::Operator).written_by_the_controller().quota(QuotaUse::Counted);
    const ALIASES: &'static [&'static str] = &["snapshot", "snap"];
    const FIELD_SELECTORS: &'static [&'static str] = &["spec.vmName", "status.phase", "status.nodeName"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("VM", &["spec.vmName"], Format::Text),
        Column::new("PHASE", &["status.phase"], Format::Text).or("Pending"),
        Column::new("NODE", &["status.nodeName"], Format::Text),
        Column::new("SIZE", &["status.sizeBytes"], Format::Bytes),
        AGE,
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        validate_dns_label(errors, "spec.vmName", &self.vm_name);
    }

    fn validate_update(&self, old: &Self, errors: &mut FieldErrors) {
        let hint = "a snapshot's spec is fixed once created; create another snapshot instead";
        if self.vm_name != old.vm_name {
            errors.add("spec.vmName", &self.vm_name, hint);
        }
        if self.resume_after != old.resume_after {
            errors.add("spec.resumeAfter", self.resume_after.to_string(), hint);
        }
    }
}
