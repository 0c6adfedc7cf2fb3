//! What the VM controller writes, as pure functions of what it read: the
//! status an agent report amounts to, the event a phase change deserves,
//! the status of a VM its agent refused, and the request an agent gets.

use chrono::{DateTime, Utc};
use nexus_api::agent::{EnsureVm, ObservedState, VmReport};
use nexus_api::conditions;
use nexus_api::event::EventType;
use nexus_api::guest::GuestIdentity;
use nexus_api::meta::set_condition;
use nexus_api::vm::{ResolvedConfig, VmError, mac_from_uid};
use nexus_api::{ConditionStatus, ErrorBody, Vm, VmPhase, VmStatus};

/// An event to record: its type, reason and message.
pub type EventNote = (EventType, &'static str, String);

/// The agent request realising `vm` with its resolved `config`.
pub fn ensure_request(vm: &Vm, config: &ResolvedConfig) -> EnsureVm {
    let project = vm.metadata.project.as_deref().unwrap_or_default();
    let network = config.network.as_ref();
    EnsureVm {
        uid: vm.uid().to_string(),
        display_name: format!("{project}/{}", vm.name()),
        state: vm.spec.state,
        vcpu: config.vcpu,
        mem_mib: config.mem_mib,
        kernel_path: config.kernel_path.clone(),
        rootfs_path: config.rootfs_path.clone(),
        boot_args: config.boot_args.clone(),
        mac: network.and_then(|n| n.mac.clone()).unwrap_or_else(|| mac_from_uid(vm.uid())),
        ip: network.and_then(|n| n.ip.clone()),
        restore: config
            .restore
            .as_ref()
            .map(|r| nexus_api::agent::RestoreFrom { snapshot_uid: r.snapshot_uid.clone(), origin: None }),
        restart_policy: vm.spec.restart_policy,
        kernel_sha256: config.kernel_sha256.clone(),
        rootfs_sha256: config.rootfs_sha256.clone(),
        kernel_source: config.kernel_source.clone(),
        rootfs_source: config.rootfs_source.clone(),
        initrd_path: config.initrd_path.clone(),
        initrd_sha256: config.initrd_sha256.clone(),
        initrd_source: config.initrd_source.clone(),
        probe: vm.spec.readiness_probe.clone(),
        generation: vm.metadata.generation.unwrap_or_default(),
        drives: config.drives.clone(),
        rootfs_rate_limiter: config.rootfs_rate_limiter.clone(),
        network_limits: network.and_then(|n| n.rate_limiter.clone()),
        guest: Some(GuestIdentity {
            name: vm.name().to_string(),
            project: project.to_string(),
            node: vm.spec.node_name.clone().unwrap_or_default(),
            labels: vm.metadata.labels.clone(),
            config: config.guest.clone(),
        }),
    }
}

/// Whether `vm`, with `status`, has a readiness probe its node has not
/// seen pass yet (it is looked at again sooner than a converged VM).
pub fn probing(vm: &Vm, status: Option<&VmStatus>) -> bool {
    vm.spec.readiness_probe.is_some()
        && status.is_some_and(|s| {
            s.phase == VmPhase::Running
                && !nexus_api::meta::find_condition(&s.conditions, conditions::READY)
                    .is_some_and(|c| c.status == ConditionStatus::True)
        })
}

/// Whether `report` is an answer to converge on: anything but "no VMM"
/// for a VM that should have one (its VMM ended between the agent's work
/// and its report, and the agent has not applied the restart policy yet).
pub fn converging(vm: &Vm, report: &VmReport) -> bool {
    let no_vmm = matches!(report.state, ObservedState::Stopped | ObservedState::Absent);
    !(no_vmm && vm.spec.state != nexus_api::PowerState::Stopped)
}

/// The status of `vm` once its node `node` reported `report`, from the
/// status it had.
/// `status` with its deadline (`expiresAt`): the VM's first start plus its
/// `spec.lifetime` (kept once set: restarts do not extend it), or when it
/// finished plus its `spec.ttlSecondsAfterFinished`, whichever is sooner.
pub fn with_expiry(vm: &Vm, mut status: VmStatus, now: DateTime<Utc>) -> VmStatus {
    let started = status.runtime.as_ref().and_then(|r| r.started_at);
    let lifetime = vm.spec.lifetime.as_deref().and_then(nexus_api::validation::parse_duration);
    let by_lifetime = match (status.expires_at, lifetime, started) {
        (Some(at), _, _) => Some(at),
        (None, Some(life), Some(started)) => chrono::Duration::from_std(life).ok().map(|l| started + l),
        _ => None,
    };
    let finished = matches!(status.phase, VmPhase::Succeeded | VmPhase::Failed);
    let by_ttl = match (finished, vm.spec.ttl_seconds_after_finished) {
        (true, Some(ttl)) => {
            let ended = status.runtime.as_ref().and_then(|r| r.exit.as_ref()).and_then(|e| e.at).unwrap_or(now);
            Some(ended + chrono::Duration::seconds(i64::from(ttl)))
        }
        _ => None,
    };
    status.expires_at = match (by_lifetime, by_ttl) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    status
}

pub fn observed(vm: &Vm, node: &str, report: &VmReport) -> VmStatus {
    let mut status = vm.status_or_default();
    status.node_name = Some(node.to_string());
    status.observed_generation = vm.metadata.generation;
    status.last_error = None;
    let clean_exit = report.runtime.exit.as_ref().is_some_and(|e| e.is_clean());
    status.phase = match report.state {
        ObservedState::Running => VmPhase::Running,
        ObservedState::Paused => VmPhase::Paused,
        ObservedState::Stopped | ObservedState::Absent => VmPhase::Stopped,
        ObservedState::Exited if clean_exit => VmPhase::Succeeded,
        ObservedState::Exited => VmPhase::Failed,
        ObservedState::Removing => VmPhase::Terminating,
    };
    let exit_text = report.runtime.exit.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "ended".into());
    let policy = vm.spec.restart_policy;
    if status.phase == VmPhase::Failed {
        status.last_error = Some(VmError {
            message: format!("the VMM {exit_text}; restartPolicy {policy:?} keeps it down"),
            fault_message: None,
            suggestion: Some(
                "read the VM's console log; set spec.state to Stopped, then Running, to start it again".into(),
            ),
        });
    }
    status.runtime = Some(report.runtime.clone());
    match &report.runtime.restart_pending {
        Some(why) => {
            set_condition(
                &mut status.conditions,
                conditions::RESTART_PENDING,
                ConditionStatus::True,
                conditions::reason::DRIVES_CHANGED,
                why,
            );
        }
        None => status.conditions.retain(|c| c.type_ != conditions::RESTART_PENDING),
    }
    super::placement::scheduled_on(&mut status, node);
    let (ready, reason, message) = match (report.state, &report.probe) {
        (ObservedState::Running, _) if vm.spec.readiness_probe.is_none() => {
            (true, "Running".to_string(), "the VMM is running the guest".to_string())
        }
        (ObservedState::Running, Some(p)) if p.passed => (true, "ProbePassed".into(), p.message.clone()),
        (ObservedState::Running, Some(p)) => (false, "ProbeFailed".into(), p.message.clone()),
        (ObservedState::Running, None) => {
            (false, "ProbePending".into(), "the node has not run the readiness probe yet".into())
        }
        (ObservedState::Exited, _) => (false, "Exited".into(), format!("the VMM {exit_text}")),
        (state, _) => (false, format!("{state:?}"), "the guest is not running".to_string()),
    };
    set_condition(
        &mut status.conditions,
        conditions::READY,
        if ready { ConditionStatus::True } else { ConditionStatus::False },
        &reason,
        &message,
    );
    status
}

/// The event that going from `before` to `after` (per `report` of node
/// `node`) deserves, if any.
pub fn transition_event(
    vm: &Vm,
    before: &VmStatus,
    after: &VmStatus,
    node: &str,
    report: &VmReport,
) -> Option<EventNote> {
    let old_pid = before.runtime.as_ref().and_then(|r| r.pid);
    let exit_text = report.runtime.exit.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "ended".into());
    let policy = vm.spec.restart_policy;
    match (before.phase, after.phase) {
        (b, VmPhase::Running) if b != VmPhase::Running => {
            let pid = report.runtime.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
            Some((EventType::Normal, "Started", format!("running on node {node}{pid}")))
        }
        (VmPhase::Running, VmPhase::Running) if old_pid.is_some() && old_pid != report.runtime.pid => {
            let (old, new) = (old_pid.unwrap_or_default(), report.runtime.pid.unwrap_or_default());
            let how = report.runtime.exit.as_ref().map(|e| format!(" ({e})")).unwrap_or_default();
            Some((
                EventType::Normal,
                "Restarted",
                format!(
                    "the VMM (pid {old}) ended{how}; started again as pid {new} (restart {}, restartPolicy {policy:?})",
                    report.runtime.restarts
                ),
            ))
        }
        (b, VmPhase::Paused) if b != VmPhase::Paused => {
            Some((EventType::Normal, "Paused", "the guest's vCPUs are paused".to_string()))
        }
        (b, VmPhase::Stopped) if b != VmPhase::Stopped => {
            Some((EventType::Normal, "Stopped", "the VMM is stopped; the disk is kept".to_string()))
        }
        (b, VmPhase::Succeeded) if b != VmPhase::Succeeded => Some((
            EventType::Normal,
            "Completed",
            format!("the guest shut down (the VMM {exit_text}); restartPolicy {policy:?} keeps it down"),
        )),
        (b, VmPhase::Failed) if b != VmPhase::Failed => {
            Some((EventType::Warning, "Failed", format!("the VMM {exit_text}; restartPolicy {policy:?} keeps it down")))
        }
        _ => None,
    }
}

/// The status of `vm` after its node's agent refused it for good.
pub fn refused(vm: &Vm, node: &str, body: &ErrorBody) -> VmStatus {
    let mut status = vm.status_or_default();
    status.node_name = Some(node.to_string());
    status.observed_generation = vm.metadata.generation;
    status.phase = VmPhase::Failed;
    status.last_error = Some(VmError {
        message: body.message.clone(),
        fault_message: body.fault_message.clone(),
        suggestion: body.suggestion.clone(),
    });
    set_condition(&mut status.conditions, conditions::READY, ConditionStatus::False, &body.error, &body.message);
    status
}

/// The message of the event for a refusal: the agent's words, then
/// Firecracker's and the suggestion.
pub fn refusal_message(body: &ErrorBody) -> String {
    let mut message = body.message.clone();
    if let Some(f) = &body.fault_message {
        message.push_str(&format!("; firecracker: {f}"));
    }
    if let Some(s) = &body.suggestion {
        message.push_str(&format!("; {s}"));
    }
    message
}

#[cfg(test)]
mod tests {
    use nexus_api::VmSpec;
    use nexus_api::meta::find_condition;
    use nexus_api::vm::{RestartPolicy, VmExit};

    use super::*;

    fn vm(policy: RestartPolicy) -> Vm {
        let mut vm = Vm::new("web", Some("p"), VmSpec { restart_policy: policy, ..Default::default() });
        vm.metadata.uid = Some("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11".into());
        vm.metadata.generation = Some(3);
        vm
    }

    #[test]
    fn a_lifetime_counts_from_the_first_start_and_a_ttl_from_the_finish_the_sooner_wins() {
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let mut v = vm(RestartPolicy::Never);
        v.spec.lifetime = Some("1h".into());
        v.spec.ttl_seconds_after_finished = Some(30);
        let mut r = report(ObservedState::Running, Some(7), None);
        r.runtime.started_at = Some(t0);
        let running = with_expiry(&v, observed(&v, "n1", &r), t0);
        assert_eq!(running.expires_at, Some(t0 + chrono::Duration::hours(1)));
        // A restart later does not move the deadline.
        v.status = Some(running.clone());
        r.runtime.started_at = Some(t0 + chrono::Duration::minutes(10));
        assert_eq!(with_expiry(&v, observed(&v, "n1", &r), t0).expires_at, running.expires_at);
        // Finished at t0 + 5 min: 30 s later is sooner than the lifetime.
        let ended = t0 + chrono::Duration::minutes(5);
        let exit = VmExit { code: Some(0), signal: None, at: Some(ended) };
        let done = with_expiry(&v, observed(&v, "n1", &report(ObservedState::Exited, None, Some(exit))), t0);
        assert_eq!(done.phase, VmPhase::Succeeded);
        assert_eq!(done.expires_at, Some(ended + chrono::Duration::seconds(30)));
        // Neither set: no deadline.
        let plain = vm(RestartPolicy::Always);
        assert_eq!(with_expiry(&plain, observed(&plain, "n1", &r), t0).expires_at, None);
    }

    fn report(state: ObservedState, pid: Option<u32>, exit: Option<VmExit>) -> VmReport {
        VmReport {
            uid: "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11".into(),
            state,
            runtime: nexus_api::vm::VmRuntime {
                pid,
                socket_path: None,
                tap_name: Some("nxt7f0c9a523a43".into()),
                mac: Some("06:00:aa:bb:cc:dd".into()),
                ip: None,
                log_path: None,
                console_path: None,
                started_at: None,
                boot_millis: Some(12),
                restarts: 1,
                exit,
                ..Default::default()
            },
            probe: None,
        }
    }

    #[test]
    fn a_running_report_makes_the_vm_running_and_ready_and_is_announced_once() {
        let v = vm(RestartPolicy::Always);
        let r = report(ObservedState::Running, Some(42), None);
        let after = observed(&v, "n1", &r);
        assert_eq!(after.phase, VmPhase::Running);
        assert_eq!(after.observed_generation, Some(3));
        assert_eq!(after.runtime.as_ref().and_then(|r| r.pid), Some(42));
        assert_eq!(find_condition(&after.conditions, "Ready").map(|c| c.status), Some(ConditionStatus::True));
        let (t, reason, message) = transition_event(&v, &v.status_or_default(), &after, "n1", &r).unwrap();
        assert_eq!((t, reason), (EventType::Normal, "Started"));
        assert_eq!(message, "running on node n1, pid 42");
        assert_eq!(transition_event(&v, &after, &after, "n1", &r), None, "no news the second time");
    }

    #[test]
    fn a_new_pid_while_running_is_a_restart_with_how_the_old_one_ended() {
        let v = vm(RestartPolicy::Always);
        let before = observed(&v, "n1", &report(ObservedState::Running, Some(42), None));
        let killed = VmExit { code: None, signal: Some(9), at: None };
        let r = report(ObservedState::Running, Some(43), Some(killed));
        let after = observed(&v, "n1", &r);
        let (_, reason, message) = transition_event(&v, &before, &after, "n1", &r).unwrap();
        assert_eq!(reason, "Restarted");
        assert!(message.contains("pid 42) ended (killed by signal 9); started again as pid 43"), "{message}");
    }

    #[test]
    fn an_exit_kept_down_is_succeeded_when_clean_and_failed_otherwise() {
        let v = vm(RestartPolicy::Never);
        let clean = observed(
            &v,
            "n1",
            &report(ObservedState::Exited, None, Some(VmExit { code: Some(0), signal: None, at: None })),
        );
        assert_eq!(clean.phase, VmPhase::Succeeded);
        assert!(clean.last_error.is_none());
        let r = report(ObservedState::Exited, None, Some(VmExit { code: Some(1), signal: None, at: None }));
        let failed = observed(&v, "n1", &r);
        assert_eq!(failed.phase, VmPhase::Failed);
        let error = failed.last_error.clone().unwrap();
        assert_eq!(error.message, "the VMM exited with status 1; restartPolicy Never keeps it down");
        let (t, reason, _) = transition_event(&v, &v.status_or_default(), &failed, "n1", &r).unwrap();
        assert_eq!((t, reason), (EventType::Warning, "Failed"));
        let ready = find_condition(&failed.conditions, "Ready").unwrap();
        assert_eq!((ready.status, ready.reason.as_str()), (ConditionStatus::False, "Exited"));
    }

    #[test]
    fn no_vmm_is_only_an_answer_for_a_vm_that_should_be_stopped() {
        let mut v = vm(RestartPolicy::Always);
        let gone = report(ObservedState::Stopped, None, None);
        assert!(!converging(&v, &gone), "wants Running: ask again");
        v.spec.state = nexus_api::PowerState::Stopped;
        assert!(converging(&v, &gone));
        assert!(converging(&vm(RestartPolicy::Never), &report(ObservedState::Exited, None, None)));
    }

    #[test]
    fn a_refusal_fails_the_vm_with_firecrackers_words() {
        let v = vm(RestartPolicy::Always);
        let body = ErrorBody {
            error: "FirecrackerRejected".into(),
            message: "boot-source was refused".into(),
            status: 422,
            fault_message: Some("Invalid kernel path".into()),
            suggestion: Some("check spec.kernel".into()),
            request_id: String::new(),
        };
        let status = refused(&v, "n1", &body);
        assert_eq!(status.phase, VmPhase::Failed);
        assert_eq!(status.last_error.unwrap().fault_message.as_deref(), Some("Invalid kernel path"));
        assert_eq!(
            refusal_message(&body),
            "boot-source was refused; firecracker: Invalid kernel path; check spec.kernel"
        );
    }

    #[test]
    fn the_agent_request_carries_the_resolved_machine_and_a_derived_mac() {
        let v = vm(RestartPolicy::OnFailure);
        let config = ResolvedConfig {
            generation: 3,
            vcpu: 2,
            mem_mib: 256,
            kernel_path: "/k".into(),
            rootfs_path: "/r".into(),
            boot_args: "console=ttyS0".into(),
            ..Default::default()
        };
        let req = ensure_request(&v, &config);
        assert_eq!((req.vcpu, req.mem_mib, req.display_name.as_str()), (2, 256, "p/web"));
        assert_eq!(req.mac, mac_from_uid(v.uid()));
        assert_eq!(req.restart_policy, RestartPolicy::OnFailure);
    }
}
