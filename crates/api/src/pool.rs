//! The `VMPool` kind: a number of like VMs kept running, spread across
//! nodes, and rolled to a new VM template step by step behind a health gate.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Condition, Object, ResourceSpec};
use crate::policy::Policy;
use crate::rbac::Role;
use crate::registry::{AGE, Column, Format, NAME};
use crate::validation::{FieldErrors, validate_labels};
use crate::vm::VmSpec;

/// A pool of VMs.
pub type VmPool = Object<VmPoolSpec>;

/// Label every VM of a pool carries: the pool's name.
pub const POOL_LABEL: &str = "nexus.dev/pool";
/// Label every VM of a pool carries: the hash of the VM template it was
/// made from (its revision's `hash`).
pub const REVISION_LABEL: &str = "nexus.dev/pool-revision";
/// Most VMs one pool may ask for.
pub const MAX_REPLICAS: u32 = 1000;
/// Most canary steps one rollout may have.
pub const MAX_STEPS: usize = 10;

/// Desired state of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmPoolSpec {
    /// How many VMs the pool keeps (0 to 1000).
    pub replicas: u32,
    /// Labels that pick the pool's VMs out of the project; every one must
    /// be in `template.metadata.labels`. A VM whose labels are changed by
    /// hand so they no longer match leaves the pool (and is replaced); it
    /// keeps running on its own.
    pub selector: BTreeMap<String, String>,
    /// What each VM is made from. Every change is a new revision, rolled
    /// out by `updateStrategy`.
    pub template: VmTemplate,
    #[serde(default)]
    pub update_strategy: UpdateStrategy,
    /// Stops a rollout where it is (scaling and replacing lost VMs go on)
    /// until set back to false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Old revisions kept in `status.revisions` for `rollout undo` (default 10).
    #[serde(default = "default_history")]
    pub revision_history_limit: u32,
}

fn default_history() -> u32 {
    10
}

/// The VM a pool makes: labels and annotations, and a VM spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmTemplate {
    #[serde(default)]
    pub metadata: TemplateMetadata,
    /// The VM's spec: a `template` (a Template's name) and overrides, or a
    /// complete machine, or `restoreFrom` (a Snapshot's name) for a pool of
    /// warm copies of one VM. `nodeName` is not allowed.
    pub spec: VmSpec,
}

/// Labels and annotations of a pool's VMs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl VmTemplate {
    /// A short, stable hash of the template: equal templates, equal hashes.
    pub fn hash(&self) -> String {
        // serde_json writes struct fields in order and maps sorted (BTreeMap).
        let hash = crate::fnv::fnv1a(serde_json::to_vec(self).unwrap_or_default());
        format!("{:010x}", hash & 0xff_ffff_ffff)
    }
}

/// A count of VMs, or a percentage of `replicas` (`25%`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Amount {
    Count(u32),
    Percent(String),
}

impl Amount {
    /// The number of VMs this is out of `total`, percentages rounded up
    /// when `round_up`, else down. `None` when the text is not `N%`.
    pub fn of(&self, total: u32, round_up: bool) -> Option<u32> {
        match self {
            Amount::Count(n) => Some(*n),
            Amount::Percent(text) => {
                let pct: u32 = text.strip_suffix('%')?.parse().ok().filter(|p| *p <= 100)?;
                let scaled = u64::from(total) * u64::from(pct);
                let n = if round_up { scaled.div_ceil(100) } else { scaled / 100 };
                Some(n as u32)
            }
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => f.write_str(p),
        }
    }
}

/// How a pool moves its VMs to a new revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateStrategy {
    /// How many VMs run the new revision at the end of each step, rising:
    /// counts or percentages of `replicas` (rounded up), such as
    /// `[1, "25%", "100%"]`. The last step is always 100%. Default: one
    /// step of 100%.
    #[serde(default = "default_steps")]
    pub steps: Vec<Amount>,
    /// How many VMs may be unavailable (below `replicas`) while VMs are
    /// replaced (default 25%, rounded down).
    #[serde(default = "quarter")]
    pub max_unavailable: Amount,
    /// How many VMs may exist above `replicas` while VMs are replaced
    /// (default 25%, rounded up).
    #[serde(default = "quarter")]
    pub max_surge: Amount,
    /// Seconds to wait after a step's VMs passed the gate before the next
    /// step starts.
    #[serde(default)]
    pub pause_seconds: u32,
    /// Seconds a VM must stay Ready (its readiness probe passing, when it
    /// has one) to count as available.
    #[serde(default)]
    pub min_ready_seconds: u32,
    /// Seconds a new VM has to become available; one that does not, or
    /// fails, halts the rollout (default 600).
    #[serde(default = "default_deadline")]
    pub progress_deadline_seconds: u32,
    /// On a halt, go back to the previous revision by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_rollback: bool,
}

fn default_steps() -> Vec<Amount> {
    vec![Amount::Percent("100%".into())]
}

fn quarter() -> Amount {
    Amount::Percent("25%".into())
}

fn default_deadline() -> u32 {
    600
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        UpdateStrategy {
            steps: default_steps(),
            max_unavailable: quarter(),
            max_surge: quarter(),
            pause_seconds: 0,
            min_ready_seconds: 0,
            progress_deadline_seconds: default_deadline(),
            auto_rollback: false,
        }
    }
}

impl UpdateStrategy {
    /// VMs of the new revision wanted at the end of step `i` of a pool of
    /// `replicas`; the last step is all of them.
    pub fn step_target(&self, i: usize, replicas: u32) -> u32 {
        if i + 1 >= self.steps.len() {
            return replicas;
        }
        self.steps[i].of(replicas, true).unwrap_or(replicas).clamp(1, replicas.max(1)).min(replicas)
    }

    /// (maxSurge, maxUnavailable) in VMs for `replicas`; never both 0.
    pub fn limits(&self, replicas: u32) -> (u32, u32) {
        let surge = self.max_surge.of(replicas, true).unwrap_or(1);
        let unavailable = self.max_unavailable.of(replicas, false).unwrap_or(0);
        if surge == 0 && unavailable == 0 { (1, 0) } else { (surge, unavailable) }
    }
}

/// Where a pool's rollout is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutPhase {
    /// Replacing VMs for the current step.
    #[default]
    Progressing,
    /// The step's VMs passed the gate; waiting `pauseSeconds` before the next.
    StepPause,
    /// `spec.paused`: nothing moves until it is cleared.
    Paused,
    /// VMs of the new revision failed the gate; nothing moves until the
    /// template changes (`rollout undo`).
    Halted,
    /// Halted and, with `autoRollback`, back on the previous revision.
    RolledBack,
    /// Every VM runs the new revision.
    Complete,
}

/// The rollout of one revision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutStatus {
    /// The revision being rolled out.
    pub revision: u64,
    /// The revision it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_revision: Option<u64>,
    /// Index of the current step in `updateStrategy.steps` (0-based).
    pub step: u32,
    /// How many steps there are.
    pub steps: u32,
    /// VMs of the new revision the current step wants.
    pub step_target: u32,
    pub phase: RolloutPhase,
    /// When the current step (or the pause after it) began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<DateTime<Utc>>,
    /// What is happening, in words.
    #[serde(default)]
    pub message: String,
    /// VMs of the new revision that failed the gate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_vms: Vec<String>,
    /// Why the first of them failed (its Ready condition, or how it ended).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub failure: String,
}

/// One revision of a pool's VM template, kept for history and undo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolRevision {
    /// 1, 2, ...: a template used again gets the next number.
    pub revision: u64,
    /// The template's hash (the `nexus.dev/pool-revision` label of its VMs).
    pub hash: String,
    pub template: VmTemplate,
    pub created_at: DateTime<Utc>,
}

/// Observed state of a pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// VMs the pool owns (being deleted excluded).
    #[serde(default)]
    pub replicas: u32,
    /// VMs that are Ready.
    #[serde(default)]
    pub ready_replicas: u32,
    /// VMs Ready for at least `minReadySeconds`.
    #[serde(default)]
    pub available_replicas: u32,
    /// VMs of the update revision.
    #[serde(default)]
    pub updated_replicas: u32,
    /// The revision every VM ran when the last rollout ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<u64>,
    /// The revision of `spec.template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<u64>,
    /// The label selector, as text (`a=b,c=d`).
    #[serde(default)]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// Newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<PoolRevision>,
    /// `Available` and `Progressing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl VmPoolStatus {
    /// The revision numbered `n`.
    pub fn revision(&self, n: u64) -> Option<&PoolRevision> {
        self.revisions.iter().find(|r| r.revision == n)
    }
}

impl ResourceSpec for VmPoolSpec {
    type Status = VmPoolStatus;
    const KIND: &'static str = "VMPool";
    const PLURAL: &'static str = "vmpools";
    const NAMESPACED: bool = true;
    const POLICY: Policy = Policy::project(Role::Operator).written_by_the_controller();
    const ALIASES: &'static [&'static str] = &["vmpool", "pool", "pools"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("DESIRED", &["spec.replicas"], Format::Text),
        Column::new("CURRENT", &["status.replicas"], Format::Text).or("0"),
        Column::new("READY", &["status.readyReplicas"], Format::Text).or("0"),
        Column::new("UP-TO-DATE", &["status.updatedReplicas"], Format::Text).or("0"),
        Column::new("AVAILABLE", &["status.availableReplicas"], Format::Text).or("0"),
        Column::new("REVISION", &["status.updateRevision"], Format::Text),
        Column::new("ROLLOUT", &["status.rollout.phase"], Format::Text),
        AGE,
        Column::new("MESSAGE", &["status.rollout.message"], Format::Text).wide(),
    ];

    fn drive_images(&self) -> Vec<(String, String)> {
        crate::storage::drive_images("spec.template.spec.drives", &self.template.spec.drives)
    }

    fn host_paths(&self) -> Vec<(&'static str, String)> {
        let spec = &self.template.spec;
        [
            ("spec.template.spec.kernel", &spec.kernel),
            ("spec.template.spec.rootfs", &spec.rootfs),
            ("spec.template.spec.initrd", &spec.initrd),
        ]
        .into_iter()
        .filter_map(|(f, v)| v.as_ref().filter(|v| v.starts_with('/')).map(|v| (f, v.clone())))
        .collect()
    }

    fn validate(&self, errors: &mut FieldErrors) {
        if self.replicas > MAX_REPLICAS {
            errors.add("spec.replicas", self.replicas, "must be from 0 to 1000");
        }
        if self.selector.is_empty() {
            errors.add("spec.selector", "", "must hold at least one label, such as app: ci-runner");
        }
        validate_labels(errors, "spec.selector", &self.selector);
        validate_labels(errors, "spec.template.metadata.labels", &self.template.metadata.labels);
        for (k, v) in &self.selector {
            if self.template.metadata.labels.get(k) != Some(v) {
                errors.add(
                    "spec.selector",
                    format!("{k}={v}"),
                    "must also be in spec.template.metadata.labels, or the pool's VMs would not match it",
                );
            }
        }
        for reserved in [POOL_LABEL, REVISION_LABEL] {
            if self.template.metadata.labels.contains_key(reserved) || self.selector.contains_key(reserved) {
                errors.add("spec.template.metadata.labels", reserved, "is set by the pool; leave it out");
            }
        }
        let vm = &self.template.spec;
        if vm.node_name.is_some() {
            errors.add(
                "spec.template.spec.nodeName",
                vm.node_name.as_deref().unwrap_or_default(),
                "a pool spreads its VMs over nodes; use nodeSelector to limit which",
            );
        }
        if vm.network.as_ref().and_then(|n| n.mac.as_ref()).is_some() {
            errors.add("spec.template.spec.network.mac", "", "each VM needs its own MAC; leave it out");
        }
        if vm.network.as_ref().and_then(|n| n.ip.as_deref()).is_some_and(|ip| ip != "auto") {
            errors.add("spec.template.spec.network.ip", "", "each VM needs its own address: use auto");
        }
        let mut inner = FieldErrors::default();
        vm.validate(&mut inner);
        for e in inner.0 {
            let field = e.field.replacen("spec.", "spec.template.spec.", 1);
            errors.add(&field, &e.value, &e.expected);
        }
        self.update_strategy.validate(errors, self.replicas);
    }
}

impl UpdateStrategy {
    fn validate(&self, errors: &mut FieldErrors, replicas: u32) {
        let field = "spec.updateStrategy";
        let amount_ok = |a: &Amount| a.of(100, true).is_some();
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            errors.add(
                &format!("{field}.steps"),
                self.steps.len(),
                "must hold 1 to 10 steps, such as [1, \"25%\", \"100%\"]",
            );
        }
        let mut last = 0;
        for (i, step) in self.steps.iter().enumerate() {
            let f = format!("{field}.steps[{i}]");
            match step.of(replicas.max(1), true) {
                None => errors.add(&f, step, "must be a count or a percentage (N%, at most 100%)"),
                Some(0) => errors.add(&f, step, "must be at least 1 VM"),
                Some(n) if n < last => errors.add(&f, step, "steps must not go down"),
                Some(n) => last = n,
            }
        }
        if let Some(end) = self.steps.last()
            && amount_ok(end)
            && *end != Amount::Percent("100%".into())
            && end.of(replicas, true) != Some(replicas)
        {
            errors.add(&format!("{field}.steps"), end, "the last step must be 100% (every VM)");
        }
        for (name, a) in [("maxUnavailable", &self.max_unavailable), ("maxSurge", &self.max_surge)] {
            if !amount_ok(a) {
                errors.add(&format!("{field}.{name}"), a, "must be a count or a percentage (N%, at most 100%)");
            }
        }
        if self.max_unavailable.of(100, false) == Some(0) && self.max_surge.of(100, true) == Some(0) {
            errors.add(&format!("{field}.maxSurge"), 0, "maxSurge and maxUnavailable must not both be 0");
        }
        if self.progress_deadline_seconds == 0 {
            errors.add(&format!("{field}.progressDeadlineSeconds"), 0, "must be at least 1");
        }
    }
}

/// The selector as label-selector text (`a=b,c=d`).
pub fn selector_text(selector: &BTreeMap<String, String>) -> String {
    selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> VmPoolSpec {
        let labels: BTreeMap<String, String> = [("app".to_string(), "ci".to_string())].into();
        VmPoolSpec {
            replicas: 20,
            selector: labels.clone(),
            template: VmTemplate {
                metadata: TemplateMetadata { labels, annotations: BTreeMap::new() },
                spec: VmSpec { template: Some("python-3-12".into()), ..Default::default() },
            },
            update_strategy: UpdateStrategy::default(),
            paused: false,
            revision_history_limit: 10,
        }
    }

    fn fields(spec: &VmPoolSpec) -> Vec<String> {
        let mut errors = FieldErrors::default();
        spec.validate(&mut errors);
        errors.0.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_plain_pool_is_valid_and_bad_fields_are_named_under_the_template() {
        assert!(fields(&pool()).is_empty(), "{:?}", fields(&pool()));
        let mut p = pool();
        p.template.spec.vcpu = Some(3);
        p.template.spec.node_name = Some("n1".into());
        p.selector.insert("tier".into(), "x".into());
        assert_eq!(fields(&p), ["spec.selector", "spec.template.spec.nodeName", "spec.template.spec.vcpu"]);
    }

    #[test]
    fn steps_rise_to_100_percent_and_amounts_resolve_against_replicas() {
        let mut p = pool();
        p.update_strategy.steps = vec![Amount::Count(1), Amount::Percent("25%".into()), Amount::Percent("100%".into())];
        assert!(fields(&p).is_empty());
        let s = &p.update_strategy;
        assert_eq!((0..3).map(|i| s.step_target(i, 20)).collect::<Vec<_>>(), [1, 5, 20]);
        assert_eq!(s.limits(20), (5, 5));
        p.update_strategy.steps = vec![Amount::Percent("50%".into()), Amount::Count(2)];
        assert_eq!(fields(&p), ["spec.updateStrategy.steps[1]", "spec.updateStrategy.steps"]);
        p.update_strategy.steps = vec![Amount::Percent("120%".into())];
        assert!(fields(&p).contains(&"spec.updateStrategy.steps[0]".to_string()));
        p.update_strategy = UpdateStrategy {
            max_surge: Amount::Count(0),
            max_unavailable: Amount::Percent("0%".into()),
            ..Default::default()
        };
        assert_eq!(fields(&p), ["spec.updateStrategy.maxSurge"]);
    }

    #[test]
    fn equal_templates_hash_equal_and_any_change_changes_the_hash() {
        let a = pool().template;
        assert_eq!(a.hash(), pool().template.hash());
        assert_eq!(a.hash().len(), 10);
        let mut b = a.clone();
        b.spec.kernel = Some("vmlinux-6-2".into());
        assert_ne!(a.hash(), b.hash());
    }
}
