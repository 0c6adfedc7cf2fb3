//! Gauges of the fleet as the caches see it, for dashboards and alerts:
//! VMs by phase (`nexus_vms{phase}`) and nodes by readiness
//! (`nexus_nodes{ready}`, the one ready-node gauge: counted again at each
//! node change, so it follows a node joining or going within the change).
//! Every controller process exports them, leader or not (its caches are
//! warm either way): alert on `max()` of them.

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

/// Updates the gauges every `every`, and the node gauge at each node
/// change too, forever.
pub async fn run(reflectors: Reflectors, node_grace: chrono::Duration, every: Duration) {
    let (vms, nodes) = (reflectors.store::<VmSpec>(), reflectors.store::<NodeSpec>());
    let mut node_changes = nodes.subscribe();
    let count_nodes = |nodes: &crate::runtime::Store<NodeSpec>| {
        let now = Utc::now();
        let ready = nodes.list().iter().filter(|n| n.status_view().is_ready(now, node_grace)).count();
        let all = nodes.len();
        metrics::gauge!("nexus_nodes", "ready" => "true").set(ready as f64);
        metrics::gauge!("nexus_nodes", "ready" => "false").set((all - ready) as f64);
    };
    let mut next_tick = tokio::time::Instant::now();
    loop {
        tokio::select! {
            changed = node_changes.recv() => {
                if !matches!(changed, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    count_nodes(&nodes);
                    continue;
                }
                tokio::time::sleep_until(next_tick).await;
            }
            () = tokio::time::sleep_until(next_tick) => {}
        }
        next_tick = tokio::time::Instant::now() + every;
        let mut by_phase: BTreeMap<String, usize> = PHASES.iter().map(|p| (phase_name(*p), 0)).collect();
        for vm in vms.list() {
            *by_phase.entry(phase_name(vm.status_view().phase)).or_default() += 1;
        }
        for (phase, n) in by_phase {
            metrics::gauge!("nexus_vms", "phase" => phase).set(n as f64);
        }
        count_nodes(&nodes);
    }
}

fn phase_name(p: VmPhase) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}
