//! The VM controller: resolves a VM's template and images into a complete
//! configuration, schedules it, converges it through its node's agent to
//! `spec.state` (and its `restartPolicy` when the VMM ends on its own),
//! writes what it observed to status, and tears it down behind a finalizer
//! when the VM is deleted. It reads stores; it writes to the apiserver.
//!
//! - [`reconcile`]: one pass: expiry, resolution, convergence, refusals;
//! - [`placement`]: binding an unplaced VM to a node (and placing it again
//!   when its node is deleted);
//! - [`teardown`]: taking a deleted VM off its node;
//! - [`triggers`]: which VMs a change of a node, Template, Image or
//!   Snapshot concerns;
//! - [`resolve`], [`scheduler`], [`status`]: the pure decisions underneath;
//! - [`verified`]: which VMs' agent reports are fresh enough to skip a call;
//! - [`removals`]: which VMs' removals are under way, not to be asked again;
//! - [`volumes`]: the volumes a VM attaches: their node, and taking them.

pub mod placement;
pub mod reconcile;
pub mod removals;
pub mod resolve;
pub mod scheduler;
pub mod snapshot_copies;
pub mod status;
pub mod tally;
pub mod teardown;
pub mod triggers;
pub mod verified;
pub mod volumes;

use std::sync::Arc;
use std::time::Duration;

use nexus_api::{ImageSpec, NodeSpec, SnapshotSpec, TemplateSpec, Vm, VmSpec, VolumeSpec};
use nexus_client::agent::AgentCallError;
use nexus_client::{Client, ClientError};

use crate::Context;
use crate::agents::PerNode;
use crate::runtime::events::Recorder;
use crate::runtime::finalizer::Finalizer;
use crate::runtime::{Action, Controller, Reconciler, Store};
use removals::Removals;
use scheduler::Assumed;
use verified::Verified;

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
    pub volumes: Store<VolumeSpec>,
}

impl Stores {
    /// Empty stores, filled by tests with `record_write`.
    #[cfg(test)]
    pub fn empty() -> Self {
        use crate::runtime::store::store;
        Stores {
            vms: store().1,
            nodes: store().1,
            templates: store().1,
            images: store().1,
            snapshots: store().1,
            volumes: store().1,
        }
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
            volumes: ctx.reflectors.store::<VolumeSpec>(),
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
    /// The teardown finalizer; a VM the scheduler places gets it with its
    /// binding, in one write.
    pub finalizer: Finalizer<VmSpec>,
    /// Held while placing a VM: one placement at a time, each seeing the
    /// ones before it, even those the store does not show yet.
    pub scheduling: tokio::sync::Mutex<Assumed>,
    /// Bounds the agent calls in flight to each node.
    pub per_node: PerNode,
    /// VMs whose agent report is fresh.
    pub verified: Verified,
    /// VMs whose removal their agent has under way.
    pub removals: Removals,
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
        finalizer: Finalizer::new(ctx.api.clone(), stores.vms.clone(), FINALIZER)
            .added_by_reconciler(|vm: &Vm| vm.spec.node_name.is_none()),
        stores: stores.clone(),
        scheduling: Default::default(),
        per_node: PerNode::new(ctx.settings.per_node_concurrency),
        verified: Verified::default(),
        removals: Removals::default(),
    };
    let (vms_t, vms_i, vms_s, vms_v) = (stores.vms.clone(), stores.vms.clone(), stores.vms.clone(), stores.vms.clone());
    Controller::new("vm", stores.vms.clone(), reconciler)
        .watches_updates(stores.nodes.clone(), triggers::node_changed(stores.vms.clone(), stores.nodes.clone()))
        .watches(stores.templates.clone(), move |t| triggers::unresolved_in(&vms_t, t.metadata.project.as_deref()))
        .watches(stores.snapshots.clone(), move |s| triggers::unresolved_in(&vms_s, s.metadata.project.as_deref()))
        .watches(stores.images.clone(), move |i| {
            let mut keys = triggers::unresolved_in(&vms_i, i.metadata.project.as_deref());
            keys.extend(triggers::refused_for_images_in(&vms_i, i.metadata.project.as_deref()));
            keys
        })
        // A volume made, freed or taken concerns the VMs that name it.
        .watches(stores.volumes.clone(), move |v| triggers::naming_volume(&vms_v, v))
        .workers(ctx.settings.workers)
        .resync(ctx.settings.resync)
}

impl Reconciler for VmReconciler {
    type Spec = VmSpec;
    type Error = ReconcileError;

    async fn reconcile(&self, cached: Arc<Vm>) -> Result<Action, ReconcileError> {
        self.reconcile_vm(cached).await
    }

    fn error_policy(&self, _vm: &Vm, error: &ReconcileError, failures: u32) -> Duration {
        reconcile::backoff(error, failures)
    }
}
