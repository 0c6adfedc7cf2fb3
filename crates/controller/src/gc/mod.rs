//! The garbage collector: VM run directories, VMM processes, TAP devices
//! and sockets on a node that no VM object claims, and snapshot files no
//! Snapshot object claims, are removed once they have stayed unclaimed for
//! a grace period. Anything a live VM owns is
//! never touched: a thing is only collected after being seen unclaimed in
//! every pass for the whole period, against the VM store read after the
//! node's inventory.
//!
//! A controller of nodes: each Ready node gets a pass every interval (the
//! node's own changes, heartbeats included, do not make passes more often).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_api::agent::{Collect, Inventory, tap_name};
use nexus_api::{Node, NodeSpec, SnapshotSpec, VmSpec};
use nexus_client::agent::AgentCallError;

use crate::Context;
use crate::runtime::events::Recorder;
use crate::runtime::{Action, Controller, Reconciler, Store};

/// One unclaimed thing on one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Orphan {
    Vm(String),
    Tap(String),
    Socket(String),
    Snapshot(String),
}

/// What in `inv` no VM uid in `known` and no Snapshot uid in `snapshots`
/// claims.
pub fn orphans(inv: &Inventory, known: &BTreeSet<String>, snapshots: &BTreeSet<String>) -> BTreeSet<Orphan> {
    let mut out = BTreeSet::new();
    for snap in &inv.snapshots {
        if !snapshots.contains(snap) {
            out.insert(Orphan::Snapshot(snap.clone()));
        }
    }
    let uids: BTreeSet<String> = inv.run_dirs.iter().cloned().chain(inv.vmms.iter().map(|v| v.uid.clone())).collect();
    for uid in &uids {
        if !known.contains(uid) {
            out.insert(Orphan::Vm(uid.clone()));
        }
    }
    // A TAP whose VM (known or not) still has a directory goes with it.
    let claimed: BTreeSet<String> = known.iter().chain(uids.iter()).map(|u| tap_name(u)).collect();
    for tap in &inv.taps {
        if !claimed.contains(tap) {
            out.insert(Orphan::Tap(tap.clone()));
        }
    }
    for socket in &inv.sockets {
        let owner = uids.iter().find(|u| socket.contains(&format!("/vms/{u}/")));
        if owner.is_none() {
            out.insert(Orphan::Socket(socket.clone()));
        }
    }
    out
}

/// What the collector remembers of one node.
#[derive(Debug, Default)]
struct NodeMemory {
    /// When each orphan was first seen.
    first_seen: HashMap<Orphan, Instant>,
    last_pass: Option<Instant>,
}

impl NodeMemory {
    /// Updates the memory with this pass's orphans; returns those unclaimed
    /// for at least `grace`.
    fn due(&mut self, now_orphans: BTreeSet<Orphan>, grace: Duration) -> Collect {
        // Forget what is no longer there (or no longer orphaned).
        self.first_seen.retain(|o, _| now_orphans.contains(o));
        let mut due = Collect::default();
        for orphan in now_orphans {
            let first = *self.first_seen.entry(orphan.clone()).or_insert_with(Instant::now);
            if first.elapsed() < grace {
                continue;
            }
            match orphan {
                Orphan::Vm(u) => due.uids.push(u),
                Orphan::Tap(t) => due.taps.push(t),
                Orphan::Socket(s) => due.sockets.push(s),
                Orphan::Snapshot(s) => due.snapshots.push(s),
            }
        }
        due
    }
}

/// Collects what no VM claims.
#[derive(Debug)]
pub struct Collector {
    agents: std::sync::Arc<crate::agents::Agents>,
    events: Recorder,
    vms: Store<VmSpec>,
    snapshots: Store<SnapshotSpec>,
    grace: Duration,
    interval: Duration,
    node_grace: chrono::Duration,
    memory: Mutex<HashMap<String, NodeMemory>>,
}

/// The garbage collector, built from `ctx`.
pub fn controller(ctx: &Context) -> Controller<Collector> {
    let collector = Collector {
        agents: ctx.agents.clone(),
        events: ctx.events.clone(),
        vms: ctx.reflectors.store::<VmSpec>(),
        snapshots: ctx.reflectors.store::<SnapshotSpec>(),
        grace: ctx.settings.gc_grace,
        interval: ctx.settings.gc_interval,
        node_grace: ctx.settings.node_grace,
        memory: Default::default(),
    };
    Controller::new("gc", ctx.reflectors.store::<NodeSpec>(), collector).workers(2)
}

impl Collector {
    fn memory<T>(&self, node: &str, f: impl FnOnce(&mut NodeMemory) -> T) -> T {
        let mut all = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(node.to_string()).or_default())
    }
}

impl Reconciler for Collector {
    type Spec = NodeSpec;
    type Error = AgentCallError;

    async fn reconcile(&self, node: Arc<Node>) -> Result<Action, AgentCallError> {
        let name = node.name().to_string();
        let status = node.status_view();
        if node.is_deleting() || !status.is_ready(chrono::Utc::now(), self.node_grace) {
            // Not now; its next heartbeat brings it back.
            self.memory(&name, |m| m.last_pass = None);
            return Ok(Action::AwaitChange);
        }
        let since = self.memory(&name, |m| m.last_pass.map(|t| t.elapsed()));
        if let Some(since) = since.filter(|s| *s < self.interval) {
            return Ok(Action::RequeueAfter(self.interval - since));
        }
        self.memory(&name, |m| m.last_pass = Some(Instant::now()));
        let inv = self.agents.call(&node, |c, to| async move { c.inventory(&to).await }).await?;
        // Read after the inventory: whatever the inventory holds for a VM
        // created in between is claimed. A VM claims its things on the node
        // it is bound to (or anywhere while unbound): what a VM placed
        // elsewhere since left here is an orphan too.
        let known: BTreeSet<String> = self
            .vms
            .list()
            .iter()
            .filter(|v| v.spec.node_name.as_deref().is_none_or(|n| n == name))
            .map(|v| v.uid().to_string())
            .collect();
        let snapshots: BTreeSet<String> = self.snapshots.list().iter().map(|s| s.uid().to_string()).collect();
        let due = self.memory(&name, |m| m.due(orphans(&inv, &known, &snapshots), self.grace));
        if due != Collect::default() {
            let gone = self
                .agents
                .call(&node, |c, to| {
                    let due = due.clone();
                    async move { c.collect(&to, &due).await }
                })
                .await?
                .removed;
            tracing::info!(node = %name, removed = ?gone, "garbage collected");
            metrics::counter!("nexus_controller_gc_removed_total").increment(gone.len() as u64);
            for item in gone {
                self.events.node(&name, "GarbageCollected", &format!("removed unclaimed {item}")).await;
            }
        }
        Ok(Action::RequeueAfter(self.interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::agent::VmmProcess;

    const A: &str = "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11";
    const B: &str = "00000000-0000-4000-8000-0000000000b2";
    const S: &str = "00000000-0000-4000-8000-0000000000c3";

    #[test]
    fn only_what_no_vm_claims_is_an_orphan() {
        let inv = Inventory {
            vms: vec![],
            taps: vec![tap_name(A), tap_name(B), "nxt0123456789ab".into()],
            sockets: vec![format!("/run/vms/{A}/fc.sock"), format!("/run/vms/{B}/fc.sock"), "/run/stray.sock".into()],
            run_dirs: vec![A.into(), B.into()],
            vmms: vec![
                VmmProcess { pid: 7, uid: A.into() },
                VmmProcess { pid: 8, uid: "11111111-1111-4111-8111-111111111111".into() },
            ],
            snapshots: vec![S.into(), B.into()],
            spare_namespaces: 2,
        };
        let known: BTreeSet<String> = [A.to_string()].into();
        let got = orphans(&inv, &known, &[S.to_string()].into());
        let want: BTreeSet<Orphan> = [
            Orphan::Vm(B.into()),
            Orphan::Vm("11111111-1111-4111-8111-111111111111".into()),
            Orphan::Tap("nxt0123456789ab".into()),
            Orphan::Socket("/run/stray.sock".into()),
            Orphan::Snapshot(B.into()),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn a_vm_object_claims_its_tap_even_before_its_directory_exists() {
        let inv = Inventory { taps: vec![tap_name(A)], ..Default::default() };
        assert!(orphans(&inv, &[A.to_string()].into(), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn an_orphan_is_due_only_after_the_grace_and_forgotten_when_it_goes() {
        let mut m = NodeMemory::default();
        let tap = Orphan::Tap("nxt0123456789ab".into());
        let grace = Duration::from_millis(50);
        assert_eq!(m.due([tap.clone()].into(), grace), Collect::default(), "just seen");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(m.due([tap.clone()].into(), grace).taps, ["nxt0123456789ab"]);
        assert_eq!(m.due(BTreeSet::new(), grace), Collect::default());
        assert_eq!(m.due([tap].into(), grace), Collect::default(), "back again: its clock starts over");
    }
}
