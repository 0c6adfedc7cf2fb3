//! The VMPool controller: keeps `replicas` VMs made from the pool's VM
//! template, and rolls a changed template out step by step behind the
//! health gate ([`plan`] decides; this module reads and writes).
//!
//! - The pool owns its VMs by owner reference and labels them with its
//!   name and their revision; the scheduler spreads one pool's VMs over
//!   the nodes before it looks at load.
//! - A VM deleted by hand, or one that expired or ended, is replaced; a VM
//!   whose labels no longer match the selector leaves the pool (its owner
//!   reference is removed) and is replaced.
//! - Deleting the pool deletes its VMs first, behind a finalizer.

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use nexus_api::conditions;
use nexus_api::event::EventType;
use nexus_api::meta::{OwnerReference, find_condition, set_condition};
use nexus_api::pool::{POOL_LABEL, REVISION_LABEL, VmPool, VmPoolStatus};
use nexus_api::{ConditionStatus, ResourceSpec, Vm, VmPoolSpec, VmSpec};
use nexus_client::{Client, ClientError};

use crate::Context;
use crate::runtime::events::Recorder;
use crate::runtime::finalizer::{Event, Finalizer};
use crate::runtime::store::BY_OWNER;
use crate::runtime::{Action, Controller, Reconciler, Store};
use plan::Member;

/// Finalizer that holds a pool until its VMs are gone.
pub const FINALIZER: &str = "nexus.dev/pool-vms";

/// Annotation on a pool's VM: the number of the revision it was made from.
pub const REVISION_ANNOTATION: &str = "nexus.dev/pool-revision-number";

/// Failures that send the key back to the backoff queue.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("apiserver call failed")]
    Api(#[from] ClientError),
}

/// Keeps pools' VMs and rolls them out.
#[derive(Debug)]
pub struct PoolReconciler {
    api: Client,
    events: Recorder,
    pools: Store<VmPoolSpec>,
    vms: Store<VmSpec>,
    finalizer: Finalizer<VmPoolSpec>,
}

/// The VMPool controller, built from `ctx`.
pub fn controller(ctx: &Context) -> Controller<PoolReconciler> {
    let r = &ctx.reflectors;
    let reconciler = PoolReconciler {
        api: ctx.api.clone(),
        events: ctx.events.clone(),
        pools: r.store(),
        vms: r.store(),
        finalizer: Finalizer::new(ctx.api.clone(), r.store(), FINALIZER),
    };
    Controller::new("vmpool", r.store::<VmPoolSpec>(), reconciler).owns(r.store::<VmSpec>()).workers(4)
}

impl Reconciler for PoolReconciler {
    type Spec = VmPoolSpec;
    type Error = PoolError;

    async fn reconcile(&self, cached: Arc<VmPool>) -> Result<Action, PoolError> {
        self.finalizer
            .run(cached, |event| async move {
                match event {
                    Event::Apply(pool) => self.apply(pool).await,
                    Event::Cleanup(pool) => self.delete_all(pool).await,
                }
            })
            .await
    }
}

impl PoolReconciler {
    /// Keeps the pool's VMs at its replicas and moves its rollout on.
    async fn apply(&self, pool: VmPool) -> Result<Action, PoolError> {
        let mut members = Vec::new();
        for vm in self.owned(&pool) {
            if vm.is_deleting() {
                continue;
            }
            if pool.spec.selector.iter().all(|(k, v)| vm.metadata.labels.get(k) == Some(v)) {
                members.push(member(&vm));
            } else {
                self.release(&pool, &vm).await?;
            }
        }
        let plan = plan::plan(&pool, &members, Utc::now());
        for name in &plan.delete {
            self.delete_vm(&pool, name).await?;
        }
        let mut status = plan.status.clone();
        let mut refused = None;
        for hash in &plan.create {
            if let Err(why) = self.create_vm(&pool, hash, &status).await? {
                refused = Some(why);
                break;
            }
        }
        // A VM the apiserver refuses (a quota, say) is worth a condition.
        let (failure, reason, message) = match &refused {
            Some(why) => (ConditionStatus::True, "FailedCreate", why.as_str()),
            None => (ConditionStatus::False, "Created", ""),
        };
        set_condition(&mut status.conditions, conditions::REPLICA_FAILURE, failure, reason, message);
        if let Some(why) = &refused {
            self.events.publish(&pool, EventType::Warning, "FailedCreate", why).await;
        }
        for (type_, reason, message) in &plan.events {
            self.events.publish(&pool, *type_, reason, message).await;
        }
        self.write_status(&pool, status).await?;
        let retry = refused.map(|_| Duration::from_secs(5));
        Ok(match (plan.requeue, retry) {
            (Some(a), Some(b)) => Action::RequeueAfter(a.min(b)),
            (a, b) => a.or(b).map_or(Action::AwaitChange, Action::RequeueAfter),
        })
    }
}

/// How the plan sees `vm`.
fn member(vm: &Vm) -> Member {
    let status = vm.status_or_default();
    let ready = find_condition(&status.conditions, conditions::READY);
    Member {
        name: vm.name().to_string(),
        revision: vm.metadata.labels.get(REVISION_LABEL).cloned().unwrap_or_default(),
        created: vm.metadata.creation_timestamp.unwrap_or_else(Utc::now),
        phase: status.phase,
        ready_since: ready.filter(|c| c.status == ConditionStatus::True).map(|c| c.last_transition_time),
        why: match ready {
            Some(c) => format!("{}: {}", c.reason, c.message),
            None => format!("{}, not Ready yet", status.phase),
        },
    }
}

impl PoolReconciler {
    /// The VMs `pool` owns, from the store.
    fn owned(&self, pool: &VmPool) -> Vec<Arc<Vm>> {
        self.vms
            .by_index(BY_OWNER, pool.uid())
            .into_iter()
            .filter(|vm| vm.metadata.project == pool.metadata.project)
            .filter(|vm| vm.metadata.owner_references.iter().any(|o| o.kind == VmPoolSpec::KIND && o.uid == pool.uid()))
            .collect()
    }

    /// Makes one VM of revision `hash`. `Ok(Err(why))` when the apiserver
    /// refuses it for a reason a retry will not fix soon.
    async fn create_vm(
        &self,
        pool: &VmPool,
        hash: &str,
        status: &VmPoolStatus,
    ) -> Result<Result<(), String>, PoolError> {
        let Some(revision) = status.revisions.iter().find(|r| r.hash == hash) else { return Ok(Ok(())) };
        let template = &revision.template;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let stem = pool.name().chars().take(56).collect::<String>();
        let name = format!("{}-{}", stem.trim_end_matches('-'), &suffix[..6]);
        let mut vm = Vm::new(&name, pool.metadata.project.as_deref(), template.spec.clone());
        vm.metadata.labels = template.metadata.labels.clone();
        vm.metadata.labels.insert(POOL_LABEL.into(), pool.name().into());
        vm.metadata.labels.insert(REVISION_LABEL.into(), hash.into());
        vm.metadata.annotations = template.metadata.annotations.clone();
        vm.metadata.annotations.insert(REVISION_ANNOTATION.into(), revision.revision.to_string());
        vm.metadata.owner_references =
            vec![OwnerReference { kind: VmPoolSpec::KIND.into(), name: pool.name().into(), uid: pool.uid().into() }];
        match self.api.create(&vm).await {
            Ok(created) => {
                tracing::info!(pool = %pool.name(), vm = %name, revision = revision.revision, "created VM");
                self.vms.record_write(created);
                Ok(Ok(()))
            }
            Err(e) if matches!(e.status(), Some(400..=499)) && !matches!(e.status(), Some(409 | 429)) => {
                Ok(Err(format!("creating VM {name}: {e}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes VM `name` of `pool`.
    async fn delete_vm(&self, pool: &VmPool, name: &str) -> Result<(), PoolError> {
        let project = pool.metadata.project.as_deref().unwrap_or_default();
        match self.api.delete::<VmSpec>(project, name).await {
            Ok(vm) => {
                tracing::info!(pool = %pool.name(), vm = %name, "deleted VM");
                // Still there behind its finalizer: the next pass must see
                // it going, not count it again.
                if vm.is_deleting() {
                    self.vms.record_write(vm);
                }
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes `vm` out of `pool`: it keeps running, without an owner.
    async fn release(&self, pool: &VmPool, vm: &Vm) -> Result<(), PoolError> {
        let mut next = vm.clone();
        next.metadata.owner_references.retain(|o| o.uid != pool.uid());
        next.metadata.labels.remove(REVISION_LABEL);
        match self.api.replace(&next).await {
            Ok(written) => {
                let message = format!("VM {} no longer matches the selector; it left the pool", vm.name());
                self.events.publish(pool, EventType::Normal, "Released", &message).await;
                self.vms.record_write(written);
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every VM of a deleted pool; done (and the pool let go) once
    /// none is left.
    async fn delete_all(&self, pool: VmPool) -> Result<Action, PoolError> {
        let owned = self.owned(&pool);
        for vm in owned.iter().filter(|vm| !vm.is_deleting()) {
            self.delete_vm(&pool, vm.name()).await?;
        }
        if !owned.is_empty() {
            // Back when the last one is gone (each deletion wakes us).
            return Ok(Action::RequeueAfter(Duration::from_secs(2)));
        }
        Ok(Action::AwaitChange)
    }

    /// Writes `status` (see [`crate::runtime::status::write_status`]).
    async fn write_status(&self, pool: &VmPool, status: VmPoolStatus) -> Result<(), PoolError> {
        crate::runtime::status::write_status(&self.api, &self.pools, pool, status).await?;
        Ok(())
    }
}
