//! Volumes a VM attaches: where they are (a VM runs on its volumes' node)
//! and who holds them (one VM at a time). A VM takes a volume by writing
//! its name into the Volume's `status.attachedTo` under the Volume's
//! resourceVersion, so of two VMs racing for it one wins; the Volume
//! controller frees it once its holder is gone.

use std::collections::BTreeSet;
use std::time::Duration;

use nexus_api::conditions::{self, reason};
use nexus_api::meta::set_condition;
use nexus_api::storage::DriveSource;
use nexus_api::vm::ResolvedConfig;
use nexus_api::volume::VolumePhase;
use nexus_api::{ConditionStatus, PowerState, Vm, VmPhase};

use super::{ReconcileError, Stores, VmReconciler};
use crate::runtime::Action;

/// The names of the volumes `config` attaches.
pub fn volumes_of(config: &ResolvedConfig) -> Vec<&str> {
    config
        .drives
        .iter()
        .filter_map(|d| match &d.source {
            DriveSource::Volume { volume, .. } => Some(volume.as_str()),
            _ => None,
        })
        .collect()
}

/// The nodes holding the volumes of `config` (of `project`), by the
/// Volumes' status.
pub fn volume_nodes(config: &ResolvedConfig, project: &str, stores: &Stores) -> BTreeSet<String> {
    volumes_of(config)
        .into_iter()
        .filter_map(|name| stores.volumes.get_named(project, name))
        .filter_map(|v| v.status_or_default().node_name)
        .collect()
}

impl VmReconciler {
    /// Takes the volumes `config` attaches for `vm`, unless the VM is
    /// stopped. `None` when it holds them all; otherwise what to do while
    /// another VM holds one (the VM waits, `Pending`, saying which).
    pub(super) async fn take_volumes(
        &self,
        vm: &Vm,
        config: &ResolvedConfig,
    ) -> Result<Option<Action>, ReconcileError> {
        if vm.spec.state == PowerState::Stopped {
            return Ok(None);
        }
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        for name in volumes_of(config) {
            let Some(volume) = self.stores.volumes.get_named(project, name) else { continue };
            let mut status = volume.status_or_default();
            match status.attached_to.as_deref() {
                Some(holder) if holder == vm.name() => continue,
                Some(holder) => {
                    let message = format!(
                        "volume {name} is used by VM {holder}; this VM starts once {holder} is deleted or stopped using it"
                    );
                    self.wait_for_volume(vm, &message).await?;
                    return Ok(Some(Action::RequeueAfter(Duration::from_secs(5))));
                }
                None => {
                    status.attached_to = Some(vm.name().to_string());
                    status.phase = VolumePhase::InUse;
                    // Under the cached resourceVersion: a conflict means
                    // another VM may have taken it; the retry sees who.
                    let mut next = (*volume).clone();
                    next.status = Some(status);
                    let written = self.api.replace_status(&next).await?;
                    self.stores.volumes.record_write(written);
                    tracing::info!(vm = %vm.name(), volume = name, "volume taken");
                }
            }
        }
        Ok(None)
    }

    /// Records that `vm` waits for a volume another VM holds.
    async fn wait_for_volume(&self, vm: &Vm, message: &str) -> Result<(), ReconcileError> {
        let mut status = vm.status_or_default();
        let was = nexus_api::meta::find_condition(&status.conditions, conditions::READY).map(|c| c.message.clone());
        if was.as_deref() != Some(message) {
            self.events.publish(vm, nexus_api::event::EventType::Warning, reason::VOLUME_IN_USE, message).await;
        }
        if status.runtime.as_ref().and_then(|r| r.pid).is_none() {
            status.phase = VmPhase::Pending;
        }
        set_condition(
            &mut status.conditions,
            conditions::READY,
            ConditionStatus::False,
            reason::VOLUME_IN_USE,
            message,
        );
        self.write_status(vm, status).await
    }
}
