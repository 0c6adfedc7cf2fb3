//! Which VMs a change of another kind concerns. Each mapper only maps:
//! what changed is read from the change itself (the object before and
//! after), never from state a mapper keeps.

use std::collections::HashSet;

use nexus_api::conditions::{self, reason};
use nexus_api::meta::find_condition;
use nexus_api::{ConditionStatus, Node, NodeSpec, VmSpec};

use super::BY_NODE;
use crate::runtime::store::BY_PROJECT;
use crate::runtime::{ObjectKey, Store};

/// Maps a node's change to the VMs that care: a node's first sighting, a
/// change of its `Ready` condition or its deletion concerns its VMs and the
/// unplaced ones; a VMM exit or a finished removal it announces concerns
/// that VM. Heartbeats, which change none of these, concern nobody.
pub fn node_changed(
    vms: Store<VmSpec>,
    nodes: Store<NodeSpec>,
) -> impl Fn(Option<&Node>, &Node) -> Vec<ObjectKey> + Send + Sync + 'static {
    move |old: Option<&Node>, node: &Node| {
        let mut keys = Vec::new();
        let mut fresh = new_exits(old, node);
        fresh.extend(new_removals(old, node));
        if !fresh.is_empty() {
            keys.extend(
                vms.by_index(BY_NODE, node.name())
                    .iter()
                    .filter(|vm| fresh.contains(vm.uid()))
                    .map(|v| ObjectKey::of(&**v)),
            );
        }
        // The feed carries a deleted node's last state: the store says it is gone.
        let gone = nodes.get_named("", node.name()).is_none();
        let readiness_changed = old.map(ready_condition) != Some(ready_condition(node));
        if gone || readiness_changed {
            keys.extend(vms.by_index(BY_NODE, node.name()).iter().map(|v| ObjectKey::of(&**v)));
        }
        // Room for the unplaced: a node that came, went, turned Ready, or
        // has disk space again.
        if gone || readiness_changed || old.map(disk_pressure) != Some(disk_pressure(node)) {
            keys.extend(vms.by_index(BY_NODE, "").iter().map(|v| ObjectKey::of(&**v)));
        }
        keys
    }
}

/// Whether `node`'s agent says it is Ready (its heartbeat's age aside:
/// the node-lifecycle controller turns the condition when beats stop).
fn ready_condition(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, conditions::READY))
        .is_some_and(|c| c.status == ConditionStatus::True)
}

/// Whether `node` reports `DiskPressure`.
fn disk_pressure(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, conditions::DISK_PRESSURE))
        .is_some_and(|c| c.status == ConditionStatus::True)
}

/// The VMs whose removal `node` announces done and `old` did not.
fn new_removals(old: Option<&Node>, node: &Node) -> HashSet<String> {
    let before = old.and_then(|o| o.status.as_ref()).map(|s| s.removed_vms.as_slice()).unwrap_or_default();
    let now = node.status.as_ref().map(|s| s.removed_vms.as_slice()).unwrap_or_default();
    now.iter().filter(|n| !before.contains(n)).map(|n| n.uid.clone()).collect()
}

/// The VMs whose VMM exits `node` announces and `old` did not.
fn new_exits(old: Option<&Node>, node: &Node) -> HashSet<String> {
    let before = old.and_then(|o| o.status.as_ref()).map(|s| s.vmm_exits.as_slice()).unwrap_or_default();
    let now = node.status.as_ref().map(|s| s.vmm_exits.as_slice()).unwrap_or_default();
    now.iter().filter(|n| !before.contains(n)).map(|n| n.uid.clone()).collect()
}

/// The VMs of `volume`'s project that name it as a drive.
pub fn naming_volume(vms: &Store<VmSpec>, volume: &nexus_api::Volume) -> Vec<ObjectKey> {
    vms.by_index(BY_PROJECT, volume.metadata.project.as_deref().unwrap_or_default())
        .iter()
        .filter(|vm| uses_volume(vm, volume.name()))
        .map(|v| ObjectKey::of(&**v))
        .collect()
}

/// Whether `vm` names volume `name` as a drive, in its spec or (for a VM
/// resolved from a template) its configuration.
pub fn uses_volume(vm: &nexus_api::Vm, name: &str) -> bool {
    let in_spec = vm.spec.drives.iter().any(|d| d.volume.as_deref() == Some(name));
    let resolved = vm.status.as_ref().and_then(|s| s.config.as_ref()).is_some_and(|c| {
        c.drives
            .iter()
            .any(|d| matches!(&d.source, nexus_api::storage::DriveSource::Volume { volume, .. } if volume == name))
    });
    in_spec || resolved
}

/// The VMs of `project` whose configuration is not resolved yet.
pub fn unresolved_in(vms: &Store<VmSpec>, project: Option<&str>) -> Vec<ObjectKey> {
    vms.by_index(BY_PROJECT, project.unwrap_or_default())
        .iter()
        .filter(|vm| {
            !vm.status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, conditions::RESOLVED))
                .is_some_and(|c| c.status == ConditionStatus::True)
        })
        .map(|v| ObjectKey::of(&**v))
        .collect()
}

/// The VMs of `project` a node refused for an invalid image.
pub fn refused_for_images_in(vms: &Store<VmSpec>, project: Option<&str>) -> Vec<ObjectKey> {
    vms.by_index(BY_PROJECT, project.unwrap_or_default())
        .iter()
        .filter(|vm| {
            vm.status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, conditions::READY))
                .is_some_and(|c| c.reason == reason::IMAGE_INVALID)
        })
        .map(|v| ObjectKey::of(&**v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use nexus_api::meta::set_condition;
    use nexus_api::node::VmmExitNotice;
    use nexus_api::{NodeStatus, Vm};

    fn node(ready: bool, beat_secs: i64, exits: Vec<VmmExitNotice>) -> Node {
        let mut status = NodeStatus {
            last_heartbeat_time: Some(Utc::now() + chrono::Duration::seconds(beat_secs)),
            vmm_exits: exits,
            ..Default::default()
        };
        let c = if ready { ConditionStatus::True } else { ConditionStatus::False };
        set_condition(&mut status.conditions, conditions::READY, c, reason::AGENT_HEARTBEAT, "");
        let mut n = Node::new("n1", None, NodeSpec::default());
        n.status = Some(status);
        n.metadata.resource_version = Some("1".into());
        n
    }

    fn stores() -> (Store<VmSpec>, Store<NodeSpec>) {
        let vms = crate::runtime::store::store::<VmSpec>().1;
        vms.add_index(BY_NODE, |vm| vec![vm.spec.node_name.clone().unwrap_or_default()]);
        for (name, uid, on) in [("a", "ua", Some("n1")), ("b", "ub", Some("n1")), ("c", "uc", None)] {
            let mut vm = Vm::new(name, Some("p"), VmSpec { node_name: on.map(str::to_string), ..Default::default() });
            vm.metadata.uid = Some(uid.into());
            vm.metadata.resource_version = Some("1".into());
            vms.record_write(vm);
        }
        let nodes = crate::runtime::store::store::<NodeSpec>().1;
        nodes.record_write(node(true, 0, vec![]));
        (vms, nodes)
    }

    fn names(keys: Vec<ObjectKey>) -> Vec<String> {
        let mut n: Vec<String> = keys.into_iter().map(|k| k.name).collect();
        n.sort();
        n.dedup();
        n
    }

    #[test]
    fn a_heartbeat_concerns_nobody_and_a_readiness_change_every_vm_of_the_node_and_the_unplaced() {
        let (vms, nodes) = stores();
        let map = node_changed(vms, nodes);
        assert_eq!(names(map(Some(&node(true, 0, vec![])), &node(true, 2, vec![]))), Vec::<String>::new());
        assert_eq!(names(map(Some(&node(true, 0, vec![])), &node(false, 0, vec![]))), ["a", "b", "c"]);
        assert_eq!(names(map(None, &node(true, 0, vec![]))), ["a", "b", "c"], "first sighting");
    }

    #[test]
    fn an_exit_concerns_its_vm_once() {
        let (vms, nodes) = stores();
        let map = node_changed(vms, nodes);
        let exit = VmmExitNotice { uid: "ub".into(), at: Utc::now() };
        let before = node(true, 0, vec![]);
        let after = node(true, 2, vec![exit.clone()]);
        assert_eq!(names(map(Some(&before), &after)), ["b"]);
        let again = node(true, 4, vec![exit]);
        assert_eq!(names(map(Some(&after), &again)), Vec::<String>::new(), "the next heartbeat repeats it");
    }

    #[test]
    fn a_deleted_node_concerns_its_vms_and_the_unplaced() {
        let (vms, _) = stores();
        let empty = crate::runtime::store::store::<NodeSpec>().1;
        let map = node_changed(vms, empty);
        assert_eq!(names(map(Some(&node(true, 0, vec![])), &node(true, 0, vec![]))), ["a", "b", "c"]);
    }
}
