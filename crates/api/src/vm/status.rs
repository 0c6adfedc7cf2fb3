//! A VM's observed side: its phase, the configuration it was resolved to,
//! what its node reports of the running VMM, and how it last ended.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::VmNetwork;
use crate::meta::Condition;
use crate::storage::RateLimiter;

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmExit {
    /// Exit status, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// When the agent saw it end; absent when it was not watching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

impl VmExit {
    /// Exit status 0 without a signal: the guest shut down.
    pub fn is_clean(&self) -> bool {
        self.code == Some(0) && self.signal.is_none()
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (_, Some(sig)) => write!(f, "killed by signal {sig}"),
            (Some(code), None) => write!(f, "exited with status {code}"),
            (None, None) => write!(f, "ended (status unknown)"),
        }
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VmPhase {
    /// Accepted, not yet placed on a node.
    #[default]
    Pending,
    /// Placed on a node, not yet running.
    Scheduled,
    Running,
    Paused,
    Stopped,
    /// The VMM exited cleanly and `restartPolicy` keeps it down.
    Succeeded,
    /// Cannot run until its spec changes; see `lastError`.
    Failed,
    /// Being torn down after a delete.
    Terminating,
}

impl std::fmt::Display for VmPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Observed state of a VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmStatus {
    #[serde(default)]
    pub phase: VmPhase,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The node the VM was placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Facts about the running VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<VmRuntime>,
    /// The last error, with Firecracker's own message when it came from the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<VmError>,
    /// The configuration the VM runs with: its spec over its template, with
    /// image names resolved to host paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ResolvedConfig>,
    /// The template the VM was made from (its revision) and what the VM
    /// sets differently: the base and the overrides, field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<crate::template::TemplateView>,
    /// When the VM is deleted: its first start plus `spec.lifetime`, or
    /// when it finished plus `spec.ttlSecondsAfterFinished`, whichever
    /// comes first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A VM's complete machine configuration, resolved by the controller from
/// the VM, its Template and its Images. Kept in status so a running VM does
/// not depend on its template or images staying as they were.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolvedConfig {
    /// The VM's `metadata.generation` this was resolved from.
    pub generation: i64,
    /// The template used, with its generation (`name@generation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    pub vcpu: u8,
    pub mem_mib: u32,
    /// Host path of the kernel.
    pub kernel_path: String,
    /// Host path of the root filesystem image.
    pub rootfs_path: String,
    /// The kernel's Image and its generation (`name@generation`), when
    /// the kernel was named by an Image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_image: Option<String>,
    /// The root filesystem's Image and its generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_image: Option<String>,
    /// The sha256 the kernel's Image names, checked by the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_sha256: Option<String>,
    /// The sha256 the root filesystem's Image names, checked by the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_sha256: Option<String>,
    /// Where the node downloads the kernel when its copy is missing or wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_source: Option<String>,
    /// Where the node downloads the root filesystem when its copy is
    /// missing or wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_source: Option<String>,
    /// The initial ramdisk, when there is one: its host path, Image,
    /// sha256 and source, as for the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_source: Option<String>,
    pub boot_args: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<VmNetwork>,
    /// The snapshot a restored VM starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<ResolvedRestore>,
    /// Extra drives, in order, with what backs each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<crate::storage::ResolvedDrive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_rate_limiter: Option<RateLimiter>,
    /// What the guest is told besides who it is: user data, SSH keys and
    /// the user's metadata, the template's merged with the VM's.
    #[serde(default, skip_serializing_if = "is_default")]
    pub guest: crate::guest::GuestConfig,
}

/// A restored VM's source, as resolved by the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolvedRestore {
    /// The Snapshot's name and uid (`name@uid`).
    pub snapshot: String,
    pub snapshot_uid: String,
    /// The node that took it: its files are there, and are copied from
    /// there to a VM's node that has none.
    pub node: String,
}

/// Runtime facts reported by the node agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmRuntime {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The guest's IPv4 address, when the VM asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// Milliseconds from process start to InstanceStart answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_millis: Option<u64>,
    /// How many times the VMM was started again after it ended on its own.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// How the last VMM ended, when it ended on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<VmExit>,
    /// The extra drives the VMM has, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<crate::storage::DriveStatus>,
    /// The I/O limits the VMM applies now, and the generation they came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::storage::AppliedLimits>,
    /// Why the VM's spec is not all in effect until the VMM starts again
    /// (drives added or removed while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_pending: Option<String>,
    /// The document the guest reads from its metadata service now (see
    /// `nexus_api::guest::document`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<serde_json::Value>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An error worth showing to the VM's owner.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmError {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<String>,
}
