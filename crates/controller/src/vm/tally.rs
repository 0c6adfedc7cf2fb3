//! What each node's VMs claim, as the cache shows them, kept up to date
//! from the VM store's change log: a placement costs what changed since
//! the one before, not a pass over every VM (which made a ramp of N VMs
//! cost N² steps).

use nexus_api::Vm;

use super::Stores;
use super::scheduler::{FastMap, Load, Loads, group_of, holds_resources};
use crate::runtime::store::{Changes, ObjectKey, version_of};

/// One cached VM's claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// `spec.nodeName` as cached.
    pub node: Option<String>,
    pub mem_mib: u32,
    /// Its spread group ([`group_of`]).
    pub group: Option<String>,
    /// Whether it holds its node's resources (it has not finished).
    pub holds: bool,
    /// The cached resourceVersion.
    pub version: u64,
}

impl Share {
    /// The claim of `vm`; its memory is resolved from its template when
    /// its status does not report it yet.
    fn of(vm: &Vm, stores: &Stores) -> Self {
        Share {
            node: vm.spec.node_name.clone(),
            mem_mib: super::resolve::resources(vm, stores).1,
            group: group_of(vm),
            holds: holds_resources(vm),
            version: version_of(vm),
        }
    }

    /// The node it counts on when nothing is assumed about it.
    fn counted_on(&self) -> Option<&str> {
        self.node.as_deref().filter(|_| self.holds)
    }
}

/// The sum of the shares counted on one node.
#[derive(Debug, Default)]
struct NodeSum {
    mem_mib: u64,
    vms: u32,
    /// Members of each spread group.
    groups: FastMap<String, u32>,
}

/// Every cached VM's share, by uid, and their sums by node.
#[derive(Debug, Default)]
pub struct Tally {
    /// The VM store's change count this tally has caught up with.
    cursor: Option<u64>,
    shares: FastMap<String, Share>,
    /// The uid under each object key (a name deleted and made again gets
    /// a new uid).
    uids: FastMap<ObjectKey, String>,
    nodes: FastMap<String, NodeSum>,
}

impl Tally {
    /// Catches up with the VM store.
    pub fn refresh(&mut self, stores: &Stores) {
        match stores.vms.changed_since(self.cursor) {
            Changes::All(cursor, vms) => {
                *self = Tally { cursor: Some(cursor), ..Tally::default() };
                for vm in vms {
                    self.put(ObjectKey::of(&vm), &vm, stores);
                }
            }
            Changes::Since(cursor, changed) => {
                self.cursor = Some(cursor);
                for (key, vm) in changed {
                    if let Some(uid) = self.uids.remove(&key) {
                        self.take(&uid);
                    }
                    if let Some(vm) = vm {
                        self.put(key, &vm, stores);
                    }
                }
            }
        }
    }

    /// The cached VM `uid`'s share.
    pub fn share(&self, uid: &str) -> Option<&Share> {
        self.shares.get(uid)
    }

    fn put(&mut self, key: ObjectKey, vm: &Vm, stores: &Stores) {
        let uid = vm.uid().to_string();
        let share = Share::of(vm, stores);
        if let Some(node) = share.counted_on() {
            let sum = self.nodes.entry(node.to_string()).or_default();
            sum.mem_mib += u64::from(share.mem_mib);
            sum.vms += 1;
            if let Some(g) = &share.group {
                *sum.groups.entry(g.clone()).or_default() += 1;
            }
        }
        self.uids.insert(key, uid.clone());
        self.shares.insert(uid, share);
    }

    fn take(&mut self, uid: &str) {
        let Some(share) = self.shares.remove(uid) else { return };
        let Some(node) = share.counted_on() else { return };
        let Some(sum) = self.nodes.get_mut(node) else { return };
        sum.mem_mib -= u64::from(share.mem_mib);
        sum.vms -= 1;
        if let Some(g) = &share.group
            && let Some(n) = sum.groups.get_mut(g)
        {
            *n -= 1;
            if *n == 0 {
                sum.groups.remove(g);
            }
        }
        if sum.vms == 0 {
            self.nodes.remove(node);
        }
    }

    /// The load on each node with VMs, counting the members of `group`.
    pub fn loads(&self, group: Option<&str>) -> Loads {
        self.nodes
            .iter()
            .map(|(node, sum)| {
                let in_group = group.and_then(|g| sum.groups.get(g)).copied().unwrap_or(0);
                (node.clone(), Load { mem_mib: sum.mem_mib, vms: sum.vms, in_group })
            })
            .collect()
    }
}

/// Moves `share` between nodes in `loads`: off `from`, onto `to` (either
/// may be `None`), counting it in `group`'s members where it belongs.
pub fn shift(loads: &mut Loads, share: &Share, from: Option<&str>, to: Option<&str>, group: Option<&str>) {
    let member = group.is_some_and(|g| share.group.as_deref() == Some(g));
    if let Some(node) = from
        && let Some(load) = loads.get_mut(node)
    {
        load.mem_mib -= u64::from(share.mem_mib);
        load.vms -= 1;
        load.in_group -= u32::from(member);
        if load.vms == 0 {
            loads.remove(node);
        }
    }
    if let Some(node) = to {
        loads.entry(node.to_string()).or_default().add(share.mem_mib, member);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, uid: &str, node: Option<&str>, rv: u64, pool: Option<&str>) -> Vm {
        let mut vm = super::super::scheduler::tests::vm(name, uid, node);
        vm.metadata.resource_version = Some(rv.to_string());
        if let Some(pool) = pool {
            vm.metadata.labels.insert(nexus_api::pool::POOL_LABEL.into(), pool.into());
        }
        vm
    }

    /// The loads a pass over every cached VM finds: what the tally must
    /// always equal.
    fn counted(stores: &Stores, group: Option<&str>) -> Loads {
        let mut loads = Loads::new();
        for vm in stores.vms.list() {
            let share = Share::of(&vm, stores);
            shift(&mut loads, &share, None, share.counted_on(), group);
        }
        loads
    }

    #[test]
    fn the_tally_follows_puts_moves_finishes_and_deletes() {
        let (writer, vms) = crate::runtime::store::store();
        let stores = Stores { vms, ..Stores::empty() };
        let mut tally = Tally::default();
        let mut rv = 0;
        let mut next = || {
            rv += 1;
            rv
        };
        for i in 0..6 {
            let node = ["a", "b", "c"][i % 3];
            let pool = (i % 2 == 0).then_some("ci");
            stores.vms.record_write(vm(&format!("vm-{i}"), &format!("u{i}"), Some(node), next(), pool));
        }
        tally.refresh(&stores);
        assert_eq!(tally.loads(Some("p/ci")), counted(&stores, Some("p/ci")));
        assert_eq!(tally.loads(None)["a"], Load { mem_mib: 1024, vms: 2, in_group: 0 });
        // Moved to another node, unbound, finished, deleted, made again
        // under the same name with a new uid.
        stores.vms.record_write(vm("vm-0", "u0", Some("b"), next(), Some("ci")));
        stores.vms.record_write(vm("vm-1", "u1", None, next(), None));
        let mut done = vm("vm-2", "u2", Some("c"), next(), Some("ci"));
        done.status = Some(nexus_api::VmStatus { phase: nexus_api::VmPhase::Succeeded, ..Default::default() });
        stores.vms.record_write(done);
        writer.delete(vm("vm-3", "u3", Some("a"), next(), None));
        stores.vms.record_write(vm("vm-4", "u4b", Some("c"), next(), None));
        tally.refresh(&stores);
        for group in [None, Some("p/ci")] {
            assert_eq!(tally.loads(group), counted(&stores, group), "{group:?}");
        }
        assert_eq!(tally.share("u4"), None, "the old uid is forgotten");
        assert_eq!(tally.share("u4b").map(|s| s.node.as_deref()), Some(Some("c")));
    }

    #[test]
    fn a_reader_behind_the_log_starts_over() {
        let stores = Stores::empty();
        let mut tally = Tally::default();
        tally.refresh(&stores);
        for i in 0..(crate::runtime::store::LOG_CAPACITY as u64 + 10) {
            stores.vms.record_write(vm("vm", "u", Some(if i % 2 == 0 { "a" } else { "b" }), i + 1, None));
        }
        tally.refresh(&stores);
        assert_eq!(tally.loads(None), counted(&stores, None));
        assert_eq!(tally.loads(None).len(), 1);
    }
}
