//! Placement: picks a Ready node with room for a VM, spreading load.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use nexus_api::{Node, Vm};

/// Why no node fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable(pub String);

/// Chooses the node for `vm` among `nodes`, given every VM already placed
/// (`placed`). Prefers the node with the fewest VMs, then by name.
pub fn pick_node(
    vm: &Vm,
    nodes: &[Node],
    placed: &[Vm],
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Result<String, Unschedulable> {
    let mut load: HashMap<&str, (u32, u64, u32)> = HashMap::new();
    for other in placed {
        if other.uid() == vm.uid() {
            continue;
        }
        if let Some(node) = other.spec.node_name.as_deref() {
            let e = load.entry(node).or_default();
            e.0 += u32::from(other.spec.vcpu);
            e.1 += u64::from(other.spec.mem_mib);
            e.2 += 1;
        }
    }
    let mut reasons = Vec::new();
    let mut best: Option<(&Node, u32)> = None;
    for node in nodes {
        let name = node.name();
        let status = node.status_or_default();
        if !status.is_ready(now, grace) {
            reasons.push(format!("{name}: not Ready"));
            continue;
        }
        if node.spec.unschedulable {
            reasons.push(format!("{name}: unschedulable"));
            continue;
        }
        if !vm.spec.node_selector.iter().all(|(k, v)| node.metadata.labels.get(k) == Some(v)) {
            reasons.push(format!("{name}: labels do not match nodeSelector"));
            continue;
        }
        let (vcpu, mem, count) = load.get(name).copied().unwrap_or_default();
        let cap = &status.capacity;
        if count + 1 > cap.max_vms {
            reasons.push(format!("{name}: already runs {count} of {} VMs", cap.max_vms));
            continue;
        }
        if mem + u64::from(vm.spec.mem_mib) > cap.mem_mib {
            reasons.push(format!("{name}: {} MiB free, {} needed", cap.mem_mib.saturating_sub(mem), vm.spec.mem_mib));
            continue;
        }
        // vCPUs are overcommitted (idle microVMs are common); memory is not.
        let _ = vcpu;
        if best.is_none_or(|(b, c)| count < c || (count == c && name < b.name())) {
            best = Some((node, count));
        }
    }
    match best {
        Some((node, _)) => Ok(node.name().to_string()),
        None if nodes.is_empty() => Err(Unschedulable("no nodes are registered".into())),
        None => Err(Unschedulable(reasons.join("; "))),
    }
}
