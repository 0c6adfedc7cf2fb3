//! Teardown: a deleted VM is taken off its node (its VMM stopped, its TAP
//! and directory removed) before its finalizer goes.

use nexus_api::{Vm, VmPhase};

use super::{ReconcileError, VmReconciler};
use crate::runtime::Action;

impl VmReconciler {
    /// Has the VM's node remove it; answers [`Action::AwaitChange`] once
    /// nothing of it is left there (the finalizer is removed then).
    pub(super) async fn tear_down(&self, vm: Vm) -> Result<Action, ReconcileError> {
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
        tracing::info!(vm = %vm.name(), "torn down");
        Ok(Action::AwaitChange)
    }
}
