//! Teardown: a deleted VM is taken off its node (its VMM stopped, its TAP
//! and directory removed) before its finalizer goes. The agent answers a
//! removal at once and does it on its own time (the guest's shutdown, the
//! stop grace), so no worker waits on a guest: the VM comes back here when
//! its node reports the removal done, and goes once the agent says absent.

use std::time::Duration;

use nexus_api::agent::ObservedState;
use nexus_api::{Vm, VmPhase};

use super::{ReconcileError, VmReconciler};
use crate::runtime::Action;

/// When a removal under way is asked about again if its node's notice
/// that it is done has not come.
const REMOVAL_RECHECK: Duration = Duration::from_secs(10);

impl VmReconciler {
    /// Has the VM's node remove it; answers [`Action::AwaitChange`] once
    /// nothing of it is left there (the finalizer is removed then).
    pub(super) async fn tear_down(&self, vm: Vm) -> Result<Action, ReconcileError> {
        if let Some(node_name) = vm.spec.node_name.clone() {
            // A node without a Node object is gone for good; nothing of the VM can remain there.
            if let Some(node) = self.stores.nodes.get_named("", &node_name) {
                if node.status_view().address.is_empty() {
                    return Err(ReconcileError::NodeWithoutAddress(node_name));
                }
                if vm.status_view().phase != VmPhase::Terminating {
                    let mut status = vm.status_or_default();
                    status.phase = VmPhase::Terminating;
                    self.write_status(&vm, status).await?;
                }
                let uid = vm.uid().to_string();
                // Asked already, and not announced done: its own status
                // write (or another change) woke it, not the removal's end.
                let announced = node.status_view().removed_vms.iter().any(|n| n.uid == uid);
                if !announced && let Some(left) = self.removals.wait(&uid, REMOVAL_RECHECK) {
                    return Ok(Action::RequeueAfter(left));
                }
                let _slot = self.per_node.slot(&node_name).await;
                let report = self
                    .agents
                    .call(&node, |c, to| {
                        let uid = uid.clone();
                        async move { c.remove(&to, &uid).await }
                    })
                    .await
                    .map_err(ReconcileError::Agent)?;
                if report.state == ObservedState::Removing {
                    // The agent stops the guest (within its stop grace) and
                    // removes it meanwhile; its node's next heartbeat names
                    // the VM when that is done, which brings it back here.
                    // The requeue is only for a notice that never comes.
                    self.removals.asked(&uid);
                    return Ok(Action::RequeueAfter(REMOVAL_RECHECK));
                }
                self.removals.forget(&uid);
            }
        }
        tracing::info!(vm = %vm.name(), "torn down");
        Ok(Action::AwaitChange)
    }
}
