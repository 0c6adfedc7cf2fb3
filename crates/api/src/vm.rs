//! The `VM` kind: one Firecracker microVM, desired and observed.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{Policy, QuotaUse};
use crate::rbac::Role;
use crate::registry::{AGE, Column, Format, NAME};

use crate::meta::{Object, ResourceSpec};
use crate::storage::{DriveSpec, NetworkLimits, RateLimiter};
use crate::validation::{FieldErrors, validate_dns_label, validate_host_path, validate_mac};

mod status;

pub use status::{ResolvedConfig, ResolvedRestore, VmError, VmExit, VmPhase, VmRuntime, VmStatus};

/// A microVM.
pub type Vm = Object<VmSpec>;

/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u32 = 16;
/// Largest vCPU count Firecracker accepts.
pub const MAX_VCPU: u8 = 32;
/// Kernel command line used when `bootArgs` is not given.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Desired state of a VM.
///
/// A VM either names a `template` and overrides some of its settings, or
/// gives `vcpu`, `memMib`, `kernel` and `rootfs` itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSpec {
    /// A Template in the VM's project to start from; every field set here
    /// overrides the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Number of vCPUs: 1 or an even number up to 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u8>,
    /// Guest memory in MiB (at least 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u32>,
    /// Kernel: the name of a `Kernel` Image in the VM's project, or an
    /// absolute host path (dev mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Root filesystem: the name of a `Rootfs` Image in the VM's project, or
    /// an absolute host path (dev mode). The VM boots from its own writable
    /// copy; the image itself is never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Initial ramdisk, for kernels that load their drivers from one: the
    /// name of an `Initrd` Image in the VM's project, or an absolute host
    /// path (dev mode). Defaults to the template's; none when neither sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line; defaults to the template's, then to `DEFAULT_BOOT_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Desired power state.
    #[serde(default)]
    pub state: PowerState,
    /// What happens when the VMM process ends without being asked to.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// How long the VM may live once it has started (`30s`, `10m`, `2h`,
    /// `1d`): then it is stopped and deleted, with an `Expired` Event. The
    /// deadline is in `status.expiresAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
    /// Seconds a VM that ended on its own (`Succeeded` or `Failed`) is
    /// kept before it is deleted, with an `Expired` Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u32>,
    /// The node to run on: set by the scheduler unless pinned here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Only nodes carrying all these labels are considered (merged over
    /// the template's, key by key).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Network interface settings; the template's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<VmNetwork>,
    /// A check of the guest, run by its node while the VM runs: the VM is
    /// `Ready` only once it passes (a VMM that runs is not yet a guest
    /// that serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<ReadinessProbe>,
    /// Start from a Snapshot in the VM's project instead of booting: the
    /// VM runs the snapshot's machine on the snapshot's node, continuing
    /// where its guest was. Its machine fields stay unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<RestoreSource>,
    /// Extra drives, attached before boot after the root drive, in order;
    /// merged with the template's by name. Adding or removing one on a
    /// running VM takes effect at its next start (`RestartPending`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveSpec>,
    /// I/O limits of the root drive; the template's when absent. Changed on
    /// a running VM without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_rate_limiter: Option<RateLimiter>,
    /// Handed to the guest through its metadata service
    /// (`/latest/user-data`): a cloud-init file or a script, at most 16 KiB;
    /// the template's when absent. Not for secrets: anyone who may read the
    /// VM may read it (docs/guests.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// OpenSSH public keys the guest installs (`/latest/meta-data/public-keys`),
    /// after the template's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// The user's own JSON, served to the guest at `/nexus/metadata`
    /// (merged over the template's, key by key; at most 16 KiB). Changed on
    /// a running VM without a restart.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl VmSpec {
    /// The spec's guest-facing fields, as set here (not yet merged with
    /// the template's).
    pub fn guest(&self) -> crate::guest::GuestConfig {
        crate::guest::GuestConfig {
            user_data: self.user_data.clone(),
            ssh_authorized_keys: self.ssh_authorized_keys.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// How a node checks that a VM's guest is up. Exactly one of `console`
/// and `tcpPort` is set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadinessProbe {
    /// A regular expression (Rust `regex` syntax) one line of the guest's
    /// console must match, such as `login:` or `^ci-runner ready$`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// A TCP port on the guest's address (`spec.network.ip`) that must
    /// accept a connection from the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
}

/// Longest console pattern a probe may carry.
pub const MAX_PROBE_PATTERN: usize = 256;

impl ReadinessProbe {
    /// Checks the probe under `field` (`spec.readinessProbe`).
    pub fn validate(&self, errors: &mut FieldErrors, field: &str, has_ip: bool) {
        match (&self.console, self.tcp_port) {
            (Some(_), Some(_)) | (None, None) => errors.add(
                field,
                "",
                "set exactly one of console (a pattern of a console line) and tcpPort (a port on the guest's address)",
            ),
            (Some(pattern), None) => {
                if pattern.len() > MAX_PROBE_PATTERN {
                    errors.add(&format!("{field}.console"), pattern, "must be at most 256 bytes");
                } else if let Err(e) = regex::Regex::new(pattern) {
                    let first = e.to_string().lines().last().unwrap_or_default().trim().to_string();
                    errors.add(
                        &format!("{field}.console"),
                        pattern,
                        &format!("must be a regular expression ({first}); escape special characters with \\"),
                    );
                }
            }
            (None, Some(port)) => {
                if port == 0 {
                    errors.add(&format!("{field}.tcpPort"), port, "must be a port from 1 to 65535");
                }
                if !has_ip {
                    errors.add(
                        &format!("{field}.tcpPort"),
                        port,
                        "needs the guest's address from the node: set spec.network.ip (auto or an address)",
                    );
                }
            }
        }
    }
}

/// Where a restored VM starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreSource {
    /// Name of a Ready Snapshot in the VM's project.
    pub snapshot: String,
}

/// When a VM's VMM is started again after it ended on its own (the guest
/// powered off or the process died). A VM stopped through `spec.state` is
/// never restarted by this.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RestartPolicy {
    /// Always start it again.
    #[default]
    Always,
    /// Start it again unless it exited cleanly (status 0, no signal); a
    /// clean exit leaves the VM `Succeeded`.
    OnFailure,
    /// Never: the VM ends `Succeeded` or `Failed` with the exit recorded.
    Never,
}

impl RestartPolicy {
    /// Whether a VMM that ended with `exit` (`None`: unknown, as after an
    /// agent restart) is started again.
    pub fn restarts(self, exit: Option<&VmExit>) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !exit.is_some_and(VmExit::is_clean),
            RestartPolicy::Never => false,
        }
    }
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
    /// I/O limits of the interface (what the guest receives, `rx`, and
    /// sends, `tx`). Changed on a running VM without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<NetworkLimits>,
}

/// Desired power state of a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PowerState {
    #[default]
    Running,
    Paused,
    Stopped,
}

impl ResourceSpec for VmSpec {
    type Status = VmStatus;
    const KIND: &'static str = "VM";
    const PLURAL: &'static str = "vms";
    const NAMESPACED: bool = true;
    const POLICY: Policy = Policy::project(Role::Operator).written_by_the_controller().quota(QuotaUse::Counted);
    const ALIASES: &'static [&'static str] = &["vm"];
    const FIELD_SELECTORS: &'static [&'static str] = &["spec.nodeName", "status.phase", "status.nodeName"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("STATE", &["spec.state"], Format::Text),
        Column::new("PHASE", &["status.phase"], Format::Text).or("Pending"),
        Column::new("NODE", &["spec.nodeName"], Format::Text),
        // The resolved machine when known (a template may supply it).
        Column::new("VCPU", &["status.config.vcpu", "spec.vcpu"], Format::Text),
        Column::new("MEMORY", &["status.config.memMib", "spec.memMib"], Format::Mebibytes),
        AGE,
        Column::new("TAP", &["status.runtime.tapName"], Format::Text).wide(),
        Column::new("MAC", &["status.runtime.mac"], Format::Text).wide(),
        Column::new("PID", &["status.runtime.pid"], Format::Text).wide(),
    ];

    fn drive_images(&self) -> Vec<(String, String)> {
        crate::storage::drive_images("spec.drives", &self.drives)
    }

    fn host_paths(&self) -> Vec<(&'static str, String)> {
        [("spec.kernel", &self.kernel), ("spec.rootfs", &self.rootfs), ("spec.initrd", &self.initrd)]
            .into_iter()
            .filter_map(|(f, v)| v.as_ref().filter(|v| v.starts_with('/')).map(|v| (f, v.clone())))
            .collect()
    }

    fn validate_update(&self, old: &Self, errors: &mut FieldErrors) {
        if self.restore_from != old.restore_from {
            let value = self.restore_from.as_ref().map(|r| r.snapshot.as_str()).unwrap_or("");
            errors.add(
                "spec.restoreFrom",
                value,
                "is fixed once the VM is created; create a new VM to restore another snapshot",
            );
        }
    }

    fn validate(&self, errors: &mut FieldErrors) {
        if let Some(from) = &self.restore_from {
            validate_dns_label(errors, "spec.restoreFrom.snapshot", &from.snapshot);
            // The machine is the snapshot's: its memory, devices and disk
            // are what the guest continues with.
            let hint = "a VM restored from a snapshot runs the snapshot's machine; leave it out";
            let set = [
                ("spec.template", self.template.is_some()),
                ("spec.vcpu", self.vcpu.is_some()),
                ("spec.memMib", self.mem_mib.is_some()),
                ("spec.kernel", self.kernel.is_some()),
                ("spec.rootfs", self.rootfs.is_some()),
                ("spec.initrd", self.initrd.is_some()),
                ("spec.bootArgs", self.boot_args.is_some()),
                ("spec.network", self.network.is_some()),
                ("spec.drives", !self.drives.is_empty()),
                ("spec.rootfsRateLimiter", self.rootfs_rate_limiter.is_some()),
            ];
            for (field, present) in set {
                if present {
                    errors.add(field, "", hint);
                }
            }
        } else if let Some(template) = &self.template {
            validate_dns_label(errors, "spec.template", template);
        } else {
            let hint = "is required: set it, or name a Template in spec.template";
            if self.vcpu.is_none() {
                errors.add("spec.vcpu", "", hint);
            }
            if self.mem_mib.is_none() {
                errors.add("spec.memMib", "", hint);
            }
            if self.kernel.is_none() {
                errors.add("spec.kernel", "", hint);
            }
            if self.rootfs.is_none() {
                errors.add("spec.rootfs", "", hint);
            }
        }
        validate_machine(errors, self.vcpu, self.mem_mib, self.kernel.as_deref(), self.rootfs.as_deref());
        crate::guest::validate(errors, "spec", &self.guest());
        if let Some(initrd) = &self.initrd {
            validate_image_ref(errors, "spec.initrd", initrd);
        }
        if let Some(lifetime) = &self.lifetime {
            let ok = crate::validation::parse_duration(lifetime).is_some_and(|d| {
                d >= std::time::Duration::from_secs(1) && d <= std::time::Duration::from_secs(366 * 86_400)
            });
            if !ok {
                errors.add(
                    "spec.lifetime",
                    lifetime,
                    "must be a duration of 1s to 366d: a number and s, m, h or d (90m)",
                );
            }
        }
        if let Some(probe) = &self.readiness_probe {
            // The template may give the address; the controller checks again.
            let has_ip = self.network.as_ref().is_some_and(|n| n.ip.is_some()) || self.template.is_some();
            probe.validate(errors, "spec.readinessProbe", has_ip);
        }
        if let Some(node) = &self.node_name {
            validate_dns_label(errors, "spec.nodeName", node);
        }
        if let Some(args) = &self.boot_args {
            crate::validation::validate_boot_args(errors, "spec.bootArgs", args);
        }
        crate::validation::validate_labels(errors, "spec.nodeSelector", &self.node_selector);
        if let Some(mac) = self.network.as_ref().and_then(|n| n.mac.as_ref()) {
            validate_mac(errors, "spec.network.mac", mac);
        }
        if let Some(ip) = self.network.as_ref().and_then(|n| n.ip.as_ref()) {
            validate_ip_request(errors, "spec.network.ip", ip);
        }
        if let Some(limits) = self.network.as_ref().and_then(|n| n.rate_limiter.as_ref()) {
            limits.validate(errors, "spec.network.rateLimiter");
        }
        crate::storage::validate_drives(errors, "spec.drives", &self.drives);
        if let Some(l) = &self.rootfs_rate_limiter {
            l.validate(errors, "spec.rootfsRateLimiter");
        }
    }
}

/// Checks `spec.network.ip`: `auto` or a dotted IPv4 address.
pub fn validate_ip_request(errors: &mut FieldErrors, field: &str, ip: &str) {
    if ip != "auto" && ip.parse::<std::net::Ipv4Addr>().is_err() {
        errors.add(field, ip, "must be `auto` or an IPv4 address in the node's VM subnet, such as 172.30.0.10");
    }
}

/// Checks the machine fields VMs and Templates share, under `spec.`, where given.
pub fn validate_machine(
    errors: &mut FieldErrors,
    vcpu: Option<u8>,
    mem_mib: Option<u32>,
    kernel: Option<&str>,
    rootfs: Option<&str>,
) {
    if let Some(vcpu) = vcpu
        && (vcpu == 0 || vcpu > MAX_VCPU || (vcpu > 1 && vcpu % 2 == 1))
    {
        errors.add("spec.vcpu", vcpu, "must be 1 or an even number from 2 to 32 (Firecracker's limits)");
    }
    if let Some(mem_mib) = mem_mib
        && mem_mib < MIN_MEM_MIB
    {
        errors.add("spec.memMib", mem_mib, "must be at least 16 (MiB)");
    }
    if let Some(kernel) = kernel {
        validate_image_ref(errors, "spec.kernel", kernel);
    }
    if let Some(rootfs) = rootfs {
        validate_image_ref(errors, "spec.rootfs", rootfs);
    }
}

/// Checks a kernel or rootfs reference: an absolute host path (dev mode) or
/// the name of an Image.
pub fn validate_image_ref(errors: &mut FieldErrors, field: &str, value: &str) {
    if value.starts_with('/') {
        validate_host_path(errors, field, value);
    } else {
        let mut probe = FieldErrors::default();
        validate_dns_label(&mut probe, field, value);
        if !probe.is_empty() {
            errors.add(
                field,
                value,
                "must name an Image in the same project (such as vmlinux-6-1) or be an absolute host path (such as /var/lib/nexus/images/vmlinux)",
            );
        }
    }
}

/// A locally administered unicast MAC derived from a VM uid: stable across
/// restarts and distinct for distinct uids with overwhelming likelihood.
pub fn mac_from_uid(uid: &str) -> String {
    // FNV-1a over the uid gives 4 well-mixed bytes.
    let b = crate::fnv::fnv1a(uid.bytes()).to_be_bytes();
    // 0x06: locally administered (bit 1) and unicast (bit 0 clear).
    format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", b[4], b[5], b[6], b[7])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            vcpu: Some(1),
            mem_mib: Some(128),
            kernel: Some("/images/vmlinux".into()),
            rootfs: Some("/images/rootfs.ext4".into()),
            ..Default::default()
        }
    }

    #[test]
    fn odd_vcpu_counts_above_one_are_rejected_with_the_field_path() {
        let mut errors = FieldErrors::default();
        VmSpec { vcpu: Some(3), ..spec() }.validate(&mut errors);
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].field, "spec.vcpu");
        assert_eq!(errors.0[0].value, "3");
    }

    #[test]
    fn relative_and_dotdot_paths_are_rejected() {
        let mut errors = FieldErrors::default();
        VmSpec { kernel: Some("Vmlinux".into()), rootfs: Some("/a/../b".into()), ..spec() }.validate(&mut errors);
        let fields: Vec<_> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.kernel", "spec.rootfs"]);
    }

    #[test]
    fn machine_fields_are_required_only_without_a_template() {
        let mut errors = FieldErrors::default();
        VmSpec::default().validate(&mut errors);
        let fields: Vec<_> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.vcpu", "spec.memMib", "spec.kernel", "spec.rootfs"]);
        assert!(errors.0[0].expected.contains("spec.template"), "{}", errors.0[0].expected);
        let mut errors = FieldErrors::default();
        VmSpec { template: Some("ci-runner".into()), kernel: Some("vmlinux-6-1".into()), ..Default::default() }
            .validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn restart_policies_decide_on_the_exit() {
        let clean = VmExit { code: Some(0), signal: None, at: None };
        let killed = VmExit { code: None, signal: Some(9), at: None };
        assert!(RestartPolicy::Always.restarts(Some(&clean)));
        assert!(!RestartPolicy::OnFailure.restarts(Some(&clean)));
        assert!(RestartPolicy::OnFailure.restarts(Some(&killed)));
        assert!(RestartPolicy::OnFailure.restarts(None), "an unknown end counts as a failure");
        assert!(!RestartPolicy::Never.restarts(Some(&killed)));
        assert_eq!(killed.to_string(), "killed by signal 9");
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
