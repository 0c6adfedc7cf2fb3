//! The `Template` kind: a saved VM configuration that VMs are made from.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{Policy, QuotaUse};
use crate::rbac::Role;
use crate::registry::{AGE, Column, Format, NAME};

use crate::meta::{Object, ResourceSpec};
use crate::validation::FieldErrors;
use crate::vm::{VmNetwork, validate_machine};

/// A golden VM configuration.
pub type Template = Object<TemplateSpec>;

/// What a VM made from this template gets unless it overrides it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateSpec {
    /// Number of vCPUs: 1 or an even number up to 32.
    pub vcpu: u8,
    /// Guest memory in MiB (at least 16).
    pub mem_mib: u32,
    /// Kernel: the name of a `Kernel` Image in the template's project, or an
    /// absolute host path (dev mode).
    pub kernel: String,
    /// Root filesystem: the name of a `Rootfs` Image in the template's
    /// project, or an absolute host path (dev mode).
    pub rootfs: String,
    /// Initial ramdisk: the name of an `Initrd` Image, or an absolute host
    /// path (dev mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<VmNetwork>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Extra drives every VM made from the template gets (a VM's drive of
    /// the same name replaces one of these).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<crate::storage::DriveSpec>,
    /// I/O limits of the root drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_rate_limiter: Option<crate::storage::RateLimiter>,
    /// Handed to the guest through its metadata service
    /// (`/latest/user-data`): a cloud-init file or a script, at most 16 KiB;
    /// Not for secrets: anyone who may read the
    /// VM may read it (docs/guests.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// OpenSSH public keys the guest installs (`/latest/meta-data/public-keys`),
    /// after the template's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// The user's own JSON, served to the guest at `/nexus/metadata`
    /// (at most 16 KiB). Changed on
    /// a running VM without a restart.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl TemplateSpec {
    /// The template's guest-facing fields.
    pub fn guest(&self) -> crate::guest::GuestConfig {
        crate::guest::GuestConfig {
            user_data: self.user_data.clone(),
            ssh_authorized_keys: self.ssh_authorized_keys.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// Observed state of a template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl ResourceSpec for TemplateSpec {
    type Status = TemplateStatus;
    const KIND: &'static str = "Template";
    const PLURAL: &'static str = "templates";
    const NAMESPACED: bool = true;
    const POLICY: Policy = Policy::project(Role::Admin).quota(QuotaUse::Input);
    const ALIASES: &'static [&'static str] = &["template", "tpl"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("VCPU", &["spec.vcpu"], Format::Text),
        Column::new("MEMORY", &["spec.memMib"], Format::Mebibytes),
        Column::new("KERNEL", &["spec.kernel"], Format::Text),
        Column::new("ROOTFS", &["spec.rootfs"], Format::Text),
        AGE,
    ];

    fn drive_images(&self) -> Vec<(String, String)> {
        crate::storage::drive_images("spec.drives", &self.drives)
    }

    fn host_paths(&self) -> Vec<(&'static str, String)> {
        [
            ("spec.kernel", Some(&self.kernel)),
            ("spec.rootfs", Some(&self.rootfs)),
            ("spec.initrd", self.initrd.as_ref()),
        ]
        .into_iter()
        .filter_map(|(f, v)| v.filter(|v| v.starts_with('/')).map(|v| (f, v.clone())))
        .collect()
    }

    fn validate(&self, errors: &mut FieldErrors) {
        validate_machine(errors, Some(self.vcpu), Some(self.mem_mib), Some(&self.kernel), Some(&self.rootfs));
        if let Some(initrd) = &self.initrd {
            crate::vm::validate_image_ref(errors, "spec.initrd", initrd);
        }
        if let Some(ip) = self.network.as_ref().and_then(|n| n.ip.as_ref()) {
            crate::vm::validate_ip_request(errors, "spec.network.ip", ip);
        }
        if let Some(args) = &self.boot_args {
            crate::validation::validate_boot_args(errors, "spec.bootArgs", args);
        }
        crate::validation::validate_labels(errors, "spec.nodeSelector", &self.node_selector);
        if let Some(limits) = self.network.as_ref().and_then(|n| n.rate_limiter.as_ref()) {
            limits.validate(errors, "spec.network.rateLimiter");
        }
        crate::storage::validate_drives(errors, "spec.drives", &self.drives);
        if let Some(l) = &self.rootfs_rate_limiter {
            l.validate(errors, "spec.rootfsRateLimiter");
        }
        crate::guest::validate(errors, "spec", &self.guest());
    }
}

/// A VM made from a template, as its status shows it: the template's
/// revision and each field the VM sets differently.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateView {
    pub name: String,
    /// The template's `metadata.generation` the VM was resolved from.
    pub revision: i64,
    /// The fields the VM sets, with the template's value and its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<FieldOverride>,
}

/// One field a VM overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FieldOverride {
    /// The field, as a path (`spec.memMib`, `spec.drives[cache]`,
    /// `spec.nodeSelector.zone`).
    pub field: String,
    /// The template's value (absent: the template does not set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<serde_json::Value>,
    /// The VM's value.
    pub vm: serde_json::Value,
}

/// The fields of the machine a VM may take from its template.
const MACHINE_FIELDS: &[&str] =
    &["vcpu", "memMib", "kernel", "rootfs", "initrd", "bootArgs", "network", "rootfsRateLimiter", "userData"];

/// What `vm` sets differently from `template`: each machine field it gives
/// another value, each node selector key and each drive (by name).
pub fn overrides(template: &TemplateSpec, vm: &crate::VmSpec) -> Vec<FieldOverride> {
    let (t, v) = (serde_json::to_value(template).unwrap_or_default(), serde_json::to_value(vm).unwrap_or_default());
    let mut out = Vec::new();
    let mut differ = |field: String, tv: Option<&serde_json::Value>, vv: &serde_json::Value| {
        if tv != Some(vv) {
            out.push(FieldOverride { field, template: tv.cloned(), vm: vv.clone() });
        }
    };
    for key in MACHINE_FIELDS {
        if let Some(vv) = v.get(key) {
            differ(format!("spec.{key}"), t.get(key), vv);
        }
    }
    for (key, value) in &vm.node_selector {
        let tv = template.node_selector.get(key).map(|s| serde_json::Value::String(s.clone()));
        differ(format!("spec.nodeSelector.{key}"), tv.as_ref(), &serde_json::Value::String(value.clone()));
    }
    for key in vm.ssh_authorized_keys.iter().filter(|k| !template.ssh_authorized_keys.contains(k)) {
        differ("spec.sshAuthorizedKeys[+]".to_string(), None, &serde_json::Value::String(key.clone()));
    }
    for (key, value) in &vm.metadata {
        differ(format!("spec.metadata.{key}"), template.metadata.get(key), value);
    }
    for drive in &vm.drives {
        let tv = template.drives.iter().find(|d| d.name == drive.name).and_then(|d| serde_json::to_value(d).ok());
        differ(format!("spec.drives[{}]", drive.name), tv.as_ref(), &serde_json::to_value(drive).unwrap_or_default());
    }
    out
}
