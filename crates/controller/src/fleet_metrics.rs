//! Gauges of the fleet as the caches see it, for dashboards and alerts:
//! VMs by phase (`nexus_vms{phase}`) and nodes by readiness
//! (`nexus_nodes{ready}`). Every controller process exports them, leader
//! or not (its caches are warm either way): alert on `max()` of them.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use nexus_api::{NodeSpec, VmPhase, VmSpec};

use crate::runtime::reflector::Reflectors;

/// Every phase, so a phase that empties goes back to 0 instead of vanishing.
const PHASES: &[VmPhase] = &[
    VmPhase::Pending,
    VmPhase::Scheduled,
    VmPhase::Running,
    VmPhase::Paused,
    VmPhase::Stopped,
    VmPhase::Succeeded,
    VmPhase::Failed,
    VmPhase::Terminating,
];

/// Updates the gauges every `every`, forever.
pub async fn run(reflectors: Reflectors, node_grace: chrono::Duration, every: Duration) {
    let (vms, nodes) = (reflectors.store::<VmSpec>(), reflectors.store::<NodeSpec>());
    loop {
        let mut by_phase: BTreeMap<String, usize> = PHASES.iter().map(|p| (phase_name(*p), 0)).collect();
        for vm in vms.list() {
            *by_phase.entry(phase_name(vm.status_or_default().phase)).or_default() += 1;
        }
        for (phase, n) in by_phase {
            metrics::gauge!("nexus_vms", "phase" => phase).set(n as f64);
        }
        let now = Utc::now();
        let ready = nodes.list().iter().filter(|n| n.status_or_default().is_ready(now, node_grace)).count();
        let all = nodes.len();
        metrics::gauge!("nexus_nodes", "ready" => "true").set(ready as f64);
        metrics::gauge!("nexus_nodes", "ready" => "false").set((all - ready) as f64);
        tokio::time::sleep(every).await;
    }
}

fn phase_name(p: VmPhase) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}
