//! VMs restored on a node that did not take their snapshot: the agent is
//! told where the files are (it copies and checks them), and the Snapshot's
//! `status.copies` records each node that then holds a copy, so that the
//! scheduler prefers it and deleting the Snapshot removes every copy.

use nexus_api::agent::{EnsureVm, SnapshotOrigin};
use nexus_api::vm::ResolvedConfig;
use nexus_api::{Snapshot, Vm};

use super::ReconcileError;
use super::VmReconciler;

impl VmReconciler {
    /// Names the snapshot's origin in `desired` when the VM runs on another
    /// node (`node`), so that its agent can copy the files from there.
    pub(super) fn name_snapshot_origin(&self, desired: &mut EnsureVm, config: &ResolvedConfig, node: &str) {
        let (Some(restore), Some(from)) = (&config.restore, desired.restore.as_mut()) else { return };
        if restore.node == node {
            return;
        }
        if let Some(origin) = self.stores.nodes.get_named("", &restore.node) {
            from.origin =
                Some(SnapshotOrigin { node: restore.node.clone(), address: origin.status_or_default().address });
        }
    }

    /// Records that `node` holds a copy of the snapshot `vm` was restored
    /// from (its agent just started the VM from it).
    pub(super) async fn note_snapshot_copy(
        &self,
        vm: &Vm,
        config: &ResolvedConfig,
        node: &str,
    ) -> Result<(), ReconcileError> {
        let Some(restore) = config.restore.as_ref().filter(|r| r.node != node) else { return Ok(()) };
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let name = restore.snapshot.split('@').next().unwrap_or_default();
        let Some(snap) = self.stores.snapshots.get_named(project, name).filter(|s| s.uid() == restore.snapshot_uid)
        else {
            return Ok(());
        };
        let mut status = snap.status_or_default();
        if status.copies.iter().any(|c| c == node) || snap.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        status.copies.push(node.to_string());
        status.copies.sort();
        let snap: &Snapshot = &snap;
        crate::runtime::status::write_status(&self.api, &self.stores.snapshots, snap, status).await?;
        tracing::info!(snapshot = %name, node, "a copy of the snapshot is on the node");
        Ok(())
    }
}
