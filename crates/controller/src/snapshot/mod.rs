//! The Snapshot controller: takes each Snapshot of its VM on the VM's node,
//! records what was made (files, sizes, the VM's configuration), and
//! removes the files behind a finalizer when the Snapshot is deleted.
//!
//! Phases: `Pending` (waiting for its VM to run), `Creating` (asked of the
//! node; every attempt is the same idempotent call, so a controller, agent
//! or VMM crash at any step ends in another attempt, not in a stuck
//! object), then `Ready` or `Failed` for good.
//!
//! A snapshot with `resumeAfter: false` first sets its VM's `spec.state` to
//! `Paused`, so the VM controller keeps the VM paused instead of resuming
//! it; otherwise the node resumes the VM as soon as the files are written.
//! The node holds the VM's lock throughout, so the VM controller never
//! sees the pause in between.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use nexus_api::agent::SnapshotRequest;
use nexus_api::conditions;
use nexus_api::event::EventType;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::snapshot::{Snapshot, SnapshotPhase, SnapshotStatus};
use nexus_api::vm::VmError;
use nexus_api::{ConditionStatus, NodeSpec, PowerState, SnapshotSpec, Vm, VmPhase, VmSpec};
use nexus_client::agent::AgentCallError;
use nexus_client::{Client, ClientError};

use crate::Context;
use crate::runtime::events::Recorder;
use crate::runtime::finalizer::{Event, Finalizer};
use crate::runtime::store::BY_PROJECT;
use crate::runtime::{Action, Controller, ObjectKey, Reconciler, Store};

/// Finalizer that holds a Snapshot until its files are gone from its node.
pub const FINALIZER: &str = "nexus.dev/snapshot-files";

/// How long a snapshot may stay `Creating` while its node cannot be
/// reached before it is given up as `Failed`.
pub const CREATING_DEADLINE: chrono::Duration = chrono::Duration::minutes(5);

/// Failures that send the key back to the backoff queue.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("apiserver call failed")]
    Api(#[from] ClientError),
    #[error(transparent)]
    Agent(AgentCallError),
}

/// Takes and removes snapshots.
#[derive(Debug)]
pub struct SnapshotReconciler {
    api: Client,
    agents: Arc<crate::agents::Agents>,
    events: Recorder,
    snapshots: Store<SnapshotSpec>,
    vms: Store<VmSpec>,
    nodes: Store<NodeSpec>,
    node_grace: chrono::Duration,
    finalizer: Finalizer<SnapshotSpec>,
}

/// The snapshot controller, built from `ctx`.
pub fn controller(ctx: &Context) -> Controller<SnapshotReconciler> {
    let r = &ctx.reflectors;
    let reconciler = SnapshotReconciler {
        api: ctx.api.clone(),
        agents: ctx.agents.clone(),
        events: ctx.events.clone(),
        snapshots: r.store(),
        vms: r.store(),
        nodes: r.store(),
        node_grace: ctx.settings.node_grace,
        finalizer: Finalizer::new(ctx.api.clone(), r.store(), FINALIZER),
    };
    let snaps = reconciler.snapshots.clone();
    Controller::new("snapshot", r.store::<SnapshotSpec>(), reconciler)
        // A VM that starts running (or goes) matters to its waiting snapshots.
        .watches(r.store::<VmSpec>(), move |vm| waiting_for(&snaps, vm))
        .workers(4)
}

/// Why `vm` cannot be snapshotted, if it cannot: a snapshot of a VM with a
/// Volume would make a VM restored from it write the same volume as its
/// source; one of a VM with other extra drives would have to carry each
/// drive's file, which snapshots do not yet do (docs/storage.md).
fn unsupported_drives(vm: &Vm) -> Option<String> {
    let config = vm.status.as_ref().and_then(|s| s.config.as_ref())?;
    let volumes = crate::vm::volumes::volumes_of(config);
    if let Some(volume) = volumes.first() {
        return Some(format!(
            "VM {} uses volume {volume}: a VM restored from its snapshot would write the same volume; snapshot a VM \
             without volumes",
            vm.name()
        ));
    }
    let names: Vec<&str> = config.drives.iter().map(|d| d.name.as_str()).collect();
    (!names.is_empty()).then(|| {
        format!(
            "VM {} has extra drives ({}); snapshots of VMs with extra drives are not supported yet: snapshot a VM \
             with its root drive only",
            vm.name(),
            names.join(", ")
        )
    })
}

/// The unfinished snapshots of `vm`.
fn waiting_for(snaps: &Store<SnapshotSpec>, vm: &Vm) -> Vec<ObjectKey> {
    let project = vm.metadata.project.clone().unwrap_or_default();
    snaps
        .by_index(BY_PROJECT, &project)
        .iter()
        .filter(|s| s.spec.vm_name == vm.name())
        .filter(|s| matches!(s.status_or_default().phase, SnapshotPhase::Pending | SnapshotPhase::Creating))
        .map(|s| ObjectKey::of(&**s))
        .collect()
}

impl Reconciler for SnapshotReconciler {
    type Spec = SnapshotSpec;
    type Error = SnapshotError;

    async fn reconcile(&self, cached: Arc<Snapshot>) -> Result<Action, SnapshotError> {
        self.finalizer
            .run(cached, |event| async move {
                match event {
                    Event::Apply(snap) => self.apply(snap).await,
                    Event::Cleanup(snap) => self.remove_files(snap).await,
                }
            })
            .await
    }

    fn error_policy(&self, _obj: &Snapshot, _error: &SnapshotError, failures: u32) -> Duration {
        crate::runtime::queue::Backoff::default().delay(failures)
    }
}

impl SnapshotReconciler {
    /// Takes the snapshot once its VM runs on a Ready node, and follows it
    /// until its files are complete (or it fails).
    async fn apply(&self, snap: Snapshot) -> Result<Action, SnapshotError> {
        let status = snap.status_or_default();
        if matches!(status.phase, SnapshotPhase::Ready | SnapshotPhase::Failed) {
            return Ok(Action::AwaitChange);
        }
        let creating = status.phase == SnapshotPhase::Creating;
        let project = snap.metadata.project.clone().unwrap_or_default();
        let Some(vm) = self.vms.get_named(&project, &snap.spec.vm_name) else {
            if creating {
                return self
                    .fail(&snap, "VmDeleted", "the VM was deleted before the snapshot was complete", None)
                    .await;
            }
            let message = format!("VM {} does not exist in project {project}", snap.spec.vm_name);
            return self.wait(&snap, "VmNotFound", &message).await;
        };
        if creating && status.vm_uid.as_deref().is_some_and(|u| u != vm.uid()) {
            let message = "the VM was deleted and created again before the snapshot was complete";
            return self.fail(&snap, "VmReplaced", message, None).await;
        }
        let vm_status = vm.status_or_default();
        if let Some(message) = unsupported_drives(&vm) {
            let error = VmError {
                message: message.clone(),
                fault_message: None,
                suggestion: Some("delete this snapshot; see docs/storage.md for what snapshots hold".into()),
            };
            return self.fail(&snap, "DrivesNotSupported", &message, Some(error)).await;
        }
        let node_name =
            vm.spec.node_name.clone().filter(|_| matches!(vm_status.phase, VmPhase::Running | VmPhase::Paused));
        let Some(node_name) = node_name else {
            if creating {
                // Restarting, perhaps (its VMM died mid-snapshot): give it time.
                if self.past_deadline(&status) {
                    let message = format!("the VM was not running for {} minutes", CREATING_DEADLINE.num_minutes());
                    return self.fail(&snap, "Timeout", &message, None).await;
                }
                return Ok(Action::RequeueAfter(Duration::from_secs(2)));
            }
            let message =
                format!("VM {} is {:?}; a snapshot is taken of a Running or Paused VM", vm.name(), vm_status.phase);
            return self.wait(&snap, "VmNotRunning", &message).await;
        };
        let Some(node) = self.nodes.get_named("", &node_name) else {
            return self.wait(&snap, "NodeNotFound", &format!("the VM's node {node_name} does not exist")).await;
        };
        if !node.status_view().is_ready(Utc::now(), self.node_grace) {
            if creating && self.past_deadline(&status) {
                let message = format!("node {node_name} was not Ready for {} minutes", CREATING_DEADLINE.num_minutes());
                return self.fail(&snap, "Timeout", &message, None).await;
            }
            if !creating {
                self.wait(&snap, "NodeNotReady", &format!("node {node_name} is not Ready")).await?;
            }
            return Ok(Action::RequeueAfter(Duration::from_secs(2)));
        }
        let vm = if snap.spec.resume_after { (*vm).clone() } else { self.keep_paused(&snap, &vm).await? };
        let snap = if creating { snap } else { self.start_creating(snap, &vm, &node_name).await? };
        let request =
            SnapshotRequest { vm_uid: vm.uid().to_string(), resume_after: vm.spec.state == PowerState::Running };
        let uid = snap.uid().to_string();
        let answer = self
            .agents
            .call(&node, |c, to| {
                let (uid, request) = (uid.clone(), request.clone());
                async move { c.snapshot(&to, &uid, &request).await }
            })
            .await;
        match answer {
            Ok(report) => {
                let mut status = snap.status_or_default();
                status.phase = SnapshotPhase::Ready;
                status.files = report.files;
                status.size_bytes = Some(report.size_bytes);
                status.created_at = Some(report.created_at);
                status.paused_millis = Some(report.paused_millis);
                status.mac = Some(report.mac);
                status.last_error = None;
                let message = format!(
                    "{} bytes on node {node_name}; the VM was paused for {} ms",
                    report.size_bytes, report.paused_millis
                );
                set_condition(
                    &mut status.conditions,
                    conditions::READY,
                    ConditionStatus::True,
                    conditions::reason::CREATED,
                    &message,
                );
                self.write_status(&snap, status).await?;
                self.events.publish(&snap, EventType::Normal, "Created", &message).await;
                Ok(Action::AwaitChange)
            }
            Err(AgentCallError::Rejected(body)) => {
                let error = VmError {
                    message: body.message.clone(),
                    fault_message: body.fault_message.clone(),
                    suggestion: body.suggestion.clone().or_else(|| {
                        Some(
                            "check that the VM is running and its node has room, then create the snapshot again".into(),
                        )
                    }),
                };
                self.fail(&snap, "Failed", &body.message, Some(error)).await
            }
            Err(AgentCallError::Failed(body)) if !self.past_deadline(&snap.status_or_default()) => {
                // The node could not do it now (its disk is full, say): the
                // snapshot says why while it is tried again with backoff.
                let mut status = snap.status_or_default();
                let error = VmError {
                    message: body.message.clone(),
                    fault_message: body.fault_message.clone(),
                    suggestion: body.suggestion.clone(),
                };
                if status.last_error.as_ref() != Some(&error) {
                    status.last_error = Some(error);
                    self.write_status(&snap, status).await?;
                    let note = match &body.suggestion {
                        Some(s) => format!("{}; {s}", body.message),
                        None => body.message.clone(),
                    };
                    self.events.publish(&snap, EventType::Warning, &body.error, &note).await;
                }
                Err(SnapshotError::Agent(AgentCallError::Failed(body)))
            }
            Err(e) if self.past_deadline(&snap.status_or_default()) => {
                let message = format!("node {node_name} did not take the snapshot: {e}");
                self.fail(&snap, "Timeout", &message, None).await
            }
            Err(e) => Err(SnapshotError::Agent(e)),
        }
    }

    /// Whether `status` has been `Creating` for longer than the deadline.
    fn past_deadline(&self, status: &SnapshotStatus) -> bool {
        find_condition(&status.conditions, conditions::READY)
            .filter(|c| c.reason == conditions::reason::CREATING)
            .is_some_and(|c| Utc::now() - c.last_transition_time > CREATING_DEADLINE)
    }

    /// Sets the VM's desired state to Paused for a snapshot that leaves it
    /// so; returns the VM as written.
    async fn keep_paused(&self, snap: &Snapshot, vm: &Vm) -> Result<Vm, SnapshotError> {
        if vm.spec.state != PowerState::Running {
            return Ok(vm.clone());
        }
        let mut next = vm.clone();
        next.spec.state = PowerState::Paused;
        let written = self.api.replace(&next).await?;
        self.vms.record_write(written.clone());
        let message = format!("paused for snapshot {} (resumeAfter: false)", snap.name());
        self.events.publish(&written, EventType::Normal, "Paused", &message).await;
        Ok(written)
    }

    /// Records that the node is asked: the VM it is of, its configuration.
    async fn start_creating(&self, snap: Snapshot, vm: &Vm, node: &str) -> Result<Snapshot, SnapshotError> {
        let vm_status = vm.status_or_default();
        let mut status = snap.status_or_default();
        status.phase = SnapshotPhase::Creating;
        status.observed_generation = snap.metadata.generation;
        status.node_name = Some(node.to_string());
        status.vm_uid = Some(vm.uid().to_string());
        status.vm_generation = vm.metadata.generation;
        status.config = vm_status.config.clone();
        let message = format!("taking a snapshot of VM {} on node {node}", vm.name());
        // Unknown while in progress: its transition time is when it began.
        set_condition(
            &mut status.conditions,
            conditions::READY,
            ConditionStatus::Unknown,
            conditions::reason::CREATING,
            &message,
        );
        let written = self.write_status(&snap, status).await?;
        self.events.publish(&written, EventType::Normal, "Creating", &message).await;
        Ok(written)
    }

    /// Records why the snapshot waits (Pending); its VM's changes bring it
    /// back.
    async fn wait(&self, snap: &Snapshot, reason: &str, message: &str) -> Result<Action, SnapshotError> {
        let mut status = snap.status_or_default();
        let was = find_condition(&status.conditions, conditions::READY).map(|c| c.message.clone());
        if was.as_deref() != Some(message) {
            self.events.publish(snap, EventType::Normal, reason, message).await;
        }
        set_condition(&mut status.conditions, conditions::READY, ConditionStatus::False, reason, message);
        status.observed_generation = snap.metadata.generation;
        self.write_status(snap, status).await?;
        Ok(Action::RequeueAfter(Duration::from_secs(30)))
    }

    /// Marks the snapshot Failed for good.
    async fn fail(
        &self,
        snap: &Snapshot,
        reason: &str,
        message: &str,
        error: Option<VmError>,
    ) -> Result<Action, SnapshotError> {
        let mut status = snap.status_or_default();
        status.phase = SnapshotPhase::Failed;
        status.last_error = Some(error.unwrap_or_else(|| VmError {
            message: message.to_string(),
            fault_message: None,
            suggestion: Some("delete this snapshot and create it again".into()),
        }));
        set_condition(&mut status.conditions, conditions::READY, ConditionStatus::False, reason, message);
        self.write_status(snap, status).await?;
        self.events.publish(snap, EventType::Warning, reason, message).await;
        tracing::warn!(snapshot = %snap.name(), reason, message, "snapshot failed");
        Ok(Action::AwaitChange)
    }

    /// Removes the files on the node that took it and on every node holding
    /// a copy (unless the node is gone for good); the finalizer goes after.
    async fn remove_files(&self, snap: Snapshot) -> Result<Action, SnapshotError> {
        let status = snap.status_or_default();
        let holders = status.node_name.into_iter().chain(status.copies);
        for node in holders.filter_map(|n| self.nodes.get_named("", &n)) {
            let uid = snap.uid().to_string();
            self.agents
                .call(&node, |c, to| {
                    let uid = uid.clone();
                    async move { c.delete_snapshot(&to, &uid).await }
                })
                .await
                .map_err(SnapshotError::Agent)?;
        }
        tracing::info!(snapshot = %snap.name(), "snapshot files removed");
        Ok(Action::AwaitChange)
    }

    /// Writes `status` (see [`crate::runtime::status::write_status`]);
    /// returns the object as written.
    async fn write_status(&self, snap: &Snapshot, status: SnapshotStatus) -> Result<Snapshot, SnapshotError> {
        Ok(crate::runtime::status::write_status(&self.api, &self.snapshots, snap, status).await?)
    }
}
