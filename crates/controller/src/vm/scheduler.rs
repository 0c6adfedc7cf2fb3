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
use nexus_api::conditions;
use nexus_api::meta::find_condition;
use nexus_api::{Node, Vm, VmPhase};

use super::Stores;
use super::tally::{Tally, shift};
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

/// What the VMs placed on one node claim.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub mem_mib: u64,
    pub vms: u32,
    /// How many of them are in the request's spread group.
    pub in_group: u32,
}

impl Load {
    /// Adds one VM's claim.
    pub fn add(&mut self, mem_mib: u32, in_group: bool) {
        self.mem_mib += u64::from(mem_mib);
        self.vms += 1;
        self.in_group += u32::from(in_group);
    }
}

/// The load of each node with VMs, by node name.
pub type Loads = HashMap<String, Load>;

/// The spread group of `vm`: `project/pool` for a pool's VM.
pub fn group_of(vm: &Vm) -> Option<String> {
    let pool = vm.metadata.labels.get(nexus_api::pool::POOL_LABEL)?;
    Some(format!("{}/{pool}", vm.metadata.project.as_deref().unwrap_or_default()))
}

/// Chooses a node for a VM needing `req` among `nodes`, given the load the
/// other placed VMs put on each. Prefers the node with the fewest VMs of
/// the request's group, then the fewest VMs, then by name.
pub fn pick_node(
    req: Request<'_>,
    nodes: &[Arc<Node>],
    loads: &Loads,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Result<String, Unschedulable> {
    let mut nodes: Vec<&Arc<Node>> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name().cmp(b.name()));
    let mut reasons = Vec::new();
    let mut best: Option<(&Node, (u32, u32))> = None;
    for node in nodes.iter().copied() {
        let name = node.name();
        let status = node.status_view();
        if !status.is_ready(now, grace) {
            reasons.push(format!("{name}: not Ready"));
            continue;
        }
        if node.spec.unschedulable {
            reasons.push(format!("{name}: unschedulable"));
            continue;
        }
        if let Some(c) = find_condition(&status.conditions, conditions::DISK_PRESSURE)
            .filter(|c| c.status == nexus_api::ConditionStatus::True)
        {
            reasons.push(format!("{name}: disk pressure ({})", c.message));
            continue;
        }
        if !req.node_selector.iter().all(|(k, v)| node.metadata.labels.get(k) == Some(v)) {
            reasons.push(format!("{name}: labels do not match nodeSelector"));
            continue;
        }
        let load = loads.get(name).copied().unwrap_or_default();
        let cap = &status.capacity;
        if load.vms + 1 > cap.max_vms {
            reasons.push(format!("{name}: already runs {} of {} VMs", load.vms, cap.max_vms));
            continue;
        }
        if load.mem_mib + u64::from(req.mem_mib) > cap.mem_mib {
            reasons.push(format!(
                "{name}: {} MiB free, {} needed",
                cap.mem_mib.saturating_sub(load.mem_mib),
                req.mem_mib
            ));
            continue;
        }
        // vCPUs are overcommitted (idle microVMs are common); memory is not.
        if best.is_none_or(|(_, c)| (load.in_group, load.vms) < c) {
            best = Some((node, (load.in_group, load.vms)));
        }
    }
    match best {
        Some((node, _)) => Ok(node.name().to_string()),
        None if nodes.is_empty() => Err(Unschedulable("no nodes are registered".into())),
        None => Err(Unschedulable(reasons.join("; "))),
    }
}

/// The node of `vm`'s assumption in `nodes`, if it still holds.
fn assumed_node<'a>(nodes: &'a FastMap<String, Assumption>, vm: &Vm) -> Option<&'a str> {
    nodes.get(vm.uid()).filter(|a| a.holds_for(vm)).map(|a| a.node.as_str())
}

/// Whether a VM in this phase still holds its node's resources.
pub(super) fn holds_resources(vm: &Vm) -> bool {
    !matches!(vm.status.as_ref().map(|s| s.phase), Some(VmPhase::Succeeded | VmPhase::Failed))
}

/// A hash map for the scheduler's per-VM bookkeeping, looked up for every
/// VM at every placement: keys are uids and node names the apiserver and
/// the nodes chose, so a fast hash suffices (no one can pick keys to
/// collide).
pub(super) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// How long a binding write may be in flight before its claim is dropped:
/// longer than the API client's 30 s request timeout, so only a claim
/// whose writer was cancelled (it neither confirmed nor released it) goes.
const IN_FLIGHT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A placement the cache may not show yet.
#[derive(Debug)]
struct Assumption {
    node: String,
    /// The resourceVersion the binding write produced; `None` while the
    /// write is in flight.
    version: Option<u64>,
    /// When it was made.
    made: std::time::Instant,
}

impl Assumption {
    /// Whether it holds for a cached VM at resourceVersion `cached`.
    fn holds_at(&self, cached: u64) -> bool {
        self.version.is_none_or(|rv| cached < rv)
    }

    fn holds_for(&self, vm: &Vm) -> bool {
        self.holds_at(version_of(vm))
    }
}

/// The scheduler's memory between placements.
///
/// Placements this controller made that the cache may not show yet, by VM
/// uid: while the binding write is in flight, and after it with the
/// resourceVersion it produced. An assumption holds while the write is in
/// flight and then while the cache has an older copy of the VM: once the
/// cache has that version or a later one (bound, or unbound again since),
/// the cache is the truth.
///
/// It also keeps the cache's claims summed by node ([`Tally`]), so that a
/// placement costs the changes since the last one and the few assumptions
/// in flight, whatever the number of VMs.
#[derive(Debug, Default)]
pub struct Assumed {
    nodes: FastMap<String, Assumption>,
    tally: Tally,
}

impl Assumed {
    /// Remembers that a write placing VM `uid` on `node` is under way.
    pub fn claim(&mut self, uid: &str, node: &str) {
        let claim = Assumption { node: node.to_string(), version: None, made: std::time::Instant::now() };
        self.nodes.insert(uid.to_string(), claim);
    }

    /// Forgets a claim whose write failed.
    pub fn release(&mut self, uid: &str) {
        self.nodes.remove(uid);
    }

    /// Remembers that writing `bound` placed it on its `spec.nodeName`.
    pub fn assume(&mut self, bound: &Vm) {
        if let Some(node) = &bound.spec.node_name {
            let assumption =
                Assumption { node: node.clone(), version: Some(version_of(bound)), made: std::time::Instant::now() };
            self.nodes.insert(bound.uid().to_string(), assumption);
        }
    }

    /// The node `vm` (as cached) was placed on, if its binding is in flight
    /// or the cache is older than the placement.
    pub fn node_of(&self, vm: &Vm) -> Option<&str> {
        assumed_node(&self.nodes, vm)
    }

    /// The load on each node of every VM but `except`, from the cache and
    /// from assumptions it has not caught up with, counting the members of
    /// spread group `group`; forgets the assumptions it has caught up with.
    pub fn loads(&mut self, stores: &Stores, except: &str, group: Option<&str>) -> Loads {
        self.tally.refresh(stores);
        let mut loads = self.tally.loads(group);
        // The VM being placed claims nothing yet: where it counts now.
        let except_on = self.tally.share(except).filter(|s| s.holds).map(|share| {
            match self.nodes.get(except).filter(|a| a.holds_at(share.version)) {
                Some(a) => Some(a.node.clone()),
                None => share.node.clone(),
            }
        });
        // An assumption that holds moves its VM's claim from the node the
        // cache shows (if any) to the one it was placed on. One the cache
        // caught up with has served its turn (so has one whose VM is gone);
        // a write still in flight keeps its claim.
        let tally = &self.tally;
        self.nodes.retain(|uid, a| {
            let Some(share) = tally.share(uid) else {
                return a.version.is_none() && a.made.elapsed() < IN_FLIGHT_LIMIT;
            };
            if !a.holds_at(share.version) {
                return a.version.is_none() && a.made.elapsed() < IN_FLIGHT_LIMIT;
            }
            if share.holds {
                shift(&mut loads, share, share.node.as_deref(), Some(&a.node), group);
            }
            a.version.is_some() || a.made.elapsed() < IN_FLIGHT_LIMIT
        });
        if let (Some(on), Some(share)) = (except_on, self.tally.share(except)) {
            shift(&mut loads, share, on.as_deref(), None, group);
        }
        loads
    }
}

#[cfg(test)]
pub(super) mod tests {
    use nexus_api::conditions::READY as CONDITION_READY;
    use nexus_api::node::NodeCapacity;
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

    /// A VM of 512 MiB in project `p`, placed on `node`.
    pub(in crate::vm) fn vm(name: &str, uid: &str, node: Option<&str>) -> Vm {
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
        let mut loads = Loads::new();
        let mut got = Vec::new();
        for _ in 0..4 {
            let n = pick_node(req, &nodes, &loads, Utc::now(), grace).unwrap();
            loads.entry(n.clone()).or_default().add(512, false);
            got.push(n);
        }
        assert_eq!(got, ["a", "b", "a", "b"]);
        let err = pick_node(req, &nodes, &loads, Utc::now(), grace).unwrap_err();
        assert_eq!(err.0, "a: already runs 2 of 2 VMs; b: already runs 2 of 2 VMs");
    }

    #[test]
    fn a_node_under_disk_pressure_gets_no_new_vms_and_says_why() {
        let full = node("a", 10);
        let mut status = full.status_or_default();
        let why = "the run directory's filesystem has 1 MiB free of 48 MiB (less than 5%)";
        nexus_api::meta::set_condition(
            &mut status.conditions,
            conditions::DISK_PRESSURE,
            ConditionStatus::True,
            "",
            why,
        );
        let mut full = (*full).clone();
        full.status = Some(status);
        let none = BTreeMap::new();
        let req = Request { mem_mib: 64, node_selector: &none, group: None };
        let grace = chrono::Duration::seconds(6);
        let nodes = [Arc::new(full.clone()), node("b", 10)];
        assert_eq!(pick_node(req, &nodes, &Loads::new(), Utc::now(), grace).unwrap(), "b");
        let err = pick_node(req, &[Arc::new(full)], &Loads::new(), Utc::now(), grace).unwrap_err();
        assert_eq!(err.0, format!("a: disk pressure ({why})"));
    }

    #[test]
    fn a_pools_vms_spread_over_nodes_before_load_counts() {
        let nodes = [node("a", 50), node("b", 50), node("c", 50)];
        let none = BTreeMap::new();
        let grace = chrono::Duration::seconds(6);
        // Node a runs 5 other VMs; the pool's first VM still goes to b,
        // and its 20 VMs end 7/7/6.
        let mut loads = Loads::new();
        for _ in 0..5 {
            loads.entry("a".into()).or_default().add(64, false);
        }
        let req = Request { mem_mib: 64, node_selector: &none, group: Some("p/ci") };
        for _ in 0..20 {
            let n = pick_node(req, &nodes, &loads, Utc::now(), grace).unwrap();
            loads.entry(n).or_default().add(64, true);
        }
        let count = |n: &str| loads[n].in_group;
        assert_eq!((count("a"), count("b"), count("c")), (6, 7, 7));
    }

    #[test]
    fn assumed_placements_count_until_the_cache_shows_them() {
        let stores = Stores::empty();
        let mut unbound = vm("one", "u1", None);
        unbound.metadata.resource_version = Some("1".into());
        stores.vms.record_write(unbound);
        let mut assumed = Assumed::default();
        let one = Load { mem_mib: 512, vms: 1, in_group: 0 };
        // While the binding write is in flight, the claim counts.
        assumed.claim("u1", "a");
        assert_eq!(assumed.loads(&stores, "u2", None), Loads::from([("a".to_string(), one)]));
        let mut bound = vm("one", "u1", Some("a"));
        bound.metadata.resource_version = Some("2".into());
        assumed.assume(&bound);
        assert_eq!(assumed.loads(&stores, "u2", None), Loads::from([("a".to_string(), one)]));
        assert_eq!(assumed.loads(&stores, "u1", None), Loads::new(), "a VM's own claim is left out");
        // The cache catches up: the assumption is dropped, the claim stays.
        stores.vms.record_write(bound.clone());
        assert_eq!(assumed.loads(&stores, "u2", None), Loads::from([("a".to_string(), one)]));
        assert_eq!(assumed.node_of(&bound), None);
    }

    #[test]
    fn a_failed_binding_write_releases_its_claim() {
        let stores = Stores::empty();
        stores.vms.record_write(vm("one", "u1", None));
        let mut assumed = Assumed::default();
        assumed.claim("u1", "a");
        assert_eq!(assumed.loads(&stores, "u2", None).len(), 1);
        assumed.release("u1");
        assert!(assumed.loads(&stores, "u2", None).is_empty());
    }

    #[test]
    fn loads_count_a_groups_members_and_resolve_an_unreported_vm_once_per_version() {
        let stores = Stores::empty();
        let mut pooled = vm("one", "u1", Some("a"));
        pooled.metadata.labels.insert(nexus_api::pool::POOL_LABEL.into(), "ci".into());
        pooled.metadata.resource_version = Some("4".into());
        stores.vms.record_write(pooled.clone());
        stores.vms.record_write(vm("two", "u2", Some("a")));
        let mut assumed = Assumed::default();
        let loads = assumed.loads(&stores, "u3", Some("p/ci"));
        assert_eq!(loads["a"], Load { mem_mib: 1024, vms: 2, in_group: 1 });
        assert_eq!(assumed.loads(&stores, "u3", Some("q/ci"))["a"].in_group, 0, "another project's pool");
        assert_eq!(assumed.tally.share("u1").map(|s| (s.version, s.mem_mib)), Some((4, 512)));
        // A new version is resolved again; a VM gone is forgotten.
        pooled.spec.mem_mib = Some(256);
        pooled.metadata.resource_version = Some("5".into());
        stores.vms.record_write(pooled);
        assert_eq!(assumed.loads(&stores, "u3", None)["a"].mem_mib, 768);
        assert_eq!(assumed.tally.share("u1").map(|s| (s.version, s.mem_mib)), Some((5, 256)));
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
        assert!(assumed.loads(&stores, "u2", None).is_empty());
    }
}
