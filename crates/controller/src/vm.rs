//! The VM reconciler: schedules a VM, converges it through its node's agent
//! to `spec.state`, writes what it observed to status, and tears it down
//! behind a finalizer when the VM is deleted.

use std::time::Duration;

use chrono::Utc;
use nexus_api::agent::{EnsureVm, ObservedState, VmReport};
use nexus_api::client::{Client, ClientError, ListParams};
use nexus_api::event::EventType;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::vm::{DEFAULT_BOOT_ARGS, VmError, VmRuntime, mac_from_uid};
use nexus_api::{ConditionStatus, Node, NodeSpec, Vm, VmPhase, VmSpec, VmStatus};

use crate::agent::{AgentCallError, AgentClient};
use crate::finalizer::{self, Step};
use crate::scheduler::pick_node;

/// Finalizer that holds a VM until its node has torn it down.
pub const FINALIZER: &str = "nexus.dev/vm-teardown";

/// What to do with a key after a successful reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look again after this long even if nothing changes.
    RequeueAfter(Duration),
    /// Wait for the next change.
    AwaitChange,
}

/// Failures that send the key back to the backoff queue.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("apiserver call failed")]
    Api(#[from] ClientError),
    #[error(transparent)]
    Agent(AgentCallError),
    #[error("node {0} has no agent address yet")]
    NodeWithoutAddress(String),
}

/// Settings and clients of the reconciler.
#[derive(Debug, Clone)]
pub struct VmReconciler {
    pub api: Client,
    pub agents: AgentClient,
    /// Heartbeats older than this make a node not Ready.
    pub node_grace: chrono::Duration,
    /// How often a converged VM is checked again.
    pub recheck: Duration,
    pub events: crate::events::Recorder,
    /// Held while placing a VM: one placement at a time, so each sees the
    /// ones before it (capacity holds however many workers run).
    pub scheduling: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Bounds the agent calls in flight to each node.
    pub per_node: PerNode,
}

/// A semaphore per node: at most `limit` agent calls to one node at once,
/// however many workers the controller runs.
#[derive(Debug, Clone)]
pub struct PerNode {
    limit: usize,
    nodes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>>,
}

impl PerNode {
    pub fn new(limit: usize) -> Self {
        PerNode { limit: limit.max(1), nodes: Default::default() }
    }

    /// Waits for a slot on `node`; the slot is held until the permit drops.
    pub async fn slot(&self, node: &str) -> tokio::sync::OwnedSemaphorePermit {
        let sem = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes
                .entry(node.to_string())
                .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(self.limit)))
                .clone()
        };
        sem.acquire_owned().await.expect("the semaphore is never closed")
    }
}

impl VmReconciler {
    /// Reconciles VM `project/name` from its current state.
    pub async fn reconcile(&self, project: &str, name: &str) -> Result<Action, ReconcileError> {
        let vm: Vm = match self.api.get::<VmSpec>(project, name).await {
            Ok(vm) => vm,
            Err(e) if e.is_not_found() => return Ok(Action::AwaitChange),
            Err(e) => return Err(e.into()),
        };
        match finalizer::step(&vm, FINALIZER) {
            Step::Cleanup => return self.tear_down(vm).await,
            Step::Done => return Ok(Action::AwaitChange),
            Step::Add => {
                self.api.replace(&finalizer::with(&vm, FINALIZER)).await?;
                return Ok(Action::AwaitChange);
            }
            Step::Apply => {}
        }
        let Some(node_name) = vm.spec.node_name.clone() else {
            return self.schedule(vm).await;
        };
        let node = match self.api.get::<NodeSpec>("", &node_name).await {
            Ok(n) => n,
            Err(e) if e.is_not_found() => {
                self.write_waiting(&vm, "NodeNotFound", &format!("node {node_name} does not exist")).await?;
                return Ok(Action::RequeueAfter(Duration::from_secs(5)));
            }
            Err(e) => return Err(e.into()),
        };
        let node_status = node.status_or_default();
        if !node_status.is_ready(Utc::now(), self.node_grace) {
            self.write_waiting(&vm, "NodeNotReady", &format!("node {node_name} is not Ready")).await?;
            return Ok(Action::RequeueAfter(Duration::from_secs(2)));
        }
        let status = vm.status_or_default();
        let generation = vm.metadata.generation;
        if status.phase == VmPhase::Failed && status.observed_generation == generation {
            // A permanent failure: wait for the spec to change, no hot loop.
            return Ok(Action::AwaitChange);
        }
        let desired = ensure_request(&vm);
        let _slot = self.per_node.slot(&node_name).await;
        match self.agents.ensure(&node_status.address, &desired).await {
            Ok(report) => {
                self.write_observed(&vm, &node_name, &report).await?;
                Ok(Action::RequeueAfter(self.recheck))
            }
            Err(AgentCallError::Rejected(body)) => {
                self.write_failed(&vm, &node_name, &body).await?;
                Ok(Action::AwaitChange)
            }
            Err(e) => Err(ReconcileError::Agent(e)),
        }
    }

    async fn schedule(&self, vm: Vm) -> Result<Action, ReconcileError> {
        let _one_at_a_time = self.scheduling.lock().await;
        let nodes: Vec<Node> = self.api.list::<NodeSpec>(None, &ListParams::default()).await?.items;
        let placed: Vec<Vm> = self.api.list::<VmSpec>(None, &ListParams::default()).await?.items;
        match pick_node(&vm, &nodes, &placed, Utc::now(), self.node_grace) {
            Ok(node) => {
                let mut next = vm.clone();
                next.spec.node_name = Some(node.clone());
                let bound = self.api.replace(&next).await?;
                tracing::info!(vm = %vm.name(), node = %node, "scheduled");
                self.events.vm(&bound, EventType::Normal, "Scheduled", &format!("placed on node {node}")).await;
                let mut status = bound.status_or_default();
                status.phase = VmPhase::Scheduled;
                status.node_name = Some(node.clone());
                set_condition(
                    &mut status.conditions,
                    "Scheduled",
                    ConditionStatus::True,
                    "Scheduled",
                    &format!("placed on node {node}"),
                );
                self.write_status(&bound, status).await?;
                Ok(Action::AwaitChange)
            }
            Err(why) => {
                let was = vm
                    .status
                    .as_ref()
                    .and_then(|s| find_condition(&s.conditions, "Scheduled"))
                    .map(|c| c.message.clone());
                if was.as_deref() != Some(why.0.as_str()) {
                    self.events.vm(&vm, EventType::Warning, "Unschedulable", &why.0).await;
                }
                let mut status = vm.status_or_default();
                status.phase = VmPhase::Pending;
                set_condition(&mut status.conditions, "Scheduled", ConditionStatus::False, "Unschedulable", &why.0);
                self.write_status(&vm, status).await?;
                Ok(Action::RequeueAfter(Duration::from_secs(3)))
            }
        }
    }

    async fn tear_down(&self, vm: Vm) -> Result<Action, ReconcileError> {
        if let Some(node_name) = vm.spec.node_name.clone() {
            match self.api.get::<NodeSpec>("", &node_name).await {
                Ok(node) => {
                    let address = node.status_or_default().address;
                    if address.is_empty() {
                        return Err(ReconcileError::NodeWithoutAddress(node_name));
                    }
                    if vm.status_or_default().phase != VmPhase::Terminating {
                        let mut status = vm.status_or_default();
                        status.phase = VmPhase::Terminating;
                        self.write_status(&vm, status).await?;
                    }
                    let _slot = self.per_node.slot(&node_name).await;
                    self.agents.remove(&address, vm.uid()).await.map_err(ReconcileError::Agent)?;
                }
                // The node is gone for good; nothing of the VM can remain there.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut latest: Vm =
            match self.api.get::<VmSpec>(vm.metadata.project.as_deref().unwrap_or_default(), vm.name()).await {
                Ok(v) => v,
                Err(e) if e.is_not_found() => return Ok(Action::AwaitChange),
                Err(e) => return Err(e.into()),
            };
        latest = finalizer::without(&latest, FINALIZER);
        self.api.replace(&latest).await?;
        tracing::info!(vm = %vm.name(), "torn down");
        Ok(Action::AwaitChange)
    }

    async fn write_observed(&self, vm: &Vm, node: &str, report: &VmReport) -> Result<(), ReconcileError> {
        let mut status = vm.status_or_default();
        let (before, old_pid) = (status.phase, status.runtime.as_ref().and_then(|r| r.pid));
        status.node_name = Some(node.to_string());
        status.observed_generation = vm.metadata.generation;
        status.last_error = None;
        status.phase = match report.state {
            ObservedState::Running => VmPhase::Running,
            ObservedState::Paused => VmPhase::Paused,
            ObservedState::Stopped | ObservedState::Absent => VmPhase::Stopped,
        };
        status.runtime = Some(VmRuntime {
            pid: report.pid,
            socket_path: report.socket_path.clone(),
            tap_name: report.tap_name.clone(),
            mac: report.mac.clone(),
            ip: report.ip.clone(),
            log_path: report.log_path.clone(),
            console_path: report.console_path.clone(),
            started_at: report.started_at,
            boot_millis: report.boot_millis,
        });
        let ready = report.state == ObservedState::Running;
        set_condition(
            &mut status.conditions,
            "Scheduled",
            ConditionStatus::True,
            "Scheduled",
            &format!("placed on node {node}"),
        );
        set_condition(
            &mut status.conditions,
            "Ready",
            if ready { ConditionStatus::True } else { ConditionStatus::False },
            &format!("{:?}", report.state),
            if ready { "the VMM is running the guest" } else { "the guest is not running" },
        );
        let after = status.phase;
        self.write_status(vm, status).await?;
        let event = match (before, after) {
            (b, VmPhase::Running) if b != VmPhase::Running => {
                let pid = report.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
                Some(("Started", format!("running on node {node}{pid}")))
            }
            (VmPhase::Running, VmPhase::Running) if old_pid.is_some() && old_pid != report.pid => {
                let (old, new) = (old_pid.unwrap_or_default(), report.pid.unwrap_or_default());
                Some(("Restarted", format!("the VMM (pid {old}) was gone; started again as pid {new}")))
            }
            (b, VmPhase::Paused) if b != VmPhase::Paused => {
                Some(("Paused", "the guest's vCPUs are paused".to_string()))
            }
            (b, VmPhase::Stopped) if b != VmPhase::Stopped => {
                Some(("Stopped", "the VMM is stopped; the disk is kept".to_string()))
            }
            _ => None,
        };
        if let Some((reason, message)) = event {
            self.events.vm(vm, EventType::Normal, reason, &message).await;
        }
        Ok(())
    }

    async fn write_failed(&self, vm: &Vm, node: &str, body: &nexus_api::ErrorBody) -> Result<(), ReconcileError> {
        tracing::warn!(vm = %vm.name(), error = %body, "VM failed permanently");
        let mut message = body.message.clone();
        if let Some(f) = &body.fault_message {
            message.push_str(&format!("; firecracker: {f}"));
        }
        if let Some(s) = &body.suggestion {
            message.push_str(&format!("; {s}"));
        }
        self.events.vm(vm, EventType::Warning, "Failed", &message).await;
        let mut status = vm.status_or_default();
        status.node_name = Some(node.to_string());
        status.observed_generation = vm.metadata.generation;
        status.phase = VmPhase::Failed;
        status.last_error = Some(VmError {
            message: body.message.clone(),
            fault_message: body.fault_message.clone(),
            suggestion: body.suggestion.clone(),
        });
        set_condition(&mut status.conditions, "Ready", ConditionStatus::False, &body.error, &body.message);
        self.write_status(vm, status).await
    }

    async fn write_waiting(&self, vm: &Vm, reason: &str, message: &str) -> Result<(), ReconcileError> {
        let mut status = vm.status_or_default();
        set_condition(&mut status.conditions, "Ready", ConditionStatus::Unknown, reason, message);
        self.write_status(vm, status).await
    }

    /// Writes `status` through the status endpoint unless nothing changed.
    async fn write_status(&self, vm: &Vm, status: VmStatus) -> Result<(), ReconcileError> {
        if vm.status.as_ref() == Some(&status) {
            return Ok(());
        }
        let mut next = vm.clone();
        next.status = Some(status);
        self.api.replace_status(&next).await?;
        Ok(())
    }
}

/// The agent request realising `vm`'s spec.
pub fn ensure_request(vm: &Vm) -> EnsureVm {
    let project = vm.metadata.project.as_deref().unwrap_or_default();
    EnsureVm {
        uid: vm.uid().to_string(),
        display_name: format!("{project}/{}", vm.name()),
        state: vm.spec.state,
        vcpu: vm.spec.vcpu,
        mem_mib: vm.spec.mem_mib,
        kernel_path: vm.spec.kernel.clone(),
        rootfs_path: vm.spec.rootfs.clone(),
        boot_args: vm.spec.boot_args.clone().unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string()),
        mac: vm.spec.network.as_ref().and_then(|n| n.mac.clone()).unwrap_or_else(|| mac_from_uid(vm.uid())),
        ip: vm.spec.network.as_ref().and_then(|n| n.ip.clone()),
        restore: None,
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
}
