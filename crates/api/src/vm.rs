//! The `VM` kind: one Firecracker microVM, desired and observed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Condition, Object, ResourceSpec};
use crate::validation::{FieldErrors, validate_dns_label, validate_host_path, validate_mac};

/// A microVM.
pub type Vm = Object<VmSpec>;

/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u32 = 16;
/// Largest vCPU count Firecracker accepts.
pub const MAX_VCPU: u8 = 32;
/// Kernel command line used when `bootArgs` is not given.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Desired state of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSpec {
    /// Number of vCPUs: 1 or an even number up to 32.
    pub vcpu: u8,
    /// Guest memory in MiB (at least 16).
    pub mem_mib: u32,
    /// Kernel image: an absolute host path (dev mode).
    pub kernel: String,
    /// Root filesystem image: an absolute host path (dev mode). The VM boots
    /// from its own writable copy; the image itself is never written.
    pub rootfs: String,
    /// Kernel command line; defaults to `DEFAULT_BOOT_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Desired power state.
    #[serde(default)]
    pub state: PowerState,
    /// The node to run on: set by the scheduler unless pinned here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Only nodes carrying all these labels are considered.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Network interface settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<VmNetwork>,
}

/// Network settings of a VM's single interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmNetwork {
    /// Guest MAC (`xx:xx:xx:xx:xx:xx`); derived from the uid when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// An IPv4 address from the node's VM subnet, handed to the guest on the
    /// kernel command line (`ip=`): `auto` to have one picked, or an address
    /// in that subnet. Absent: the guest configures its own network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// Desired power state of a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PowerState {
    #[default]
    Running,
    Paused,
    Stopped,
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

impl ResourceSpec for VmSpec {
    type Status = VmStatus;
    const KIND: &'static str = "VM";
    const PLURAL: &'static str = "vms";
    const NAMESPACED: bool = true;

    fn validate(&self, errors: &mut FieldErrors) {
        validate_machine(errors, self.vcpu, self.mem_mib, &self.kernel, &self.rootfs);
        if let Some(node) = &self.node_name {
            validate_dns_label(errors, "spec.nodeName", node);
        }
        if let Some(mac) = self.network.as_ref().and_then(|n| n.mac.as_ref()) {
            validate_mac(errors, "spec.network.mac", mac);
        }
        if let Some(ip) = self.network.as_ref().and_then(|n| n.ip.as_ref()) {
            validate_ip_request(errors, "spec.network.ip", ip);
        }
    }
}

/// Checks `spec.network.ip`: `auto` or a dotted IPv4 address.
pub fn validate_ip_request(errors: &mut FieldErrors, field: &str, ip: &str) {
    if ip != "auto" && ip.parse::<std::net::Ipv4Addr>().is_err() {
        errors.add(field, ip, "must be `auto` or an IPv4 address in the node's VM subnet, such as 172.30.0.10");
    }
}

/// Checks the machine fields VMs and Templates share, under `spec.`.
pub fn validate_machine(errors: &mut FieldErrors, vcpu: u8, mem_mib: u32, kernel: &str, rootfs: &str) {
    if vcpu == 0 || vcpu > MAX_VCPU || (vcpu > 1 && vcpu % 2 == 1) {
        errors.add("spec.vcpu", vcpu, "must be 1 or an even number from 2 to 32 (Firecracker's limits)");
    }
    if mem_mib < MIN_MEM_MIB {
        errors.add("spec.memMib", mem_mib, "must be at least 16 (MiB)");
    }
    validate_host_path(errors, "spec.kernel", kernel);
    validate_host_path(errors, "spec.rootfs", rootfs);
}

/// A locally administered unicast MAC derived from a VM uid: stable across
/// restarts and distinct for distinct uids with overwhelming likelihood.
pub fn mac_from_uid(uid: &str) -> String {
    // FNV-1a over the uid gives 4 well-mixed bytes without a hashing dependency.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in uid.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    // 0x06: locally administered (bit 1) and unicast (bit 0 clear).
    format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", b[4], b[5], b[6], b[7])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            vcpu: 1,
            mem_mib: 128,
            kernel: "/images/vmlinux".into(),
            rootfs: "/images/rootfs.ext4".into(),
            boot_args: None,
            state: PowerState::Running,
            node_name: None,
            node_selector: BTreeMap::new(),
            network: None,
        }
    }

    #[test]
    fn odd_vcpu_counts_above_one_are_rejected_with_the_field_path() {
        let mut errors = FieldErrors::default();
        VmSpec { vcpu: 3, ..spec() }.validate(&mut errors);
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].field, "spec.vcpu");
        assert_eq!(errors.0[0].value, "3");
    }

    #[test]
    fn relative_and_dotdot_paths_are_rejected() {
        let mut errors = FieldErrors::default();
        VmSpec { kernel: "vmlinux".into(), rootfs: "/a/../b".into(), ..spec() }.validate(&mut errors);
        let fields: Vec<_> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.kernel", "spec.rootfs"]);
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_locally_administered() {
        let mac = mac_from_uid("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11");
        assert_eq!(mac, mac_from_uid("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11"));
        assert_ne!(mac, mac_from_uid("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a12"));
        assert!(mac.starts_with("06:"));
        let mut errors = FieldErrors::default();
        validate_mac(&mut errors, "mac", &mac);
        assert!(errors.is_empty());
    }

    #[test]
    fn unknown_spec_fields_are_rejected() {
        let err = serde_json::from_value::<VmSpec>(serde_json::json!({
            "vcpu": 1, "memMib": 128, "kernel": "/k", "rootfs": "/r", "memory": 5
        }))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `memory`"), "{err}");
    }
}
