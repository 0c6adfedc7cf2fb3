//! The `Volume` kind: a persistent disk on one node, which VMs of its
//! project attach as a drive (`spec.drives[].volume`). It outlives the VMs
//! that use it; one VM uses it at a time.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Condition, Object, ResourceSpec};
use crate::policy::{Policy, QuotaUse};
use crate::rbac::Role;
use crate::registry::{AGE, Column, Format, NAME};
use crate::storage::MAX_DISK_MIB;
use crate::validation::{FieldErrors, validate_dns_label};

/// A persistent disk.
pub type Volume = Object<VolumeSpec>;

/// What the volume holds when it is made. Exactly one of `sizeMib` and
/// `image`. Fixed once made (a volume is never resized or refilled).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// An empty disk of this many MiB: sparse and unformatted (the first
    /// guest makes its filesystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// A copy of this `Rootfs` Image of the volume's project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The node to make it on; chosen by the controller when unset (a
    /// Ready node with the fewest volumes), then kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// Where a volume is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VolumePhase {
    /// Not made yet (no node, or its node has not made it).
    #[default]
    Pending,
    /// Made, attached to no VM.
    Available,
    /// Attached to a VM (`status.attachedTo`).
    InUse,
    /// Its node could not make it (`status.message` says why).
    Failed,
}

/// Observed state of a volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeStatus {
    #[serde(default)]
    pub phase: VolumePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The node that holds its file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Its size in bytes, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// The VM (of the volume's project) that holds it now. Set by the
    /// controller before the VM starts; cleared once the VM is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl VolumeSpec {
    /// Bytes the volume takes against quotas: its size, or its Image's
    /// when the image's size is known (`image_bytes`), else none yet.
    pub fn charged_mib(&self, image_bytes: Option<u64>) -> u64 {
        self.size_mib.or_else(|| image_bytes.map(|b| b.div_ceil(1 << 20))).unwrap_or(0)
    }
}

impl ResourceSpec for VolumeSpec {
    type Status = VolumeStatus;
    const KIND: &'static str = "Volume";
    const PLURAL: &'static str = "volumes";
    const NAMESPACED: bool = true;
    const POLICY: Policy = Policy::project(Role::Operator).written_by_the_controller().quota(QuotaUse::Counted);
    const ALIASES: &'static [&'static str] = &["volume", "vol"];
    const FIELD_SELECTORS: &'static [&'static str] = &["status.phase", "status.nodeName", "status.attachedTo"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("PHASE", &["status.phase"], Format::Text).or("Pending"),
        Column::new("NODE", &["status.nodeName", "spec.nodeName"], Format::Text),
        Column::new("SIZE", &["status.sizeBytes"], Format::Bytes),
        Column::new("ATTACHED-TO", &["status.attachedTo"], Format::Text),
        Column::new("IMAGE", &["spec.image"], Format::Text).wide(),
        AGE,
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        match (self.size_mib, &self.image) {
            (Some(_), Some(_)) | (None, None) => errors.add(
                "spec",
                "",
                "set exactly one of sizeMib (an empty disk) and image (a copy of a Rootfs Image)",
            ),
            (Some(mib), None) if mib == 0 || mib > MAX_DISK_MIB => {
                errors.add("spec.sizeMib", mib, "must be from 1 to 1048576 (1 TiB)")
            }
            (None, Some(image)) => validate_dns_label(errors, "spec.image", image),
            _ => {}
        }
        if let Some(node) = &self.node_name {
            validate_dns_label(errors, "spec.nodeName", node);
        }
    }

    fn validate_update(&self, old: &Self, errors: &mut FieldErrors) {
        if self.size_mib != old.size_mib || self.image != old.image {
            errors.add("spec", "", "sizeMib and image are fixed once the volume is made; make a new volume instead");
        }
        if old.node_name.is_some() && self.node_name != old.node_name {
            errors.add("spec.nodeName", self.node_name.as_deref().unwrap_or(""), "a volume stays on its node");
        }
    }
}
