//! The quota controller: keeps each ResourceQuota's `status.used` equal to
//! what its project holds, for `nexusctl get quota` and `describe`. (The
//! limits themselves are enforced by the apiserver, atomically, at write
//! time; this only reports.)

use std::sync::Arc;

use nexus_api::quota::{Holdings, ResourceQuota, ResourceQuotaSpec, usage};
use nexus_api::{ImageSpec, Object, ResourceSpec, SnapshotSpec, TemplateSpec, VmSpec, VolumeSpec};
use nexus_client::{Client, ClientError};

use crate::Context;
use crate::runtime::store::BY_PROJECT;
use crate::runtime::{Action, Controller, ObjectKey, Reconciler, Store};

/// Reports what each project holds.
#[derive(Debug)]
pub struct QuotaReconciler {
    api: Client,
    vms: Store<VmSpec>,
    templates: Store<TemplateSpec>,
    snapshots: Store<SnapshotSpec>,
    volumes: Store<VolumeSpec>,
    images: Store<ImageSpec>,
    quotas: Store<ResourceQuotaSpec>,
}

/// The quotas of `obj`'s project.
fn quotas_of<S: ResourceSpec>(quotas: &Store<ResourceQuotaSpec>, obj: &Object<S>) -> Vec<ObjectKey> {
    let project = obj.metadata.project.clone().unwrap_or_default();
    quotas.by_index(BY_PROJECT, &project).iter().map(|q| ObjectKey::of(&**q)).collect()
}

/// The quota controller, built from `ctx`.
pub fn controller(ctx: &Context) -> Controller<QuotaReconciler> {
    let r = &ctx.reflectors;
    let reconciler = QuotaReconciler {
        api: ctx.api.clone(),
        vms: r.store(),
        templates: r.store(),
        snapshots: r.store(),
        volumes: r.store(),
        images: r.store(),
        quotas: r.store(),
    };
    let q = reconciler.quotas.clone();
    let (q1, q2, q3, q4, q5) = (q.clone(), q.clone(), q.clone(), q.clone(), q);
    Controller::new("quota", r.store::<ResourceQuotaSpec>(), reconciler)
        .watches(r.store::<VmSpec>(), move |o| quotas_of(&q1, o))
        .watches(r.store::<TemplateSpec>(), move |o| quotas_of(&q2, o))
        .watches(r.store::<SnapshotSpec>(), move |o| quotas_of(&q3, o))
        .watches(r.store::<VolumeSpec>(), move |o| quotas_of(&q4, o))
        .watches(r.store::<ImageSpec>(), move |o| quotas_of(&q5, o))
        .workers(2)
}

impl Reconciler for QuotaReconciler {
    type Spec = ResourceQuotaSpec;
    type Error = ClientError;

    async fn reconcile(&self, quota: Arc<ResourceQuota>) -> Result<Action, ClientError> {
        let project = quota.metadata.project.clone().unwrap_or_default();
        let vms = self.vms.by_index(BY_PROJECT, &project);
        let templates = self.templates.by_index(BY_PROJECT, &project);
        let snapshots = self.snapshots.by_index(BY_PROJECT, &project);
        let volumes = self.volumes.by_index(BY_PROJECT, &project);
        let images = self.images.by_index(BY_PROJECT, &project);
        let (vms, templates, snapshots, volumes, images) = (
            vms.iter().map(|v| &**v).collect::<Vec<_>>(),
            templates.iter().map(|t| &**t).collect::<Vec<_>>(),
            snapshots.iter().map(|s| &**s).collect::<Vec<_>>(),
            volumes.iter().map(|v| &**v).collect::<Vec<_>>(),
            images.iter().map(|i| &**i).collect::<Vec<_>>(),
        );
        let used = usage(&Holdings {
            vms: &vms,
            templates: &templates,
            snapshots: &snapshots,
            volumes: &volumes,
            images: &images,
        });
        let mut status = quota.status_or_default();
        if status.used == used && status.observed_generation == quota.metadata.generation {
            return Ok(Action::AwaitChange);
        }
        status.used = used;
        status.observed_generation = quota.metadata.generation;
        let mut next = (*quota).clone();
        next.status = Some(status);
        match self.api.replace_status(&next).await {
            Ok(written) => self.quotas.record_write(written),
            // Changed meanwhile: its change brings it back.
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e),
        }
        Ok(Action::AwaitChange)
    }
}
