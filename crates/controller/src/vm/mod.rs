//! The VM controller: resolves a VM's template and images into a complete
//! configuration, schedules it, converges it through its node's agent to
//! `spec.state` (and its `restartPolicy` when the VMM ends on its own),
//! writes what it observed to status, and tears it down behind a finalizer
//! when the VM is deleted. It reads stores; it writes to the apiserver.

pub mod resolve;
pub mod scheduler;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use nexus_api::event::EventType;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::node::VmmExitNotice;
use nexus_api::vm::ResolvedConfig;
use nexus_api::{
    ConditionStatus, ImageSpec, Node, NodeSpec, SnapshotSpec, TemplateSpec, Vm, VmPhase, VmSpec, VmStatus,
};
use nexus_client::agent::AgentCallError;
use nexus_client::{Client, ClientError};

use crate::Context;
use crate::runtime::events::Recorder;
use crate::runtime::finalizer::{self, Step};
use crate::runtime::store::BY_PROJECT;
use crate::runtime::{Action, Controller, ObjectKey, Reconciler, Store};
use scheduler::{Assumed, Request, pick_node};

/// Finalizer that holds a VM until its node has torn it down.
pub const FINALIZER: &str = "nexus.dev/vm-teardown";

/// Annotation marking a `spec.nodeName` the scheduler chose (as opposed to
/// one the user pinned): such a VM is placed again if its node is deleted.
pub const PLACED_BY: &str = "nexus.dev/placed-by";

/// How often a running VM whose readiness probe has not passed is checked.
pub const PROBE_RECHECK: Duration = Duration::from_millis(500);

/// Index of the VM store: the node a VM is bound to (`""` when unbound).
pub const BY_NODE: &str = "node";

/// Failures that send the key back to the backoff queue.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("apiserver call failed")]
    Api(#[from] ClientError),
    #[error(transparent)]
    Agent(AgentCallError),
    #[error("node {0} has no agent address yet")]
    NodeWithoutAddress(String),
    #[error("the VMM ended while the agent reported on it; asking again")]
    VmmGone(u32),
}

/// The stores the VM controller reads.
#[derive(Debug, Clone)]
pub struct Stores {
    pub vms: Store<VmSpec>,
    pub nodes: Store<NodeSpec>,
    pub templates: Store<TemplateSpec>,
    pub images: Store<ImageSpec>,
    pub snapshots: Store<SnapshotSpec>,
}

impl Stores {
    /// Empty stores, filled by tests with `record_write`.
    #[cfg(test)]
    pub fn empty() -> Self {
        use crate::runtime::store::store;
        Stores { vms: store().1, nodes: store().1, templates: store().1, images: store().1, snapshots: store().1 }
    }

    /// The stores from `ctx`'s reflectors, the VM store indexed by node.
    pub fn from(ctx: &Context) -> Self {
        let vms = ctx.reflectors.store::<VmSpec>();
        vms.add_index(BY_NODE, |vm| vec![vm.spec.node_name.clone().unwrap_or_default()]);
        Stores {
            vms,
            nodes: ctx.reflectors.store::<NodeSpec>(),
            templates: ctx.reflectors.store::<TemplateSpec>(),
            images: ctx.reflectors.store::<ImageSpec>(),
            snapshots: ctx.reflectors.store::<SnapshotSpec>(),
        }
    }
}

/// Settings and clients of the reconciler.
#[derive(Debug)]
pub struct VmReconciler {
    pub api: Client,
    pub agents: std::sync::Arc<crate::agents::Agents>,
    /// Heartbeats older than this make a node not Ready.
    pub node_grace: chrono::Duration,
    /// How often a converged VM is checked again.
    pub recheck: Duration,
    pub events: Recorder,
    pub stores: Stores,
    /// Held while placing a VM: one placement at a time, each seeing the
    /// ones before it, even those the store does not show yet.
    pub scheduling: tokio::sync::Mutex<Assumed>,
    /// Bounds the agent calls in flight to each node.
    pub per_node: PerNode,
    /// VMs whose agent report is fresh.
    pub verified: Verified,
}

/// The VM controller, built from `ctx`.
pub fn controller(ctx: &Context) -> Controller<VmReconciler> {
    let stores = Stores::from(ctx);
    let reconciler = VmReconciler {
        api: ctx.api.clone(),
        agents: ctx.agents.clone(),
        node_grace: ctx.settings.node_grace,
        recheck: ctx.settings.recheck,
        events: ctx.events.clone(),
        stores: stores.clone(),
        scheduling: Default::default(),
        per_node: PerNode::new(ctx.settings.per_node_concurrency),
        verified: Verified::default(),
    };
    let (vms, vms_t, vms_i, vms_s) = (stores.vms.clone(), stores.vms.clone(), stores.vms.clone(), stores.vms.clone());
    let node_map = node_mapper(vms, stores.nodes.clone(), ctx.settings.node_grace, reconciler.verified.clone());
    Controller::new("vm", stores.vms.clone(), reconciler)
        .watches(stores.nodes.clone(), node_map)
        .watches(stores.templates.clone(), move |t| unresolved_in(&vms_t, t.metadata.project.as_deref()))
        .watches(stores.snapshots.clone(), move |s| unresolved_in(&vms_s, s.metadata.project.as_deref()))
        .watches(stores.images.clone(), move |i| {
            let mut keys = unresolved_in(&vms_i, i.metadata.project.as_deref());
            keys.extend(refused_for_images_in(&vms_i, i.metadata.project.as_deref()));
            keys
        })
        .workers(ctx.settings.workers)
        .resync(ctx.settings.resync)
}

/// Maps node changes to the VMs that care. Heartbeats arrive every few
/// seconds; only a node's first sighting, a readiness change or its
/// deletion needs its VMs (and the unplaced ones) looked at, and a VMM that
/// ended unasked needs its VM looked at now.
fn node_mapper(
    vms: Store<VmSpec>,
    nodes: Store<NodeSpec>,
    grace: chrono::Duration,
    verified: Verified,
) -> impl Fn(&Node) -> Vec<ObjectKey> + Send + Sync {
    let seen: Mutex<HashMap<String, bool>> = Default::default();
    let exits = Mutex::new(ExitsSeen::default());
    let nodes_ready: Mutex<HashMap<String, bool>> = Default::default();
    move |node: &Node| {
        let mut keys = Vec::new();
        let status = node.status_or_default();
        let fresh = exits.lock().unwrap_or_else(|p| p.into_inner()).fresh(&status.vmm_exits);
        if !fresh.is_empty() {
            for uid in &fresh {
                verified.forget(uid);
            }
            keys.extend(
                vms.by_index(BY_NODE, node.name())
                    .iter()
                    .filter(|vm| fresh.contains(vm.uid()))
                    .map(|v| ObjectKey::of(&**v)),
            );
        }
        // The feed carries a deleted node's last state: the store says it is gone.
        let gone = nodes.get_named("", node.name()).is_none();
        let ready = !gone && status.is_ready(Utc::now(), grace);
        {
            let mut all = nodes_ready.lock().unwrap_or_else(|p| p.into_inner());
            all.insert(node.name().to_string(), ready);
            if gone {
                all.remove(node.name());
            }
            metrics::gauge!("nexus_controller_ready_nodes").set(all.values().filter(|r| **r).count() as f64);
        }
        let changed = {
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            let before = if gone { seen.remove(node.name()) } else { seen.insert(node.name().to_string(), ready) };
            gone || before != Some(ready)
        };
        if changed {
            keys.extend(vms.by_index(BY_NODE, node.name()).iter().map(|v| ObjectKey::of(&**v)));
            keys.extend(vms.by_index(BY_NODE, "").iter().map(|v| ObjectKey::of(&**v)));
        }
        keys
    }
}

/// The VMs of `project` whose configuration is not resolved yet.
fn unresolved_in(vms: &Store<VmSpec>, project: Option<&str>) -> Vec<ObjectKey> {
    vms.by_index(BY_PROJECT, project.unwrap_or_default())
        .iter()
        .filter(|vm| {
            !vm.status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, "Resolved"))
                .is_some_and(|c| c.status == ConditionStatus::True)
        })
        .map(|v| ObjectKey::of(&**v))
        .collect()
}

/// The VMs of `project` a node refused for an invalid image.
fn refused_for_images_in(vms: &Store<VmSpec>, project: Option<&str>) -> Vec<ObjectKey> {
    vms.by_index(BY_PROJECT, project.unwrap_or_default())
        .iter()
        .filter(|vm| {
            vm.status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, "Ready"))
                .is_some_and(|c| c.reason == IMAGE_INVALID)
        })
        .map(|v| ObjectKey::of(&**v))
        .collect()
}

/// The VMM exit notices already acted on, by VM uid.
#[derive(Debug, Default)]
struct ExitsSeen {
    last: HashMap<String, chrono::DateTime<Utc>>,
}

impl ExitsSeen {
    /// The uids among `notices` not acted on yet; remembers them.
    fn fresh(&mut self, notices: &[VmmExitNotice]) -> HashSet<String> {
        let mut fresh = HashSet::new();
        for n in notices {
            if self.last.get(&n.uid).is_none_or(|at| *at < n.at) {
                self.last.insert(n.uid.clone(), n.at);
                fresh.insert(n.uid.clone());
            }
        }
        // Agents keep a notice for a minute; keep ours a little longer.
        let cutoff = Utc::now() - chrono::Duration::minutes(5);
        self.last.retain(|_, at| *at > cutoff);
        fresh
    }
}

/// What the agent last reported of each VM, by uid: the VM's generation,
/// the status written from the report, and when. A reconcile of a VM whose
/// spec and status are still exactly these, within the recheck period, has
/// nothing to ask its agent (it was woken by the controller's own write);
/// a VMM exit notice forgets the VM's entry, so it is asked at once.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    seen: Arc<Mutex<HashMap<String, Report>>>,
}

/// A VM's generation and the status written from its agent's report, and when.
type Report = (Option<i64>, VmStatus, std::time::Instant);

impl Verified {
    fn record(&self, vm: &Vm, status: &VmStatus) {
        let entry = (vm.metadata.generation, status.clone(), std::time::Instant::now());
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(vm.uid().to_string(), entry);
    }

    fn forget(&self, uid: &str) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }

    /// How long `vm` stays verified, when it is unchanged since its report.
    fn remaining(&self, vm: &Vm, period: Duration) -> Option<Duration> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (generation, status, at) = seen.get(vm.uid())?;
        let unchanged = *generation == vm.metadata.generation && vm.status.as_ref() == Some(status);
        period.checked_sub(at.elapsed()).filter(|left| unchanged && !left.is_zero())
    }
}

/// A semaphore per node: at most `limit` agent calls to one node at once,
/// however many workers the controller runs.
#[derive(Debug, Clone)]
pub struct PerNode {
    limit: usize,
    nodes: Arc<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

impl PerNode {
    pub fn new(limit: usize) -> Self {
        PerNode { limit: limit.max(1), nodes: Default::default() }
    }

    /// Waits for a slot on `node`; the slot is held until the permit drops.
    pub async fn slot(&self, node: &str) -> tokio::sync::OwnedSemaphorePermit {
        let sem = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.entry(node.to_string()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.limit))).clone()
        };
        sem.acquire_owned().await.expect("the semaphore is never closed")
    }
}

impl Reconciler for VmReconciler {
    type Spec = VmSpec;
    type Error = ReconcileError;

    async fn reconcile(&self, cached: Arc<Vm>) -> Result<Action, ReconcileError> {
        let expires = cached.status.as_ref().and_then(|s| s.expires_at);
        if let Some(at) = expires
            && cached.metadata.deletion_timestamp.is_none()
        {
            let left = at - Utc::now();
            if left <= chrono::Duration::zero() {
                return self.expire(&cached).await;
            }
            // Back at the deadline at the latest, whatever the VM is doing.
            let by_then = left.to_std().unwrap_or_default();
            return Ok(match self.reconcile_now(cached).await? {
                Action::RequeueAfter(d) => Action::RequeueAfter(d.min(by_then)),
                Action::AwaitChange => Action::RequeueAfter(by_then),
            });
        }
        self.reconcile_now(cached).await
    }

    fn error_policy(&self, _vm: &Vm, error: &ReconcileError, failures: u32) -> Duration {
        Self::backoff(error, failures)
    }
}

impl VmReconciler {
    /// Deletes a VM whose `status.expiresAt` has passed, with an `Expired`
    /// Event; its finalizer then takes it off its node.
    async fn expire(&self, vm: &Vm) -> Result<Action, ReconcileError> {
        let status = vm.status_or_default();
        let why = match (&vm.spec.lifetime, vm.spec.ttl_seconds_after_finished) {
            (_, Some(ttl)) if matches!(status.phase, VmPhase::Succeeded | VmPhase::Failed) => {
                format!("finished {ttl}s ago (spec.ttlSecondsAfterFinished); deleting it")
            }
            (Some(life), _) => format!("its lifetime of {life} ran out (spec.lifetime); deleting it"),
            _ => "it reached status.expiresAt; deleting it".to_string(),
        };
        self.events.publish(vm, EventType::Normal, "Expired", &why).await;
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        match self.api.delete::<VmSpec>(project, vm.name()).await {
            Ok(_) => Ok(Action::AwaitChange),
            Err(e) if e.is_not_found() => Ok(Action::AwaitChange),
            Err(e) => Err(e.into()),
        }
    }

    /// One pass towards the VM's spec.
    async fn reconcile_now(&self, cached: Arc<Vm>) -> Result<Action, ReconcileError> {
        let mut vm: Vm = (*cached).clone();
        match finalizer::step(&vm, FINALIZER) {
            Step::Cleanup => {
                self.verified.forget(vm.uid());
                return self.tear_down(vm).await;
            }
            Step::Done => return Ok(Action::AwaitChange),
            // An unplaced VM gets its finalizer with its node, in one write.
            Step::Add if vm.spec.node_name.is_none() => {}
            Step::Add => {
                vm = self.api.replace(&finalizer::with(&vm, FINALIZER)).await?;
                self.stores.vms.record_write(vm.clone());
            }
            Step::Apply => {}
        }
        let Some(config) = self.resolve(&mut vm).await? else {
            return Ok(Action::RequeueAfter(Duration::from_secs(5)));
        };
        if vm.spec.node_name.is_none() {
            match self.schedule(vm, &config).await? {
                Placement::Bound(bound) => vm = *bound,
                Placement::Not(action) => return Ok(action),
            }
        }
        self.converge(vm, config).await
    }
}

/// What scheduling a VM came to.
enum Placement {
    /// Bound to a node (and holding its finalizer), with its status in
    /// memory saying so: it goes on to its node in the same reconcile.
    Bound(Box<Vm>),
    /// Not placed now.
    Not(Action),
}

/// The reason a node gives for an image whose checksum is not its Image's.
pub const IMAGE_INVALID: &str = "ImageInvalid";

impl VmReconciler {
    /// Drives a VM bound to a node towards its spec through the node's
    /// agent, and writes what the agent reports.
    async fn converge(&self, mut vm: Vm, config: ResolvedConfig) -> Result<Action, ReconcileError> {
        let node_name = vm.spec.node_name.clone().unwrap_or_default();
        let Some(node) = self.stores.nodes.get_named("", &node_name) else {
            return self.node_gone(vm, &node_name).await;
        };
        let node_status = node.status_or_default();
        if !node_status.is_ready(Utc::now(), self.node_grace) {
            self.write_waiting(&vm, "NodeNotReady", &format!("node {node_name} is not Ready")).await?;
            return Ok(Action::RequeueAfter(Duration::from_secs(2)));
        }
        let current = vm.status_or_default();
        if matches!(current.phase, VmPhase::Failed | VmPhase::Succeeded)
            && current.observed_generation == vm.metadata.generation
            && !self.images_changed_since_refusal(&vm, &config)
        {
            // Finished, or failed for good: wait for the spec to change, no hot loop.
            return Ok(Action::AwaitChange);
        }
        let config = if self.images_changed_since_refusal(&vm, &config) {
            // Its Image was fixed since the node refused it: resolve again.
            let mut status = vm.status_or_default();
            status.config = None;
            vm.status = Some(status);
            match self.resolve(&mut vm).await? {
                Some(c) => c,
                None => return Ok(Action::RequeueAfter(Duration::from_secs(5))),
            }
        } else {
            config
        };
        // A guest whose probe has not passed is looked at every half second.
        if let Some(left) = self.verified.remaining(&vm, self.recheck_period(&vm, vm.status.as_ref())) {
            // Woken by our own write of the agent's fresh report.
            return Ok(Action::RequeueAfter(left));
        }
        let desired = status::ensure_request(&vm, &config);
        let _slot = self.per_node.slot(&node_name).await;
        let answer = self
            .agents
            .call(&node, |c, to| {
                let d = desired.clone();
                async move { c.ensure(&to, &d).await }
            })
            .await;
        match answer {
            Ok(report) if !status::converging(&vm, &report) => {
                // The VMM ended between the agent's work and its report: not
                // a stop. Ask again (the agent applies the restart policy).
                Err(ReconcileError::VmmGone(report.pid.unwrap_or_default()))
            }
            Ok(report) => {
                let after = status::with_expiry(&vm, status::observed(&vm, &node_name, &report), Utc::now());
                let event = status::transition_event(&vm, &current, &after, &node_name, &report);
                self.write_status(&vm, after.clone()).await?;
                self.verified.record(&vm, &after);
                if let Some((type_, reason, message)) = event {
                    self.events.publish(&vm, type_, reason, &message).await;
                }
                Ok(Action::RequeueAfter(self.recheck_period(&vm, Some(&after))))
            }
            Err(AgentCallError::Rejected(body)) => {
                tracing::warn!(vm = %vm.name(), error = %body, "VM failed permanently");
                let reason = if body.error == IMAGE_INVALID { IMAGE_INVALID } else { "Failed" };
                self.events.publish(&vm, EventType::Warning, reason, &status::refusal_message(&body)).await;
                self.write_status(&vm, status::with_expiry(&vm, status::refused(&vm, &node_name, &body), Utc::now()))
                    .await?;
                if body.error == IMAGE_INVALID {
                    self.mark_image_invalid(&vm, &config, &node_name, &body.message).await?;
                }
                Ok(Action::AwaitChange)
            }
            Err(e) => {
                // Whatever the agent's trouble, the placement is worth showing.
                self.write_status(&vm, current).await?;
                Err(ReconcileError::Agent(e))
            }
        }
    }

    /// How long a VM with `status` stays unchecked: the recheck period, or
    /// half a second while its readiness probe has not passed.
    fn recheck_period(&self, vm: &Vm, status: Option<&VmStatus>) -> Duration {
        if status::probing(vm, status) { self.recheck.min(PROBE_RECHECK) } else { self.recheck }
    }

    /// Whether `vm` was refused for an invalid image and one of its Images
    /// changed since (so it may work now).
    fn images_changed_since_refusal(&self, vm: &Vm, config: &ResolvedConfig) -> bool {
        let status = vm.status_or_default();
        let refused = find_condition(&status.conditions, "Ready").is_some_and(|c| c.reason == IMAGE_INVALID);
        if !refused || status.phase != VmPhase::Failed {
            return false;
        }
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let now = |named: &Option<String>| {
            named.as_deref().and_then(|n| n.split_once('@')).map(|(name, _)| {
                self.stores
                    .images
                    .get_named(project, name)
                    .map(|i| format!("{}@{}", i.name(), i.metadata.generation.unwrap_or_default()))
            })
        };
        now(&config.kernel_image).is_some_and(|n| n.as_ref() != config.kernel_image.as_ref())
            || now(&config.rootfs_image).is_some_and(|n| n.as_ref() != config.rootfs_image.as_ref())
    }

    /// Records on the Image a node found different from what it says.
    async fn mark_image_invalid(
        &self,
        vm: &Vm,
        config: &ResolvedConfig,
        node: &str,
        message: &str,
    ) -> Result<(), ReconcileError> {
        let named = if message.starts_with("kernel") { &config.kernel_image } else { &config.rootfs_image };
        let Some((name, _)) = named.as_deref().and_then(|n| n.split_once('@')) else { return Ok(()) };
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let Some(image) = self.stores.images.get_named(project, name) else { return Ok(()) };
        let mut next = (*image).clone();
        let mut status = next.status_or_default();
        status.phase = nexus_api::image::ImagePhase::Invalid;
        status.observed_generation = image.metadata.generation;
        status.message = Some(format!("on node {node}: {message}"));
        if next.status.as_ref() == Some(&status) {
            return Ok(());
        }
        next.status = Some(status);
        match self.api.replace_status(&next).await {
            Ok(written) => {
                self.stores.images.record_write(written);
                self.events
                    .publish(&*image, EventType::Warning, IMAGE_INVALID, &format!("on node {node}: {message}"))
                    .await;
                Ok(())
            }
            // Changed meanwhile (perhaps fixed): its change brings the VM back.
            Err(e) if e.is_conflict() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn backoff(error: &ReconcileError, failures: u32) -> Duration {
        match error {
            // The agent restarts it on the next call: come back at once.
            ReconcileError::VmmGone(_) if failures < 5 => Duration::from_millis(50),
            _ => crate::runtime::queue::Backoff::default().delay(failures),
        }
    }

    /// The configuration `vm` runs with, recorded into its in-memory status
    /// (written with the next status write). Resolved again when the spec
    /// changed; when that fails, a VM that already has a configuration keeps
    /// it (so it can still be stopped or deleted) and one that has none waits.
    async fn resolve(&self, vm: &mut Vm) -> Result<Option<ResolvedConfig>, ReconcileError> {
        let mut status = vm.status_or_default();
        if let Some(config) = status.config.as_ref().filter(|c| Some(c.generation) == vm.metadata.generation) {
            return Ok(Some(config.clone()));
        }
        match resolve::resolve(vm, &self.stores) {
            Ok(config) => {
                let what = config.template.as_deref().map(|t| format!("from template {t}")).unwrap_or_default();
                set_condition(
                    &mut status.conditions,
                    "Resolved",
                    ConditionStatus::True,
                    "Resolved",
                    format!("{} vCPU, {} MiB {what}", config.vcpu, config.mem_mib).trim_end(),
                );
                status.config = Some(config.clone());
                vm.status = Some(status);
                Ok(Some(config))
            }
            Err(why) => {
                let message = why.to_string();
                let was = find_condition(&status.conditions, "Resolved").map(|c| c.message.clone());
                if was.as_deref() != Some(message.as_str()) {
                    self.events.publish(vm, EventType::Warning, why.reason(), &message).await;
                }
                set_condition(&mut status.conditions, "Resolved", ConditionStatus::False, why.reason(), &message);
                let kept = status.config.clone();
                vm.status = Some(status.clone());
                if kept.is_none() {
                    self.write_status(vm, status).await?;
                }
                Ok(kept)
            }
        }
    }

    /// Places `vm` on a node: binds it there (with its finalizer) in one
    /// write, or records why it cannot be placed now.
    async fn schedule(&self, vm: Vm, config: &ResolvedConfig) -> Result<Placement, ReconcileError> {
        let mut assumed = self.scheduling.lock().await;
        if assumed.node_of(&vm).is_some() {
            // Placed a moment ago; the store has not caught up yet.
            return Ok(Placement::Not(Action::RequeueAfter(Duration::from_millis(200))));
        }
        let mut nodes = self.stores.nodes.list();
        if let Some(restore) = &config.restore {
            // Its snapshot's files are on one node: that node or none.
            nodes.retain(|n| n.name() == restore.node);
            if nodes.is_empty() {
                drop(assumed);
                let message = format!(
                    "snapshot {} is on node {}, which does not exist any more; restore from a snapshot on a live node",
                    restore.snapshot.split('@').next().unwrap_or_default(),
                    restore.node
                );
                return self.unschedulable(vm, "SnapshotNodeNotFound", &message).await.map(Placement::Not);
            }
        }
        let group = scheduler::group_of(&vm);
        let loads = assumed.loads(&self.stores, vm.uid(), group.as_deref());
        let request =
            Request { mem_mib: config.mem_mib, node_selector: &config.node_selector, group: group.as_deref() };
        match pick_node(request, &nodes, &loads, Utc::now(), self.node_grace) {
            Ok(node) => {
                // The claim counts from now; other VMs are placed while
                // this one's binding is written.
                assumed.claim(vm.uid(), &node);
                drop(assumed);
                let mut next = finalizer::with(&vm, FINALIZER);
                next.spec.node_name = Some(node.clone());
                next.metadata.annotations.insert(PLACED_BY.into(), "scheduler".into());
                let written = self.api.replace(&next).await;
                let mut assumed = self.scheduling.lock().await;
                let mut bound = match written {
                    Ok(bound) => bound,
                    Err(e) => {
                        assumed.release(vm.uid());
                        return Err(e.into());
                    }
                };
                assumed.assume(&bound);
                self.stores.vms.record_write(bound.clone());
                drop(assumed);
                tracing::info!(vm = %vm.name(), node = %node, "scheduled");
                self.events.publish(&bound, EventType::Normal, "Scheduled", &format!("placed on node {node}")).await;
                // Written with what the agent reports next, not on its own.
                let mut status = vm.status_or_default();
                if let Some(config) = status.config.as_mut() {
                    // Binding changed only where the VM runs, not what it runs.
                    config.generation = bound.metadata.generation.unwrap_or(config.generation);
                }
                status.phase = VmPhase::Scheduled;
                status.node_name = Some(node.clone());
                set_condition(
                    &mut status.conditions,
                    "Scheduled",
                    ConditionStatus::True,
                    "Scheduled",
                    &format!("placed on node {node}"),
                );
                bound.status = Some(status);
                Ok(Placement::Bound(Box::new(bound)))
            }
            Err(why) => {
                drop(assumed);
                let message = match &config.restore {
                    Some(r) => format!("its snapshot's files are on node {}: {}", r.node, why.0),
                    None => why.0,
                };
                self.unschedulable(vm, "Unschedulable", &message).await.map(Placement::Not)
            }
        }
    }

    /// Records why `vm` cannot be placed now; it is tried again shortly.
    async fn unschedulable(&self, vm: Vm, reason: &'static str, message: &str) -> Result<Action, ReconcileError> {
        let was =
            vm.status.as_ref().and_then(|s| find_condition(&s.conditions, "Scheduled")).map(|c| c.message.clone());
        if was.as_deref() != Some(message) {
            self.events.publish(&vm, EventType::Warning, reason, message).await;
        }
        let mut status = vm.status_or_default();
        status.phase = VmPhase::Pending;
        set_condition(&mut status.conditions, "Scheduled", ConditionStatus::False, reason, message);
        self.write_status(&vm, status).await?;
        Ok(Action::RequeueAfter(Duration::from_secs(3)))
    }

    /// `vm` is bound to a node that has no Node object. A placement the
    /// scheduler made is made again elsewhere (the old node, should it come
    /// back, has its leftovers collected); a node the user pinned may not be
    /// registered yet, so that VM waits for it.
    async fn node_gone(&self, vm: Vm, node: &str) -> Result<Action, ReconcileError> {
        if vm.metadata.annotations.get(PLACED_BY).map(String::as_str) != Some("scheduler") {
            self.write_waiting(
                &vm,
                "NodeNotFound",
                &format!("node {node} does not exist; register it or change spec.nodeName"),
            )
            .await?;
            return Ok(Action::RequeueAfter(Duration::from_secs(5)));
        }
        let mut next = vm.clone();
        next.spec.node_name = None;
        next.metadata.annotations.remove(PLACED_BY);
        let unbound = self.api.replace(&next).await?;
        self.stores.vms.record_write(unbound.clone());
        let message = format!("node {node} was deleted; placing the VM again (its disk there is lost)");
        tracing::warn!(vm = %vm.name(), node, "node deleted; rescheduling");
        self.events.publish(&unbound, EventType::Warning, "Rescheduled", &message).await;
        let mut status = vm.status_or_default();
        status.phase = VmPhase::Pending;
        status.node_name = None;
        status.runtime = None;
        set_condition(&mut status.conditions, "Scheduled", ConditionStatus::False, "NodeDeleted", &message);
        set_condition(&mut status.conditions, "Ready", ConditionStatus::False, "NodeDeleted", &message);
        self.write_status(&unbound, status).await?;
        Ok(Action::AwaitChange)
    }

    async fn tear_down(&self, vm: Vm) -> Result<Action, ReconcileError> {
        if let Some(node_name) = vm.spec.node_name.clone() {
            // A node without a Node object is gone for good; nothing of the VM can remain there.
            if let Some(node) = self.stores.nodes.get_named("", &node_name) {
                if node.status_or_default().address.is_empty() {
                    return Err(ReconcileError::NodeWithoutAddress(node_name));
                }
                if vm.status_or_default().phase != VmPhase::Terminating {
                    let mut status = vm.status_or_default();
                    status.phase = VmPhase::Terminating;
                    self.write_status(&vm, status).await?;
                }
                let _slot = self.per_node.slot(&node_name).await;
                let uid = vm.uid().to_string();
                self.agents
                    .call(&node, |c, to| {
                        let uid = uid.clone();
                        async move { c.remove(&to, &uid).await }
                    })
                    .await
                    .map_err(ReconcileError::Agent)?;
            }
        }
        // The freshest copy: the finalizer list may have changed meanwhile.
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let latest: Vm = match self.api.get::<VmSpec>(project, vm.name()).await {
            Ok(v) => v,
            Err(e) if e.is_not_found() => return Ok(Action::AwaitChange),
            Err(e) => return Err(e.into()),
        };
        self.api.replace(&finalizer::without(&latest, FINALIZER)).await?;
        tracing::info!(vm = %vm.name(), "torn down");
        Ok(Action::AwaitChange)
    }

    async fn write_waiting(&self, vm: &Vm, reason: &str, message: &str) -> Result<(), ReconcileError> {
        let mut status = vm.status_or_default();
        set_condition(&mut status.conditions, "Ready", ConditionStatus::Unknown, reason, message);
        self.write_status(vm, status).await
    }

    /// Writes `status` through the status endpoint unless the store already
    /// shows exactly it, and records what the apiserver answered.
    async fn write_status(&self, vm: &Vm, status: VmStatus) -> Result<(), ReconcileError> {
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let cached = self.stores.vms.get_named(project, vm.name());
        if cached.as_ref().and_then(|c| c.status.as_ref()) == Some(&status) {
            return Ok(());
        }
        let mut next = vm.clone();
        next.status = Some(status);
        let written = self.api.replace_status(&next).await?;
        self.stores.vms.record_write(written);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn per_node_slots_bound_each_node_separately() {
        let per = PerNode::new(2);
        let a1 = per.slot("a").await;
        let _a2 = per.slot("a").await;
        assert!(
            tokio::time::timeout(Duration::from_millis(10), per.slot("a")).await.is_err(),
            "a third call to node a waits"
        );
        let _b = tokio::time::timeout(Duration::from_millis(10), per.slot("b")).await.expect("node b is not held up");
        drop(a1);
        let _a3 = tokio::time::timeout(Duration::from_millis(10), per.slot("a")).await.expect("a slot freed");
    }

    #[test]
    fn each_exit_notice_is_acted_on_once() {
        let mut seen = ExitsSeen::default();
        let at = Utc::now();
        let a = VmmExitNotice { uid: "a".into(), at };
        assert_eq!(seen.fresh(std::slice::from_ref(&a)), HashSet::from(["a".to_string()]));
        assert!(seen.fresh(std::slice::from_ref(&a)).is_empty(), "a heartbeat repeats it");
        let again = VmmExitNotice { uid: "a".into(), at: at + chrono::Duration::seconds(1) };
        assert_eq!(seen.fresh(&[a, again]).len(), 1, "a later exit of the same VM is news");
    }
}
