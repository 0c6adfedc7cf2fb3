//! The `ResourceQuota` kind: limits on what one project may hold (VMs,
//! vCPUs, memory, snapshots, snapshot bytes), and the pure arithmetic of
//! usage the apiserver enforces atomically and the controller reports.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Object, ResourceSpec};
use crate::policy::{Policy, Writers};
use crate::rbac::Role;
use crate::registry::{AGE, Column, Format, NAME};
use crate::validation::FieldErrors;
use crate::{Image, Snapshot, Template, Vm, Volume};

/// Limits on a project.
pub type ResourceQuota = Object<ResourceQuotaSpec>;

/// What one project may hold; an absent limit does not limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceQuotaSpec {
    /// Most VM objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u64>,
    /// Most vCPUs, summed over the VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u64>,
    /// Most guest memory in MiB, summed over the VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    /// Most Snapshot objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<u64>,
    /// Most bytes of snapshots, summed over those taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_bytes: Option<u64>,
    /// Most Volume objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u64>,
    /// Most MiB of volumes, summed over their sizes (an Image's copy counts
    /// the Image's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mib: Option<u64>,
}

/// What a project holds, in the quota's units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub vms: u64,
    pub vcpu: u64,
    pub mem_mib: u64,
    pub snapshots: u64,
    pub snapshot_bytes: u64,
    #[serde(default)]
    pub volumes: u64,
    #[serde(default)]
    pub volume_mib: u64,
}

/// Observed state of a quota.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceQuotaStatus {
    /// What the project holds now.
    #[serde(default)]
    pub used: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl ResourceSpec for ResourceQuotaSpec {
    type Status = ResourceQuotaStatus;
    const KIND: &'static str = "ResourceQuota";
    const PLURAL: &'static str = "resourcequotas";
    const NAMESPACED: bool = true;
    const POLICY: Policy = Policy::project(Role::Admin).written_by(Writers::ClusterAdmins);
    const ALIASES: &'static [&'static str] = &["resourcequota", "quota", "quotas"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("VMS", &["status.used.vms"], Format::Text).or("0"),
        Column::new("MAX-VMS", &["spec.vms"], Format::Text).or("-"),
        Column::new("VCPU", &["status.used.vcpu"], Format::Text).or("0"),
        Column::new("MAX-VCPU", &["spec.vcpu"], Format::Text).or("-"),
        Column::new("MEMORY", &["status.used.memMib"], Format::Mebibytes).or("0Mi"),
        Column::new("MAX-MEMORY", &["spec.memMib"], Format::Mebibytes).or("-"),
        Column::new("SNAPSHOTS", &["status.used.snapshots"], Format::Text).or("0").wide(),
        Column::new("SNAPSHOT-BYTES", &["status.used.snapshotBytes"], Format::Text).or("0").wide(),
        AGE,
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        if *self == ResourceQuotaSpec::default() {
            errors.add(
                "spec",
                "{}",
                "set at least one limit: vms, vcpu, memMib, snapshots, snapshotBytes, volumes or volumeMib",
            );
        }
    }
}

/// vCPUs and MiB a VM asks for: its own fields, else its template's, else
/// (restored from a snapshot) the snapshot's machine; 0 when none says (the
/// controller refuses such a VM anyway).
pub fn vm_resources(
    vm: &Vm,
    templates: &BTreeMap<String, &Template>,
    snapshots: &BTreeMap<String, &Snapshot>,
) -> (u64, u64) {
    let t = vm.spec.template.as_ref().and_then(|n| templates.get(n));
    let restored = vm
        .spec
        .restore_from
        .as_ref()
        .and_then(|r| snapshots.get(&r.snapshot))
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.config.as_ref());
    let vcpu = vm.spec.vcpu.or(t.map(|t| t.spec.vcpu)).or(restored.map(|c| c.vcpu)).unwrap_or(0);
    let mem = vm.spec.mem_mib.or(t.map(|t| t.spec.mem_mib)).or(restored.map(|c| c.mem_mib)).unwrap_or(0);
    (u64::from(vcpu), u64::from(mem))
}

/// The objects of one project quotas count, and those they read to size
/// them (the Templates VMs take their machine from, the Images volumes
/// copy).
#[derive(Debug, Clone, Copy, Default)]
pub struct Holdings<'a> {
    pub vms: &'a [&'a Vm],
    pub templates: &'a [&'a Template],
    pub snapshots: &'a [&'a Snapshot],
    pub volumes: &'a [&'a Volume],
    pub images: &'a [&'a Image],
}

/// What the objects of one project hold.
pub fn usage(h: &Holdings<'_>) -> Usage {
    let Holdings { vms, templates, snapshots, volumes, images } = *h;
    let by_name: BTreeMap<String, &Template> = templates.iter().map(|t| (t.name().to_string(), *t)).collect();
    let snaps: BTreeMap<String, &Snapshot> = snapshots.iter().map(|s| (s.name().to_string(), *s)).collect();
    let mut u = Usage::default();
    for v in volumes {
        let image_bytes =
            v.spec.image.as_ref().and_then(|i| images.iter().find(|x| x.name() == i)).and_then(|i| i.spec.size_bytes);
        u.volumes += 1;
        u.volume_mib += v.spec.charged_mib(image_bytes);
    }
    for vm in vms {
        let (vcpu, mem) = vm_resources(vm, &by_name, &snaps);
        u.vms += 1;
        u.vcpu += vcpu;
        u.mem_mib += mem;
    }
    for s in snapshots {
        u.snapshots += 1;
        u.snapshot_bytes += s.status.as_ref().and_then(|st| st.size_bytes).unwrap_or(0);
    }
    u
}

/// Whether going from `before` to `after` stays within `quota` (named
/// `name`). A dimension that does not grow is never refused, even when the
/// project is already over (a quota lowered below its use).
pub fn admit(name: &str, quota: &ResourceQuotaSpec, before: &Usage, after: &Usage) -> Result<(), String> {
    let dims = [
        ("VMs", quota.vms, before.vms, after.vms, ""),
        ("vCPUs", quota.vcpu, before.vcpu, after.vcpu, ""),
        ("memory", quota.mem_mib, before.mem_mib, after.mem_mib, " MiB"),
        ("snapshots", quota.snapshots, before.snapshots, after.snapshots, ""),
        ("snapshot bytes", quota.snapshot_bytes, before.snapshot_bytes, after.snapshot_bytes, ""),
        ("volumes", quota.volumes, before.volumes, after.volumes, ""),
        ("volume storage", quota.volume_mib, before.volume_mib, after.volume_mib, " MiB"),
    ];
    for (what, limit, was, will, unit) in dims {
        if let Some(limit) = limit
            && will > was
            && will > limit
        {
            return Err(format!(
                "quota {name}: {what} {was}{unit} of {limit}{unit} used; this request needs {}{unit} more",
                will - was
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TemplateSpec, VmSpec};

    fn vm(name: &str, vcpu: Option<u8>, mem: Option<u32>, template: Option<&str>) -> Vm {
        Vm::new(
            name,
            Some("p"),
            VmSpec { vcpu, mem_mib: mem, template: template.map(str::to_string), ..Default::default() },
        )
    }

    #[test]
    fn usage_counts_vms_with_their_templates_and_snapshots_with_their_bytes() {
        let t = Template::new(
            "big",
            Some("p"),
            TemplateSpec {
                initrd: None,
                vcpu: 4,
                mem_mib: 4096,
                kernel: "k".into(),
                rootfs: "r".into(),
                boot_args: None,
                network: None,
                node_selector: Default::default(),
                ..Default::default()
            },
        );
        let a = vm("a", Some(1), Some(128), None);
        let b = vm("b", None, Some(512), Some("big"));
        let mut s = Snapshot::new("s", Some("p"), crate::SnapshotSpec { vm_name: "a".into(), resume_after: true });
        s.status = Some(crate::snapshot::SnapshotStatus { size_bytes: Some(1000), ..Default::default() });
        let vol = Volume::new("data", Some("p"), crate::VolumeSpec { size_mib: Some(64), ..Default::default() });
        let img = Image::new(
            "debian",
            Some("p"),
            crate::ImageSpec {
                size_bytes: Some(3 << 20 | 1),
                ..serde_json::from_value(serde_json::json!({"type": "Rootfs", "path": "/i"})).unwrap()
            },
        );
        let copy =
            Volume::new("copy", Some("p"), crate::VolumeSpec { image: Some("debian".into()), ..Default::default() });
        let h =
            Holdings { vms: &[&a, &b], templates: &[&t], snapshots: &[&s], volumes: &[&vol, &copy], images: &[&img] };
        let u = usage(&h);
        assert_eq!(
            u,
            Usage { vms: 2, vcpu: 5, mem_mib: 640, snapshots: 1, snapshot_bytes: 1000, volumes: 2, volume_mib: 68 },
            "the copy of a 3 MiB + 1 byte image counts 4 MiB"
        );
    }

    #[test]
    fn only_growth_past_a_limit_is_refused_and_the_message_says_by_how_much() {
        let q = ResourceQuotaSpec { vms: Some(10), mem_mib: Some(1024), ..Default::default() };
        let full = Usage { vms: 10, mem_mib: 512, ..Default::default() };
        let one_more = Usage { vms: 11, mem_mib: 640, ..Default::default() };
        assert_eq!(
            admit("team", &q, &full, &one_more).unwrap_err(),
            "quota team: VMs 10 of 10 used; this request needs 1 more"
        );
        let over = Usage { vms: 12, ..Default::default() };
        assert!(admit("team", &q, &over, &Usage { vms: 11, ..Default::default() }).is_ok(), "shrinking is fine");
        let grow_mem = Usage { vms: 10, mem_mib: 2048, ..Default::default() };
        assert!(
            admit("team", &q, &full, &grow_mem)
                .unwrap_err()
                .contains("memory 512 MiB of 1024 MiB used; this request needs 1536 MiB more")
        );
    }
}
