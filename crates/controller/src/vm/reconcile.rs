//! One reconcile of a VM: its expiry, its finalizer, the resolution of its
//! configuration, its placement when it has none, and its convergence
//! through its node's agent, with what the agent reports written to status.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use nexus_api::conditions::{self, reason};
use nexus_api::event::EventType;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::vm::ResolvedConfig;
use nexus_api::{ConditionStatus, Vm, VmPhase, VmSpec, VmStatus};
use nexus_client::agent::AgentCallError;

use super::placement::Placement;
use super::{PROBE_RECHECK, ReconcileError, VmReconciler, resolve, status};
use crate::runtime::Action;
use crate::runtime::finalizer::Event;

impl VmReconciler {
    /// Reconciles `cached`, deleting it once its `status.expiresAt` passed
    /// and coming back at that deadline at the latest.
    pub(super) async fn reconcile_vm(&self, cached: Arc<Vm>) -> Result<Action, ReconcileError> {
        let expires = cached.status.as_ref().and_then(|s| s.expires_at);
        if let Some(at) = expires
            && cached.metadata.deletion_timestamp.is_none()
        {
            let left = at - Utc::now();
            if left <= chrono::Duration::zero() {
                return self.expire(&cached).await;
            }
            // Back at the deadline at the latest, whatever the VM is doing.
            let by_then = left.to_std().unwrap_or_default();
            return Ok(match self.reconcile_now(cached).await? {
                Action::RequeueAfter(d) => Action::RequeueAfter(d.min(by_then)),
                Action::AwaitChange => Action::RequeueAfter(by_then),
            });
        }
        self.reconcile_now(cached).await
    }

    /// Deletes a VM whose `status.expiresAt` has passed, with an `Expired`
    /// Event; its finalizer then takes it off its node.
    async fn expire(&self, vm: &Vm) -> Result<Action, ReconcileError> {
        let status = vm.status_or_default();
        let why = match (&vm.spec.lifetime, vm.spec.ttl_seconds_after_finished) {
            (_, Some(ttl)) if matches!(status.phase, VmPhase::Succeeded | VmPhase::Failed) => {
                format!("finished {ttl}s ago (spec.ttlSecondsAfterFinished); deleting it")
            }
            (Some(life), _) => format!("its lifetime of {life} ran out (spec.lifetime); deleting it"),
            _ => "it reached status.expiresAt; deleting it".to_string(),
        };
        self.events.publish(vm, EventType::Normal, "Expired", &why).await;
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        match self.api.delete::<VmSpec>(project, vm.name()).await {
            Ok(_) => Ok(Action::AwaitChange),
            Err(e) if e.is_not_found() => Ok(Action::AwaitChange),
            Err(e) => Err(e.into()),
        }
    }

    /// One pass towards the VM's spec, through its finalizer.
    async fn reconcile_now(&self, cached: Arc<Vm>) -> Result<Action, ReconcileError> {
        self.finalizer
            .run(cached, |event| async move {
                match event {
                    Event::Cleanup(vm) => {
                        self.verified.forget(vm.uid());
                        Box::pin(self.tear_down(vm)).await
                    }
                    Event::Apply(vm) => Box::pin(self.apply(vm)).await,
                }
            })
            .await
    }

    /// Resolves, places (when unplaced) and converges a live VM.
    async fn apply(&self, mut vm: Vm) -> Result<Action, ReconcileError> {
        let Some(config) = self.resolve(&mut vm).await? else {
            return Ok(Action::RequeueAfter(Duration::from_secs(5)));
        };
        if let Some(waiting) = self.take_volumes(&vm, &config).await? {
            return Ok(waiting);
        }
        if vm.spec.node_name.is_none() {
            match self.schedule(vm, &config).await? {
                Placement::Bound(bound) => vm = *bound,
                Placement::Not(action) => return Ok(action),
            }
        }
        Box::pin(self.converge(vm, config)).await
    }

    /// Drives a VM bound to a node towards its spec through the node's
    /// agent, and writes what the agent reports.
    async fn converge(&self, mut vm: Vm, config: ResolvedConfig) -> Result<Action, ReconcileError> {
        let node_name = vm.spec.node_name.clone().unwrap_or_default();
        let Some(node) = self.stores.nodes.get_named("", &node_name) else {
            return self.node_gone(vm, &node_name).await;
        };
        let current = vm.status_or_default();
        if matches!(current.phase, VmPhase::Failed | VmPhase::Succeeded)
            && current.observed_generation == vm.metadata.generation
            && !self.images_changed_since_refusal(&vm, &config)
        {
            // Finished, or failed for good: wait for the spec to change, no hot
            // loop; its node's readiness no longer concerns it.
            return Ok(Action::AwaitChange);
        }
        let node_status = node.status_view();
        if !node_status.is_ready(Utc::now(), self.node_grace) {
            self.write_waiting(&vm, reason::NODE_NOT_READY, &format!("node {node_name} is not Ready")).await?;
            return Ok(Action::RequeueAfter(Duration::from_secs(2)));
        }
        let config = if self.images_changed_since_refusal(&vm, &config) {
            // Its Image was fixed since the node refused it: resolve again.
            let mut status = vm.status_or_default();
            status.config = None;
            vm.status = Some(status);
            match self.resolve(&mut vm).await? {
                Some(c) => c,
                None => return Ok(Action::RequeueAfter(Duration::from_secs(5))),
            }
        } else {
            config
        };
        // A guest whose probe has not passed is looked at every half second.
        let period = self.recheck_period(&vm, vm.status.as_ref());
        if let Some(left) = self.verified.remaining(&vm, period, &node_status.vmm_exits) {
            // Woken by our own write of the agent's fresh report.
            return Ok(Action::RequeueAfter(left));
        }
        let mut desired = status::ensure_request(&vm, &config);
        self.name_snapshot_origin(&mut desired, &config, &node_name);
        let _slot = self.per_node.slot(&node_name).await;
        let answer = self
            .agents
            .call(&node, |c, to| {
                let d = desired.clone();
                async move { c.ensure(&to, &d).await }
            })
            .await;
        match answer {
            Ok(report) if !status::converging(&vm, &report) => {
                // The VMM ended between the agent's work and its report: not
                // a stop. Ask again (the agent applies the restart policy).
                Err(ReconcileError::VmmGone(report.runtime.pid.unwrap_or_default()))
            }
            Ok(report) => {
                let after = status::with_expiry(&vm, status::observed(&vm, &node_name, &report), Utc::now());
                let event = status::transition_event(&vm, &current, &after, &node_name, &report);
                self.write_status(&vm, after.clone()).await?;
                self.verified.record(&vm, &after, &node_status.vmm_exits);
                if after.phase == VmPhase::Running {
                    self.note_snapshot_copy(&vm, &config, &node_name).await?;
                }
                if let Some((type_, reason, message)) = event {
                    self.events.publish(&vm, type_, reason, &message).await;
                }
                Ok(Action::RequeueAfter(self.recheck_period(&vm, Some(&after))))
            }
            Err(AgentCallError::Rejected(body)) => {
                tracing::warn!(vm = %vm.name(), error = %body, "VM failed permanently");
                let why = if body.error == reason::IMAGE_INVALID { reason::IMAGE_INVALID } else { reason::FAILED };
                self.events.publish(&vm, EventType::Warning, why, &status::refusal_message(&body)).await;
                self.write_status(&vm, status::with_expiry(&vm, status::refused(&vm, &node_name, &body), Utc::now()))
                    .await?;
                if body.error == reason::IMAGE_INVALID {
                    self.mark_image_invalid(&vm, &config, &node_name, &body.message).await?;
                }
                Ok(Action::AwaitChange)
            }
            Err(AgentCallError::Failed(body)) => {
                // The agent says why it could not do it (a full disk, a VMM
                // that does not answer): the VM says so too, until it can.
                let mut status = current;
                let message = match &body.suggestion {
                    Some(s) => format!("{}; {s}", body.message),
                    None => body.message.clone(),
                };
                set_condition(&mut status.conditions, conditions::READY, ConditionStatus::False, &body.error, &message);
                self.write_status(&vm, status).await?;
                self.events.publish(&vm, EventType::Warning, &body.error, &message).await;
                Err(ReconcileError::Agent(AgentCallError::Failed(body)))
            }
            Err(e) => {
                // Whatever the agent's trouble, the placement is worth showing.
                self.write_status(&vm, current).await?;
                Err(ReconcileError::Agent(e))
            }
        }
    }

    /// How long a VM with `status` stays unchecked: the recheck period, or
    /// half a second while its readiness probe has not passed.
    fn recheck_period(&self, vm: &Vm, status: Option<&VmStatus>) -> Duration {
        if status::probing(vm, status) { self.recheck.min(PROBE_RECHECK) } else { self.recheck }
    }

    /// Whether `vm` was refused for an invalid image and one of its Images
    /// changed since (so it may work now).
    fn images_changed_since_refusal(&self, vm: &Vm, config: &ResolvedConfig) -> bool {
        let status = vm.status_or_default();
        let refused =
            find_condition(&status.conditions, conditions::READY).is_some_and(|c| c.reason == reason::IMAGE_INVALID);
        if !refused || status.phase != VmPhase::Failed {
            return false;
        }
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let now = |named: &Option<String>| {
            named.as_deref().and_then(|n| n.split_once('@')).map(|(name, _)| {
                self.stores
                    .images
                    .get_named(project, name)
                    .map(|i| format!("{}@{}", i.name(), i.metadata.generation.unwrap_or_default()))
            })
        };
        now(&config.kernel_image).is_some_and(|n| n.as_ref() != config.kernel_image.as_ref())
            || now(&config.rootfs_image).is_some_and(|n| n.as_ref() != config.rootfs_image.as_ref())
    }

    /// Records on the Image a node found different from what it says.
    async fn mark_image_invalid(
        &self,
        vm: &Vm,
        config: &ResolvedConfig,
        node: &str,
        message: &str,
    ) -> Result<(), ReconcileError> {
        let named = if message.starts_with("kernel") { &config.kernel_image } else { &config.rootfs_image };
        let Some((name, _)) = named.as_deref().and_then(|n| n.split_once('@')) else { return Ok(()) };
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let Some(image) = self.stores.images.get_named(project, name) else { return Ok(()) };
        let mut status = image.status_or_default();
        status.phase = nexus_api::image::ImagePhase::Invalid;
        status.observed_generation = image.metadata.generation;
        status.message = Some(format!("on node {node}: {message}"));
        if image.status.as_ref() == Some(&status) {
            return Ok(());
        }
        match crate::runtime::status::write_status(&self.api, &self.stores.images, &image, status).await {
            Ok(_) => {
                let note = format!("on node {node}: {message}");
                self.events.publish(&*image, EventType::Warning, reason::IMAGE_INVALID, &note).await;
                Ok(())
            }
            // Changed meanwhile (perhaps fixed): its change brings the VM back.
            Err(e) if e.is_conflict() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The configuration `vm` runs with, recorded into its in-memory status
    /// (written with the next status write). Resolved again when the spec
    /// changed; when that fails, a VM that already has a configuration keeps
    /// it (so it can still be stopped or deleted) and one that has none waits.
    pub(super) async fn resolve(&self, vm: &mut Vm) -> Result<Option<ResolvedConfig>, ReconcileError> {
        let mut status = vm.status_or_default();
        if let Some(config) = status.config.as_ref().filter(|c| Some(c.generation) == vm.metadata.generation) {
            return Ok(Some(config.clone()));
        }
        match resolve::resolve(vm, &self.stores) {
            Ok(config) => {
                let what = config.template.as_deref().map(|t| format!("from template {t}")).unwrap_or_default();
                set_condition(
                    &mut status.conditions,
                    conditions::RESOLVED,
                    ConditionStatus::True,
                    reason::RESOLVED,
                    format!("{} vCPU, {} MiB {what}", config.vcpu, config.mem_mib).trim_end(),
                );
                status.template = self.template_view(vm, &config);
                status.config = Some(config.clone());
                vm.status = Some(status);
                Ok(Some(config))
            }
            Err(why) => {
                let message = why.to_string();
                let was = find_condition(&status.conditions, conditions::RESOLVED).map(|c| c.message.clone());
                if was.as_deref() != Some(message.as_str()) {
                    self.events.publish(vm, EventType::Warning, why.reason(), &message).await;
                }
                set_condition(
                    &mut status.conditions,
                    conditions::RESOLVED,
                    ConditionStatus::False,
                    why.reason(),
                    &message,
                );
                let kept = status.config.clone();
                vm.status = Some(status.clone());
                if kept.is_none() {
                    self.write_status(vm, status).await?;
                }
                Ok(kept)
            }
        }
    }

    /// The template `vm` was resolved from (`config.template`), with what
    /// the VM overrides of it.
    fn template_view(&self, vm: &Vm, config: &ResolvedConfig) -> Option<nexus_api::template::TemplateView> {
        let (name, revision) = config.template.as_deref()?.split_once('@')?;
        let project = vm.metadata.project.as_deref().unwrap_or_default();
        let template = self.stores.templates.get_named(project, name)?;
        Some(nexus_api::template::TemplateView {
            name: name.to_string(),
            revision: revision.parse().unwrap_or_default(),
            overrides: nexus_api::template::overrides(&template.spec, &vm.spec),
        })
    }

    /// Records on `vm` why it waits (its `Ready` condition Unknown).
    pub(super) async fn write_waiting(&self, vm: &Vm, why: &str, message: &str) -> Result<(), ReconcileError> {
        let mut status = vm.status_or_default();
        set_condition(&mut status.conditions, conditions::READY, ConditionStatus::Unknown, why, message);
        self.write_status(vm, status).await
    }

    /// Writes `status` for `vm` (see [`crate::runtime::status::write_status`]).
    pub(super) async fn write_status(&self, vm: &Vm, status: VmStatus) -> Result<(), ReconcileError> {
        crate::runtime::status::write_status(&self.api, &self.stores.vms, vm, status).await?;
        Ok(())
    }
}

/// When to try a VM again after `error`, the `failures`-th in a row.
pub fn backoff(error: &ReconcileError, failures: u32) -> Duration {
    match error {
        // The agent restarts it on the next call: come back at once.
        ReconcileError::VmmGone(_) if failures < 5 => Duration::from_millis(50),
        _ => crate::runtime::queue::Backoff::default().delay(failures),
    }
}
