//! Placement: picks a Ready node with room for a VM, spreading load, and
//! spreading the VMs of one pool first.
//!
//! The scheduler reads the store, which trails the apiserver by a watch
//! event. A placement it has just written may not be in the cache yet, so
//! it remembers its own placements ("assumed") until the cache shows them;
//! capacity therefore holds however fast VMs arrive.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use nexus_api::{Node, Vm, VmPhase};

use super::Stores;
use crate::runtime::store::version_of;

/// Why no node fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable(pub String);

/// What the VM to place needs.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub mem_mib: u32,
    pub node_selector: &'a BTreeMap<String, String>,
    /// The VM's spread group (`project/pool` for a pool's VM): nodes with
    /// the fewest VMs of the group come first.
    pub group: Option<&'a str>,
}

/// One VM's claim on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub node: String,
    pub vcpu: u8,
    pub mem_mib: u32,
    /// The VM's spread group, if it has one.
    pub group: Option<String>,
}

/// The spread group of `vm`: `project/pool` for a pool's VM.
pub fn group_of(vm: &Vm) -> Option<String> {
    let pool = vm.metadata.labels.get(nexus_api::pool::POOL_LABEL)?;
    Some(format!("{}/{pool}", vm.metadata.project.as_deref().unwrap_or_default()))
}

/// Chooses a node for a VM needing `req` among `nodes`, given the claims of
/// every other placed VM. Prefers the node with the fewest VMs of the
/// request's group, then the fewest VMs, then by name.
pub fn pick_node(
    req: Request<'_>,
    nodes: &[Arc<Node>],
    placed: &[Placement],
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Result<String, Unschedulable> {
    let mut load: HashMap<&str, (u64, u32, u32)> = HashMap::new();
    for p in placed {
        let e = load.entry(p.node.as_str()).or_default();
        e.0 += u64::from(p.mem_mib);
        e.1 += 1;
        if req.group.is_some() && p.group.as_deref() == req.group {
            e.2 += 1;
        }
    }
    let mut nodes: Vec<&Arc<Node>> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name().cmp(b.name()));
    let mut reasons = Vec::new();
    let mut best: Option<(&Node, (u32, u32))> = None;
    for node in nodes.iter().copied() {
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
        if !req.node_selector.iter().all(|(k, v)| node.metadata.labels.get(k) == Some(v)) {
            reasons.push(format!("{name}: labels do not match nodeSelector"));
            continue;
        }
        let (mem, count, in_group) = load.get(name).copied().unwrap_or_default();
        let cap = &status.capacity;
        if count + 1 > cap.max_vms {
            reasons.push(format!("{name}: already runs {count} of {} VMs", cap.max_vms));
            continue;
        }
        if mem + u64::from(req.mem_mib) > cap.mem_mib {
            reasons.push(format!("{name}: {} MiB free, {} needed", cap.mem_mib.saturating_sub(mem), req.mem_mib));
            continue;
        }
        // vCPUs are overcommitted (idle microVMs are common); memory is not.
        if best.is_none_or(|(_, c)| (in_group, count) < c) {
            best = Some((node, (in_group, count)));
        }
    }
    match best {
        Some((node, _)) => Ok(node.name().to_string()),
        None if nodes.is_empty() => Err(Unschedulable("no nodes are registered".into())),
        None => Err(Unschedulable(reasons.join("; "))),
    }
}

/// Whether a VM in this phase still holds its node's resources.
fn holds_resources(vm: &Vm) -> bool {
    !matches!(vm.status.as_ref().map(|s| s.phase), Some(VmPhase::Succeeded | VmPhase::Failed))
}

/// Placements this controller wrote that the cache may not show yet, by VM
/// uid, with the resourceVersion the binding write produced. An assumption
/// holds only while the cache has an older copy of the VM: once the cache
/// has that version or a later one (bound, or unbound again since), the
/// cache is the truth.
#[derive(Debug, Default)]
pub struct Assumed {
    nodes: HashMap<String, (String, u64)>,
}

impl Assumed {
    /// Remembers that writing `bound` placed it on its `spec.nodeName`.
    pub fn assume(&mut self, bound: &Vm) {
        if let Some(node) = &bound.spec.node_name {
            self.nodes.insert(bound.uid().to_string(), (node.clone(), version_of(bound)));
        }
    }

    /// The node `vm` (as cached) was placed on, if the cache is older than
    /// the placement.
    pub fn node_of(&self, vm: &Vm) -> Option<&str> {
        self.nodes.get(vm.uid()).filter(|(_, rv)| version_of(vm) < *rv).map(|(n, _)| n.as_str())
    }

    /// Every VM's claim (other than `except`'s), from the cache and from
    /// assumptions it has not caught up with; forgets the assumptions it has.
    pub fn placements(&mut self, stores: &Stores, except: &str) -> Vec<Placement> {
        let vms = stores.vms.list();
        let mut pending = std::collections::HashSet::new();
        let mut placed = Vec::with_capacity(vms.len());
        for vm in &vms {
            let assumed = self.node_of(vm).map(str::to_string);
            if assumed.is_some() {
                pending.insert(vm.uid().to_string());
            }
            let Some(node) = assumed.or_else(|| vm.spec.node_name.clone()) else { continue };
            if vm.uid() == except || !holds_resources(vm) {
                continue;
            }
            let (vcpu, mem_mib) = super::resolve::resources(vm, stores);
            placed.push(Placement { node, vcpu, mem_mib, group: group_of(vm) });
        }
        // Caught up with, or the VM is gone: the assumption has served its turn.
        self.nodes.retain(|uid, _| pending.contains(uid));
        placed
    }
}

#[cfg(test)]
mod tests {
    use nexus_api::node::{CONDITION_READY, NodeCapacity};
    use nexus_api::{ConditionStatus, NodeSpec, NodeStatus, VmSpec};

    use super::*;

    fn node(name: &str, max_vms: u32) -> Arc<Node> {
        let mut n = Node::new(name, None, NodeSpec::default());
        let mut status = NodeStatus {
            address: "http://10.0.0.1:7444".into(),
            last_heartbeat_time: Some(Utc::now()),
            capacity: NodeCapacity { vcpu: 8, mem_mib: 4096, max_vms },
            ..Default::default()
        };
        nexus_api::meta::set_condition(&mut status.conditions, CONDITION_READY, ConditionStatus::True, "Beat", "");
        n.status = Some(status);
        Arc::new(n)
    }

    fn vm(name: &str, uid: &str, node: Option<&str>) -> Vm {
        let mut vm = Vm::new(
            name,
            Some("p"),
            VmSpec {
                vcpu: Some(1),
                mem_mib: Some(512),
                kernel: Some("/k".into()),
                rootfs: Some("/r".into()),
                node_name: node.map(str::to_string),
                ..Default::default()
            },
        );
        vm.metadata.uid = Some(uid.into());
        vm
    }

    #[test]
    fn spreads_then_refuses_with_a_reason_per_node() {
        let nodes = [node("a", 2), node("b", 2)];
        let none = BTreeMap::new();
        let req = Request { mem_mib: 512, node_selector: &none, group: None };
        let grace = chrono::Duration::seconds(6);
        let mut placed = Vec::new();
        let mut got = Vec::new();
        for _ in 0..4 {
            let n = pick_node(req, &nodes, &placed, Utc::now(), grace).unwrap();
            placed.push(Placement { node: n.clone(), vcpu: 1, mem_mib: 512, group: None });
            got.push(n);
        }
        assert_eq!(got, ["a", "b", "a", "b"]);
        let err = pick_node(req, &nodes, &placed, Utc::now(), grace).unwrap_err();
        assert_eq!(err.0, "a: already runs 2 of 2 VMs; b: already runs 2 of 2 VMs");
    }

    #[test]
    fn a_pools_vms_spread_over_nodes_before_load_counts() {
        let nodes = [node("a", 50), node("b", 50), node("c", 50)];
        let none = BTreeMap::new();
        let grace = chrono::Duration::seconds(6);
        // Node a runs 5 other VMs; the pool's first VM still goes to b,
        // and its 20 VMs end 7/7/6.
        let mut placed: Vec<Placement> =
            (0..5).map(|_| Placement { node: "a".into(), vcpu: 1, mem_mib: 64, group: None }).collect();
        let req = Request { mem_mib: 64, node_selector: &none, group: Some("p/ci") };
        for _ in 0..20 {
            let n = pick_node(req, &nodes, &placed, Utc::now(), grace).unwrap();
            placed.push(Placement { node: n, vcpu: 1, mem_mib: 64, group: Some("p/ci".into()) });
        }
        let count = |n: &str| placed.iter().filter(|p| p.node == n && p.group.is_some()).count();
        assert_eq!((count("a"), count("b"), count("c")), (6, 7, 7));
    }

    #[test]
    fn assumed_placements_count_until_the_cache_shows_them() {
        let stores = Stores::empty();
        let mut unbound = vm("one", "u1", None);
        unbound.metadata.resource_version = Some("1".into());
        stores.vms.record_write(unbound);
        let mut assumed = Assumed::default();
        let mut bound = vm("one", "u1", Some("a"));
        bound.metadata.resource_version = Some("2".into());
        assumed.assume(&bound);
        let placed = assumed.placements(&stores, "u2");
        assert_eq!(placed, [Placement { node: "a".into(), vcpu: 1, mem_mib: 512, group: None }]);
        // The cache catches up: the assumption is dropped, the claim stays.
        stores.vms.record_write(bound.clone());
        assert_eq!(assumed.placements(&stores, "u2").len(), 1);
        assert_eq!(assumed.node_of(&bound), None);
    }

    #[test]
    fn a_vm_unbound_after_its_placement_is_not_held_by_the_old_assumption() {
        let stores = Stores::empty();
        let mut assumed = Assumed::default();
        let mut bound = vm("one", "u1", Some("a"));
        bound.metadata.resource_version = Some("2".into());
        assumed.assume(&bound);
        // Its node was deleted and the VM unbound (a later version).
        let mut unbound = vm("one", "u1", None);
        unbound.metadata.resource_version = Some("3".into());
        stores.vms.record_write(unbound.clone());
        assert_eq!(assumed.node_of(&unbound), None, "free to be placed again");
        assert!(assumed.placements(&stores, "u2").is_empty());
    }
}
