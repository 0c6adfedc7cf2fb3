//! The VM reconciler: resolves a VM's template and images into a complete
//! configuration, schedules it, converges it through its node's agent to
//! `spec.state` (and its `restartPolicy` when the VMM ends on its own),
//! writes what it observed to status, and tears it down behind a finalizer
//! when the VM is deleted. It reads the caches; it writes to the apiserver.

use std::time::Duration;

use chrono::Utc;
use nexus_api::agent::{EnsureVm, ObservedState, VmReport};
use nexus_api::client::{Client, ClientError};
use nexus_api::event::EventType;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::vm::{ResolvedConfig, VmError, VmRuntime, mac_from_uid};
use nexus_api::{ConditionStatus, Vm, VmPhase, VmSpec, VmStatus};

use crate::agent::{AgentCallError, AgentClient};
use crate::cache::Caches;
use crate::finalizer::{self, Step};
use crate::scheduler::{Assumed, Request, pick_node};

/// Finalizer that holds a VM until its node has torn it down.
pub const FINALIZER: &str = "nexus.dev/vm-teardown";

/// Annotation marking a `spec.nodeName` the scheduler chose (as opposed to
/// one the user pinned): such a VM is placed again if its node is deleted.
pub const PLACED_BY: &str = "nexus.dev/placed-by";

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
    /// What the reconciler reads; kept current by the runner's reflectors.
    pub caches: Caches,
    /// Held while placing a VM: one placement at a time, each seeing the
    /// ones before it, even those the cache does not show yet.
    pub scheduling: std::sync::Arc<tokio::sync::Mutex<Assumed>>,
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
    /// Reconciles VM `project/name` from its cached state.
    pub async fn reconcile(&self, project: &str, name: &str) -> Result<Action, ReconcileError> {
        let Some(cached) = self.caches.vms.get(project, name) else {
            return Ok(Action::AwaitChange);
        };
        let mut vm: Vm = (*cached).clone();
        match finalizer::step(&vm, FINALIZER) {
            Step::Cleanup => return self.tear_down(vm).await,
            Step::Done => return Ok(Action::AwaitChange),
            Step::Add => {
                vm = self.api.replace(&finalizer::with(&vm, FINALIZER)).await?;
                self.caches.vms.upsert(vm.clone());
            }
            Step::Apply => {}
        }
        let Some(config) = self.resolve(&mut vm).await? else {
            return Ok(Action::RequeueAfter(Duration::from_secs(5)));
        };
        let Some(node_name) = vm.spec.node_name.clone() else {
            return self.schedule(vm, &config).await;
        };
        let Some(node) = self.caches.nodes.get("", &node_name) else {
            return self.node_gone(vm, &node_name).await;
        };
        let node_status = node.status_or_default();
        if !node_status.is_ready(Utc::now(), self.node_grace) {
            self.write_waiting(&vm, "NodeNotReady", &format!("node {node_name} is not Ready")).await?;
            return Ok(Action::RequeueAfter(Duration::from_secs(2)));
        }
        let status = vm.status_or_default();
        let generation = vm.metadata.generation;
        if matches!(status.phase, VmPhase::Failed | VmPhase::Succeeded) && status.observed_generation == generation {
            // Finished, or failed for good: wait for the spec to change, no hot loop.
            return Ok(Action::AwaitChange);
        }
        let desired = ensure_request(&vm, &config);
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

    /// The configuration `vm` runs with, recorded into its in-memory status
    /// (written with the next status write). Resolved again when the spec
    /// changed; when that fails, a VM that already has a configuration keeps
    /// it (so it can still be stopped or deleted) and one that has none waits.
    async fn resolve(&self, vm: &mut Vm) -> Result<Option<ResolvedConfig>, ReconcileError> {
        let mut status = vm.status_or_default();
        if let Some(config) = status.config.as_ref().filter(|c| Some(c.generation) == vm.metadata.generation) {
            return Ok(Some(config.clone()));
        }
        match crate::resolve::resolve(vm, &self.caches) {
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
                    self.events.vm(vm, EventType::Warning, why.reason(), &message).await;
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

    async fn schedule(&self, vm: Vm, config: &ResolvedConfig) -> Result<Action, ReconcileError> {
        let mut assumed = self.scheduling.lock().await;
        if assumed.node_of(&vm).is_some() {
            // Placed a moment ago; the cache has not caught up yet.
            return Ok(Action::RequeueAfter(Duration::from_millis(200)));
        }
        let nodes = self.caches.nodes.list();
        let placed = assumed.placements(&self.caches, vm.uid());
        let request = Request { mem_mib: config.mem_mib, node_selector: &config.node_selector };
        match pick_node(request, &nodes, &placed, Utc::now(), self.node_grace) {
            Ok(node) => {
                let mut next = vm.clone();
                next.spec.node_name = Some(node.clone());
                next.metadata.annotations.insert(PLACED_BY.into(), "scheduler".into());
                let bound = self.api.replace(&next).await?;
                assumed.assume(&bound);
                self.caches.vms.upsert(bound.clone());
                drop(assumed);
                tracing::info!(vm = %vm.name(), node = %node, "scheduled");
                self.events.vm(&bound, EventType::Normal, "Scheduled", &format!("placed on node {node}")).await;
                let mut status = vm.status_or_default();
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
                drop(assumed);
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
        self.caches.vms.upsert(unbound.clone());
        let message = format!("node {node} was deleted; placing the VM again (its disk there is lost)");
        tracing::warn!(vm = %vm.name(), node, "node deleted; rescheduling");
        self.events.vm(&unbound, EventType::Warning, "Rescheduled", &message).await;
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
            if let Some(node) = self.caches.nodes.get("", &node_name) {
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

    async fn write_observed(&self, vm: &Vm, node: &str, report: &VmReport) -> Result<(), ReconcileError> {
        let mut status = vm.status_or_default();
        let (before, old_pid) = (status.phase, status.runtime.as_ref().and_then(|r| r.pid));
        status.node_name = Some(node.to_string());
        status.observed_generation = vm.metadata.generation;
        status.last_error = None;
        let clean_exit = report.exit.as_ref().is_some_and(|e| e.is_clean());
        status.phase = match report.state {
            ObservedState::Running => VmPhase::Running,
            ObservedState::Paused => VmPhase::Paused,
            ObservedState::Stopped | ObservedState::Absent => VmPhase::Stopped,
            ObservedState::Exited if clean_exit => VmPhase::Succeeded,
            ObservedState::Exited => VmPhase::Failed,
        };
        let exit_text = report.exit.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "ended".into());
        let policy = vm.spec.restart_policy;
        if status.phase == VmPhase::Failed {
            status.last_error = Some(VmError {
                message: format!("the VMM {exit_text}; restartPolicy {policy:?} keeps it down"),
                fault_message: None,
                suggestion: Some(
                    "read the VM's console log; set spec.state to Stopped, then Running, to start it again".into(),
                ),
            });
        }
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
            restarts: report.restarts,
            exit: report.exit.clone(),
        });
        let ready = report.state == ObservedState::Running;
        set_condition(
            &mut status.conditions,
            "Scheduled",
            ConditionStatus::True,
            "Scheduled",
            &format!("placed on node {node}"),
        );
        let not_ready = if report.state == ObservedState::Exited {
            format!("the VMM {exit_text}")
        } else {
            "the guest is not running".to_string()
        };
        set_condition(
            &mut status.conditions,
            "Ready",
            if ready { ConditionStatus::True } else { ConditionStatus::False },
            &format!("{:?}", report.state),
            if ready { "the VMM is running the guest" } else { &not_ready },
        );
        let after = status.phase;
        self.write_status(vm, status).await?;
        let event = match (before, after) {
            (b, VmPhase::Running) if b != VmPhase::Running => {
                let pid = report.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
                Some((EventType::Normal, "Started", format!("running on node {node}{pid}")))
            }
            (VmPhase::Running, VmPhase::Running) if old_pid.is_some() && old_pid != report.pid => {
                let (old, new) = (old_pid.unwrap_or_default(), report.pid.unwrap_or_default());
                let how = report.exit.as_ref().map(|e| format!(" ({e})")).unwrap_or_default();
                Some((
                    EventType::Normal,
                    "Restarted",
                    format!(
                        "the VMM (pid {old}) ended{how}; started again as pid {new} (restart {}, restartPolicy {policy:?})",
                        report.restarts
                    ),
                ))
            }
            (b, VmPhase::Paused) if b != VmPhase::Paused => {
                Some((EventType::Normal, "Paused", "the guest's vCPUs are paused".to_string()))
            }
            (b, VmPhase::Stopped) if b != VmPhase::Stopped => {
                Some((EventType::Normal, "Stopped", "the VMM is stopped; the disk is kept".to_string()))
            }
            (b, VmPhase::Succeeded) if b != VmPhase::Succeeded => Some((
                EventType::Normal,
                "Completed",
                format!("the guest shut down (the VMM {exit_text}); restartPolicy {policy:?} keeps it down"),
            )),
            (b, VmPhase::Failed) if b != VmPhase::Failed => Some((
                EventType::Warning,
                "Failed",
                format!("the VMM {exit_text}; restartPolicy {policy:?} keeps it down"),
            )),
            _ => None,
        };
        if let Some((type_, reason, message)) = event {
            self.events.vm(vm, type_, reason, &message).await;
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

    /// Writes `status` through the status endpoint unless the cache already
    /// shows exactly it, and caches what the apiserver answered.
    async fn write_status(&self, vm: &Vm, status: VmStatus) -> Result<(), ReconcileError> {
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let cached = self.caches.vms.get(project, vm.name());
        if cached.as_ref().and_then(|c| c.status.as_ref()) == Some(&status) {
            return Ok(());
        }
        let mut next = vm.clone();
        next.status = Some(status);
        let written = self.api.replace_status(&next).await?;
        self.caches.vms.upsert(written);
        Ok(())
    }
}

/// The agent request realising `vm` with its resolved `config`.
pub fn ensure_request(vm: &Vm, config: &ResolvedConfig) -> EnsureVm {
    let project = vm.metadata.project.as_deref().unwrap_or_default();
    let network = config.network.as_ref();
    EnsureVm {
        uid: vm.uid().to_string(),
        display_name: format!("{project}/{}", vm.name()),
        state: vm.spec.state,
        vcpu: config.vcpu,
        mem_mib: config.mem_mib,
        kernel_path: config.kernel_path.clone(),
        rootfs_path: config.rootfs_path.clone(),
        boot_args: config.boot_args.clone(),
        mac: network.and_then(|n| n.mac.clone()).unwrap_or_else(|| mac_from_uid(vm.uid())),
        ip: network.and_then(|n| n.ip.clone()),
        restore: None,
        restart_policy: vm.spec.restart_policy,
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
