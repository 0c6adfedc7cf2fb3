//! Garbage collection: VM run directories, VMM processes, TAP devices and
//! sockets on a node that no VM object claims are removed once they have
//! stayed unclaimed for a grace period. Anything a live VM owns is never
//! touched: a thing is only collected after being seen unclaimed in every
//! pass for the whole period, against a VM list read after the inventory.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use nexus_api::agent::Collect;
use nexus_api::client::{Client, ListParams};
use nexus_api::{NodeSpec, VmSpec};

use crate::agent::AgentClient;

/// Prefix of the TAP devices agents make (`nxt` + 12 hex digits of the uid).
const TAP_PREFIX: &str = "nxt";

/// One unclaimed thing on one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Orphan {
    Vm(String),
    Tap(String),
    Socket(String),
}

/// The TAP name an agent gives VM `uid`.
fn tap_of(uid: &str) -> String {
    let hex: String = uid.chars().filter(|c| *c != '-').take(12).collect();
    format!("{TAP_PREFIX}{hex}")
}

/// What in `inv` no uid in `known` claims.
fn orphans(inv: &nexus_api::agent::Inventory, known: &BTreeSet<String>) -> BTreeSet<Orphan> {
    let mut out = BTreeSet::new();
    let uids: BTreeSet<String> = inv.run_dirs.iter().cloned().chain(inv.vmms.iter().map(|v| v.uid.clone())).collect();
    for uid in &uids {
        if !known.contains(uid) {
            out.insert(Orphan::Vm(uid.clone()));
        }
    }
    // A TAP whose VM (known or not) still has a directory goes with it.
    let claimed: BTreeSet<String> = known.iter().chain(uids.iter()).map(|u| tap_of(u)).collect();
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

/// The collector's memory: when each orphan was first seen, per node.
#[derive(Debug, Default)]
pub struct Collector {
    first_seen: HashMap<(String, Orphan), Instant>,
}

impl Collector {
    /// One pass over every Ready node; returns what was removed.
    pub async fn pass(
        &mut self,
        api: &Client,
        agents: &AgentClient,
        grace: Duration,
        node_grace: chrono::Duration,
    ) -> Vec<String> {
        let mut removed = Vec::new();
        let nodes = match api.list::<NodeSpec>(None, &ListParams::default()).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "listing nodes for garbage collection failed");
                return removed;
            }
        };
        let now = chrono::Utc::now();
        let mut seen_now = BTreeSet::new();
        for node in nodes.items {
            let status = node.status_or_default();
            if !status.is_ready(now, node_grace) {
                continue;
            }
            let inv = match agents.inventory(&status.address).await {
                Ok(inv) => inv,
                Err(e) => {
                    tracing::warn!(node = %node.name(), error = %e, "reading the node's inventory failed");
                    continue;
                }
            };
            // Read after the inventory: whatever the inventory holds for a VM
            // created in between is claimed by the list.
            let Ok(vms) = api.list::<VmSpec>(None, &ListParams::default()).await else { continue };
            // A VM claims its things on the node it is bound to (or anywhere
            // while it is unbound): what a VM placed elsewhere since left here
            // is an orphan too.
            let known: BTreeSet<String> = vms
                .items
                .iter()
                .filter(|v| v.spec.node_name.as_deref().is_none_or(|n| n == node.name()))
                .map(|v| v.uid().to_string())
                .collect();
            let mut due = Collect::default();
            for orphan in orphans(&inv, &known) {
                let key = (node.name().to_string(), orphan.clone());
                seen_now.insert(key.clone());
                let first = *self.first_seen.entry(key).or_insert_with(Instant::now);
                if first.elapsed() < grace {
                    continue;
                }
                match orphan {
                    Orphan::Vm(u) => due.uids.push(u),
                    Orphan::Tap(t) => due.taps.push(t),
                    Orphan::Socket(s) => due.sockets.push(s),
                }
            }
            if due == Collect::default() {
                continue;
            }
            match agents.collect(&status.address, &due).await {
                Ok(gone) => {
                    tracing::info!(node = %node.name(), removed = ?gone, "garbage collected");
                    metrics::counter!("nexus_controller_gc_removed_total").increment(gone.len() as u64);
                    removed.extend(gone.into_iter().map(|g| format!("{}: {g}", node.name())));
                }
                Err(e) => tracing::warn!(node = %node.name(), error = %e, "garbage collection failed"),
            }
        }
        // Forget what is no longer there (or no longer orphaned).
        self.first_seen.retain(|k, _| seen_now.contains(k));
        removed
    }
}

/// Runs a pass every `every`.
pub async fn run(
    api: Client,
    agents: AgentClient,
    events: crate::events::Recorder,
    grace: Duration,
    every: Duration,
    node_grace: chrono::Duration,
) {
    let mut collector = Collector::default();
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        for what in collector.pass(&api, &agents, grace, node_grace).await {
            let (node, item) = what.split_once(": ").unwrap_or(("", &what));
            events.node(node, "GarbageCollected", &format!("removed unclaimed {item}")).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::agent::{Inventory, VmmProcess};

    const A: &str = "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11";
    const B: &str = "00000000-0000-4000-8000-0000000000b2";

    #[test]
    fn only_what_no_vm_claims_is_an_orphan() {
        let inv = Inventory {
            vms: vec![],
            taps: vec![tap_of(A), tap_of(B), "nxt0123456789ab".into()],
            sockets: vec![format!("/run/vms/{A}/fc.sock"), format!("/run/vms/{B}/fc.sock"), "/run/stray.sock".into()],
            run_dirs: vec![A.into(), B.into()],
            vmms: vec![
                VmmProcess { pid: 7, uid: A.into() },
                VmmProcess { pid: 8, uid: "11111111-1111-4111-8111-111111111111".into() },
            ],
        };
        let known: BTreeSet<String> = [A.to_string()].into();
        let got = orphans(&inv, &known);
        let want: BTreeSet<Orphan> = [
            Orphan::Vm(B.into()),
            Orphan::Vm("11111111-1111-4111-8111-111111111111".into()),
            Orphan::Tap("nxt0123456789ab".into()),
            Orphan::Socket("/run/stray.sock".into()),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn a_vm_object_claims_its_tap_even_before_its_directory_exists() {
        let inv = Inventory { taps: vec![tap_of(A)], ..Default::default() };
        assert!(orphans(&inv, &[A.to_string()].into()).is_empty());
    }
}
