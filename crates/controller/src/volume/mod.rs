//! The Volume controller: places each Volume on a node (when it names
//! none), has that node make its file, frees it once the VM holding it is
//! gone, and removes the file behind a finalizer when the Volume is
//! deleted (the apiserver refuses that while a VM uses it).
//!
//! Phases: `Pending` (no node yet, or not made), `Available`, `InUse`
//! (`status.attachedTo` names its VM), `Failed` (the node could not make
//! it; for good: delete it and make another).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use nexus_api::VolumeSpec;
use nexus_api::agent::{ImageFile, VolumeRequest};
use nexus_api::event::EventType;
use nexus_api::image::ImageType;
use nexus_api::volume::{Volume, VolumePhase, VolumeStatus};
use nexus_client::agent::AgentCallError;
use nexus_client::{Client, ClientError};

use crate::Context;
use crate::runtime::events::Recorder;
use crate::runtime::finalizer::{Event, Finalizer};
use crate::runtime::store::BY_PROJECT;
use crate::runtime::{Action, Controller, ObjectKey, Reconciler, Store};
use crate::vm::Stores;
use crate::vm::triggers::uses_volume;

/// Finalizer that holds a Volume until its file is gone from its node.
pub const FINALIZER: &str = "nexus.dev/volume-file";

/// Failures that send the key back to the backoff queue.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("apiserver call failed")]
    Api(#[from] ClientError),
    #[error(transparent)]
    Agent(AgentCallError),
}

/// Makes, frees and removes volumes.
#[derive(Debug)]
pub struct VolumeReconciler {
    api: Client,
    agents: Arc<crate::agents::Agents>,
    events: Recorder,
    stores: Stores,
    node_grace: chrono::Duration,
    finalizer: Finalizer<VolumeSpec>,
}

/// The Volume controller, built from `ctx`.
pub fn controller(ctx: &Context) -> Controller<VolumeReconciler> {
    let stores = Stores::from(ctx);
    let reconciler = VolumeReconciler {
        api: ctx.api.clone(),
        agents: ctx.agents.clone(),
        events: ctx.events.clone(),
        finalizer: Finalizer::new(ctx.api.clone(), stores.volumes.clone(), FINALIZER),
        stores: stores.clone(),
        node_grace: ctx.settings.node_grace,
    };
    let volumes = stores.volumes.clone();
    Controller::new("volume", stores.volumes.clone(), reconciler)
        // A VM that comes, changes or goes may take or free its volumes.
        .watches(stores.vms.clone(), move |vm| named_by(&volumes, vm))
        .workers(2)
}

/// The volumes of `vm`'s project it names, and the one it holds.
fn named_by(volumes: &Store<VolumeSpec>, vm: &nexus_api::Vm) -> Vec<ObjectKey> {
    volumes
        .by_index(BY_PROJECT, vm.metadata.project.as_deref().unwrap_or_default())
        .iter()
        .filter(|v| {
            uses_volume(vm, v.name()) || v.status.as_ref().and_then(|s| s.attached_to.as_deref()) == Some(vm.name())
        })
        .map(|v| ObjectKey::of(&**v))
        .collect()
}

impl Reconciler for VolumeReconciler {
    type Spec = VolumeSpec;
    type Error = VolumeError;

    async fn reconcile(&self, cached: Arc<Volume>) -> Result<Action, VolumeError> {
        self.finalizer
            .run(cached, |event| async move {
                match event {
                    Event::Apply(volume) => self.apply(volume).await,
                    Event::Cleanup(volume) => self.remove(volume).await,
                }
            })
            .await
    }
}

impl VolumeReconciler {
    /// Frees a volume whose holder is gone, places an unplaced one, and
    /// has its node make it.
    async fn apply(&self, volume: Volume) -> Result<Action, VolumeError> {
        let mut status = volume.status_or_default();
        if let Some(holder) = status.attached_to.clone()
            && !self.holds(&volume, &holder)
        {
            tracing::info!(volume = %volume.name(), vm = %holder, "volume freed: its VM is gone or uses it no more");
            status.attached_to = None;
            status.phase = if status.size_bytes.is_some() { VolumePhase::Available } else { VolumePhase::Pending };
            let written = self.write_status(&volume, status.clone()).await?;
            return Box::pin(self.apply(written)).await;
        }
        if matches!(status.phase, VolumePhase::Available | VolumePhase::InUse | VolumePhase::Failed) {
            return Ok(Action::AwaitChange);
        }
        let Some(node_name) = volume.spec.node_name.clone() else {
            return self.place(volume).await;
        };
        let Some(node) = self.stores.nodes.get_named("", &node_name) else {
            return self
                .wait(volume, &format!("node {node_name} does not exist; the volume is made once it joins"))
                .await;
        };
        if !node.status_view().is_ready(Utc::now(), self.node_grace) {
            return self.wait(volume, &format!("node {node_name} is not Ready")).await;
        }
        let project = volume.metadata.project.clone().unwrap_or_default();
        let image = match &volume.spec.image {
            Some(name) => {
                match crate::vm::resolve::image_path(&self.stores, &project, "spec.image", name, ImageType::Rootfs) {
                    Ok(r) => Some(ImageFile { path: r.path, sha256: r.sha256, source: r.source }),
                    Err(why) => return self.wait(volume, &why.to_string()).await,
                }
            }
            None => None,
        };
        let req = VolumeRequest {
            display_name: format!("{project}/{}", volume.name()),
            size_mib: volume.spec.size_mib,
            image,
        };
        let uid = volume.uid().to_string();
        let answer = self
            .agents
            .call(&node, |c, to| {
                let (uid, req) = (uid.clone(), req.clone());
                async move { c.ensure_volume(&to, &uid, &req).await }
            })
            .await;
        match answer {
            Ok(report) => {
                status.node_name = Some(node_name.clone());
                status.size_bytes = Some(report.size_bytes);
                status.phase = if status.attached_to.is_some() { VolumePhase::InUse } else { VolumePhase::Available };
                status.message = None;
                status.observed_generation = volume.metadata.generation;
                self.write_status(&volume, status).await?;
                let note = format!("made on node {node_name} ({} bytes)", report.size_bytes);
                self.events.publish(&volume, EventType::Normal, "Created", &note).await;
                Ok(Action::AwaitChange)
            }
            Err(AgentCallError::Rejected(body)) => {
                status.phase = VolumePhase::Failed;
                status.message = Some(body.message.clone());
                self.write_status(&volume, status).await?;
                self.events.publish(&volume, EventType::Warning, "Failed", &body.message).await;
                Ok(Action::AwaitChange)
            }
            Err(e) => Err(VolumeError::Agent(e)),
        }
    }

    /// Whether VM `holder` of the volume's project still exists and uses it.
    fn holds(&self, volume: &Volume, holder: &str) -> bool {
        let project = volume.metadata.project.as_deref().unwrap_or_default();
        self.stores.vms.get_named(project, holder).is_some_and(|vm| {
            uses_volume(&vm, volume.name())
                || vm
                    .status
                    .as_ref()
                    .and_then(|s| s.runtime.as_ref())
                    .is_some_and(|r| r.drives.iter().any(|d| d.source == format!("volume {}", volume.name())))
        })
    }

    /// Chooses a node for an unplaced volume: a Ready one holding the
    /// fewest volumes (the name breaks ties), written into its spec.
    async fn place(&self, volume: Volume) -> Result<Action, VolumeError> {
        let now = Utc::now();
        let held = |node: &str| {
            self.stores
                .volumes
                .list()
                .iter()
                .filter(|v| {
                    v.spec.node_name.as_deref() == Some(node)
                        || v.status_or_default().node_name.as_deref() == Some(node)
                })
                .count()
        };
        let mut ready: Vec<(usize, String)> = self
            .stores
            .nodes
            .list()
            .iter()
            .filter(|n| n.status_view().is_ready(now, self.node_grace))
            .map(|n| (held(n.name()), n.name().to_string()))
            .collect();
        ready.sort();
        let Some((_, node)) = ready.into_iter().next() else {
            return self.wait(volume, "no node is Ready to hold it").await;
        };
        let mut next = volume.clone();
        next.spec.node_name = Some(node.clone());
        let written = self.api.replace(&next).await?;
        self.stores.volumes.record_write(written);
        tracing::info!(volume = %volume.name(), node, "volume placed");
        Ok(Action::AwaitChange)
    }

    /// Records why the volume is not made yet; looked at again shortly.
    async fn wait(&self, volume: Volume, message: &str) -> Result<Action, VolumeError> {
        let mut status = volume.status_or_default();
        status.phase = VolumePhase::Pending;
        status.message = Some(message.to_string());
        self.write_status(&volume, status).await?;
        Ok(Action::RequeueAfter(Duration::from_secs(3)))
    }

    /// Removes the volume's file from its node (unless the node is gone
    /// for good); done once nothing of it is left there.
    async fn remove(&self, volume: Volume) -> Result<Action, VolumeError> {
        let status = volume.status_or_default();
        if let Some(holder) = status.attached_to.as_deref()
            && self.holds(&volume, holder)
        {
            // The apiserver refuses the delete while a VM uses the volume;
            // one that took it meanwhile frees it when it goes.
            return Ok(Action::RequeueAfter(Duration::from_secs(2)));
        }
        let node_name = status.node_name.or(volume.spec.node_name.clone());
        if let Some(node) = node_name.and_then(|n| self.stores.nodes.get_named("", &n)) {
            let uid = volume.uid().to_string();
            self.agents
                .call(&node, |c, to| {
                    let uid = uid.clone();
                    async move { c.delete_volume(&to, &uid).await }
                })
                .await
                .map_err(VolumeError::Agent)?;
        }
        tracing::info!(volume = %volume.name(), "volume file removed");
        Ok(Action::AwaitChange)
    }

    async fn write_status(&self, volume: &Volume, status: VolumeStatus) -> Result<Volume, VolumeError> {
        Ok(crate::runtime::status::write_status(&self.api, &self.stores.volumes, volume, status).await?)
    }
}
