//! Placement: binding an unplaced VM to a node (with its finalizer, in one
//! write), recording why it cannot be placed now, and placing it again when
//! the scheduler's node is deleted.

use std::time::Duration;

use chrono::Utc;
use nexus_api::conditions::{self, reason};
use nexus_api::event::EventType;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::vm::ResolvedConfig;
use nexus_api::{ConditionStatus, Vm, VmPhase};

use super::scheduler::{self, Request, pick_node};
use super::{PLACED_BY, ReconcileError, VmReconciler};
use crate::runtime::Action;
use crate::runtime::finalizer;

/// What scheduling a VM came to.
pub(super) enum Placement {
    /// Bound to a node (and holding its finalizer), with its status in
    /// memory saying so: it goes on to its node in the same reconcile.
    Bound(Box<Vm>),
    /// Not placed now.
    Not(Action),
}

/// The `Scheduled` condition of a VM placed on `node`.
pub fn scheduled_on(status: &mut nexus_api::VmStatus, node: &str) {
    set_condition(
        &mut status.conditions,
        conditions::SCHEDULED,
        ConditionStatus::True,
        reason::SCHEDULED,
        &format!("placed on node {node}"),
    );
}

impl VmReconciler {
    /// Places `vm` on a node: binds it there (with its finalizer) in one
    /// write, or records why it cannot be placed now.
    pub(super) async fn schedule(&self, vm: Vm, config: &ResolvedConfig) -> Result<Placement, ReconcileError> {
        let mut assumed = self.scheduling.lock().await;
        if assumed.node_of(&vm).is_some() {
            // Placed a moment ago; the store has not caught up yet.
            return Ok(Placement::Not(Action::RequeueAfter(Duration::from_millis(200))));
        }
        let mut nodes = self.stores.nodes.list();
        let mut holders = Vec::new();
        if let Some(restore) = &config.restore {
            // Its snapshot's files are on the node that took it (and on
            // nodes that copied them): those are preferred, and any other
            // node copies the files from the origin.
            holders = self.snapshot_holders(&vm, restore);
            if !nodes.iter().any(|n| n.name() == restore.node) {
                drop(assumed);
                let message = format!(
                    "snapshot {} is on node {}, which does not exist any more; restore from a snapshot on a live node",
                    restore.snapshot.split('@').next().unwrap_or_default(),
                    restore.node
                );
                return self.unschedulable(vm, reason::SNAPSHOT_NODE_NOT_FOUND, &message).await.map(Placement::Not);
            }
        }
        // Its volumes are on one node: that node or none.
        let project = vm.metadata.project.clone().unwrap_or_default();
        let volume_nodes = super::volumes::volume_nodes(config, &project, &self.stores);
        if volume_nodes.len() > 1 {
            drop(assumed);
            let message = format!(
                "its volumes are on different nodes ({}); a VM runs on one node",
                volume_nodes.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            return self.unschedulable(vm, reason::VOLUMES_APART, &message).await.map(Placement::Not);
        }
        if let Some(node) = volume_nodes.first() {
            nodes.retain(|n| n.name() == node);
        }
        let group = scheduler::group_of(&vm);
        let loads = assumed.loads(&self.stores, vm.uid(), group.as_deref());
        let request =
            Request { mem_mib: config.mem_mib, node_selector: &config.node_selector, group: group.as_deref() };
        let now = Utc::now();
        let preferred: Vec<_> = nodes.iter().filter(|n| holders.iter().any(|h| h == n.name())).cloned().collect();
        let picked = match preferred.is_empty() {
            true => pick_node(request, &nodes, &loads, now, self.node_grace),
            false => pick_node(request, &preferred, &loads, now, self.node_grace)
                .or_else(|_| pick_node(request, &nodes, &loads, now, self.node_grace)),
        };
        match picked {
            Ok(node) => {
                // The claim counts from now; other VMs are placed while
                // this one's binding is written.
                assumed.claim(vm.uid(), &node);
                drop(assumed);
                let mut next = finalizer::with(&vm, self.finalizer.name());
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
                let placed = format!("placed on node {node}");
                self.events.publish(&bound, EventType::Normal, reason::SCHEDULED, &placed).await;
                // Written with what the agent reports next, not on its own.
                let mut status = vm.status_or_default();
                if let Some(config) = status.config.as_mut() {
                    // Binding changed only where the VM runs, not what it runs.
                    config.generation = bound.metadata.generation.unwrap_or(config.generation);
                }
                status.phase = VmPhase::Scheduled;
                status.node_name = Some(node.clone());
                scheduled_on(&mut status, &node);
                bound.status = Some(status);
                Ok(Placement::Bound(Box::new(bound)))
            }
            Err(why) => {
                drop(assumed);
                let message = match volume_nodes.first() {
                    Some(node) => format!("its volumes are on node {node}: {}", why.0),
                    None => why.0,
                };
                self.unschedulable(vm, reason::UNSCHEDULABLE, &message).await.map(Placement::Not)
            }
        }
    }

    /// The nodes holding the files of the snapshot `vm` restores from: the
    /// one that took it, then those holding a copy.
    fn snapshot_holders(&self, vm: &Vm, restore: &nexus_api::vm::ResolvedRestore) -> Vec<String> {
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let name = restore.snapshot.split('@').next().unwrap_or_default();
        let copies = self
            .stores
            .snapshots
            .get_named(project, name)
            .filter(|s| s.uid() == restore.snapshot_uid)
            .map(|s| s.status_or_default().copies)
            .unwrap_or_default();
        std::iter::once(restore.node.clone()).chain(copies).collect()
    }

    /// Records why `vm` cannot be placed now; it is tried again shortly.
    async fn unschedulable(&self, vm: Vm, why: &'static str, message: &str) -> Result<Action, ReconcileError> {
        let was = vm
            .status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, conditions::SCHEDULED))
            .map(|c| c.message.clone());
        if was.as_deref() != Some(message) {
            self.events.publish(&vm, EventType::Warning, why, message).await;
        }
        let mut status = vm.status_or_default();
        status.phase = VmPhase::Pending;
        set_condition(&mut status.conditions, conditions::SCHEDULED, ConditionStatus::False, why, message);
        self.write_status(&vm, status).await?;
        Ok(Action::RequeueAfter(Duration::from_secs(3)))
    }

    /// `vm` is bound to a node that has no Node object. A placement the
    /// scheduler made is made again elsewhere (the old node, should it come
    /// back, has its leftovers collected); a node the user pinned may not be
    /// registered yet, so that VM waits for it.
    pub(super) async fn node_gone(&self, vm: Vm, node: &str) -> Result<Action, ReconcileError> {
        if vm.metadata.annotations.get(PLACED_BY).map(String::as_str) != Some("scheduler") {
            let message = format!("node {node} does not exist; register it or change spec.nodeName");
            self.write_waiting(&vm, reason::NODE_NOT_FOUND, &message).await?;
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
        for type_ in [conditions::SCHEDULED, conditions::READY] {
            set_condition(&mut status.conditions, type_, ConditionStatus::False, reason::NODE_DELETED, &message);
        }
        self.write_status(&unbound, status).await?;
        Ok(Action::AwaitChange)
    }
}
