//! When the fleet's VMs passed each step of their start, counted from the
//! apply, from the timestamps the programs record on each VM: the
//! apiserver's `creationTimestamp`, the controller's Scheduled condition,
//! the agent's `status.runtime` (its VMM launched `bootMillis` before the
//! boot it stamps as `startedAt`), and the controller's Ready condition.
//! All are written by processes on this one host, so one clock.
//!
//! The median VM and the last one at each step show where a ramp waits:
//! a step whose last VM passes long after the last VM passed the step
//! before is the one the fleet queues for.

use chrono::{DateTime, Utc};
use nexus_api::Vm;
use nexus_api::meta::find_condition;

/// The steps, in the order a VM passes them.
pub const NAMES: [&str; 5] = ["stored", "scheduled", "VMM launched", "booted", "Ready written"];

/// One sorted list per step of [`NAMES`]: when each VM passed it, in
/// milliseconds after `applied_at`. A VM missing a timestamp is left out
/// of that step.
pub fn passed(vms: &[Vm], applied_at: DateTime<Utc>) -> [Vec<f64>; 5] {
    let mut steps: [Vec<f64>; 5] = Default::default();
    for vm in vms {
        for (step, at) in steps.iter_mut().zip(stamps(vm)) {
            if let Some(at) = at {
                step.push((at - applied_at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
    }
    for step in &mut steps {
        step.sort_by(f64::total_cmp);
    }
    steps
}

/// The times one VM passed each step of [`NAMES`].
fn stamps(vm: &Vm) -> [Option<DateTime<Utc>>; 5] {
    let status = vm.status.as_ref();
    let condition =
        |kind: &str| status.and_then(|s| find_condition(&s.conditions, kind)).map(|c| c.last_transition_time);
    let runtime = status.and_then(|s| s.runtime.as_ref());
    let booted = runtime.and_then(|r| r.started_at);
    let launched =
        runtime.and_then(|r| Some(r.started_at? - chrono::Duration::milliseconds(i64::try_from(r.boot_millis?).ok()?)));
    [vm.metadata.creation_timestamp, condition("Scheduled"), launched, booted, condition("Ready")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_each_step_and_leaves_out_what_a_vm_lacks() {
        let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(1_800_000_000_000 + ms).unwrap();
        let vm = |created: i64, scheduled: Option<i64>| {
            let mut status = serde_json::json!({"phase": "Pending", "conditions": []});
            if let Some(s) = scheduled {
                status["conditions"] = serde_json::json!([{
                    "type": "Scheduled", "status": "True", "reason": "Bound", "message": "",
                    "lastTransitionTime": at(s).to_rfc3339()
                }]);
                status["runtime"] = serde_json::json!({"startedAt": at(s + 10).to_rfc3339(), "bootMillis": 4});
            }
            serde_json::from_value::<Vm>(serde_json::json!({
                "apiVersion": "nexus/v1", "kind": "VM",
                "metadata": {"name": format!("vm-{created}"), "creationTimestamp": at(created).to_rfc3339()},
                "spec": {"vcpu": 1, "memMib": 128, "kernel": "/k", "rootfs": "/r"},
                "status": status
            }))
            .unwrap()
        };
        let steps = passed(&[vm(30, Some(50)), vm(10, None), vm(20, Some(40))], at(0));
        assert_eq!(steps[0], vec![10.0, 20.0, 30.0]);
        assert_eq!(steps[1], vec![40.0, 50.0]);
        assert_eq!(steps[2], vec![46.0, 56.0]);
        assert_eq!(steps[3], vec![50.0, 60.0]);
        assert!(steps[4].is_empty());
    }
}
