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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    }
}
