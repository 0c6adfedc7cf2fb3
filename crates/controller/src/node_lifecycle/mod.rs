//! The node lifecycle controller: a node whose agent stops heartbeating is
//! marked NotReady, and the VMs placed on it are told so. When it beats
//! again, its agent marks it Ready and the VMs are reconciled (adopted, not
//! remade). Driven by the node store: each node is looked at when it
//! changes and again at the moment its last heartbeat would turn stale.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nexus_api::conditions;
use nexus_api::event::EventType;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::{ConditionStatus, Node, NodeSpec, NodeStatus, VmSpec};
use nexus_client::{Client, ClientError};

use crate::Context;
use crate::runtime::events::Recorder;
use crate::runtime::{Action, Controller, Reconciler, Store};
use crate::vm::BY_NODE;

/// What to do about a node, decided from its status alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Ready and fresh: look again when the heartbeat would turn stale.
    RecheckIn(Duration),
    /// Its Ready condition is not True already: nothing to do.
    NotReady,
    /// Ready, but the last heartbeat is older than the grace: mark it lost.
    Lost { message: String },
}

/// Decides about a node with `status` at `now`, given the heartbeat `grace`.
pub fn verdict(status: &NodeStatus, now: DateTime<Utc>, grace: chrono::Duration) -> Verdict {
    let ready =
        find_condition(&status.conditions, conditions::READY).is_some_and(|c| c.status == ConditionStatus::True);
    if !ready {
        return Verdict::NotReady;
    }
    match status.last_heartbeat_time {
        Some(t) if now - t <= grace => {
            // A little after the moment it turns stale.
            let left = (t + grace - now).to_std().unwrap_or_default();
            Verdict::RecheckIn(left + Duration::from_millis(100))
        }
        last => {
            let age = last.map(|t| (now - t).num_seconds()).unwrap_or(-1);
            Verdict::Lost { message: format!("no heartbeat from the node agent for {age}s") }
        }
    }
}

/// Marks silent nodes NotReady.
#[derive(Debug)]
pub struct NodeLifecycle {
    api: Client,
    events: Recorder,
    vms: Store<VmSpec>,
    grace: chrono::Duration,
}

/// The node lifecycle controller, built from `ctx`.
pub fn controller(ctx: &Context) -> Controller<NodeLifecycle> {
    let vms = crate::vm::Stores::from(ctx).vms;
    let reconciler =
        NodeLifecycle { api: ctx.api.clone(), events: ctx.events.clone(), vms, grace: ctx.settings.node_grace };
    Controller::new("node-lifecycle", ctx.reflectors.store::<NodeSpec>(), reconciler).workers(2)
}

impl Reconciler for NodeLifecycle {
    type Spec = NodeSpec;
    type Error = ClientError;

    async fn reconcile(&self, node: Arc<Node>) -> Result<Action, ClientError> {
        let mut status = node.status_or_default();
        let message = match verdict(&status, Utc::now(), self.grace) {
            Verdict::RecheckIn(d) => return Ok(Action::RequeueAfter(d)),
            Verdict::NotReady => return Ok(Action::AwaitChange),
            Verdict::Lost { message } => message,
        };
        set_condition(
            &mut status.conditions,
            conditions::READY,
            ConditionStatus::False,
            conditions::reason::NODE_STATUS_UNKNOWN,
            &message,
        );
        let mut next = (*node).clone();
        next.status = Some(status);
        match self.api.replace_status(&next).await {
            // The agent beat meanwhile: its write wins, and its change brings us back.
            Err(e) if e.is_conflict() => return Ok(Action::AwaitChange),
            other => other?,
        };
        tracing::warn!(node = %node.name(), %message, "node lost");
        for vm in self.vms.by_index(BY_NODE, node.name()) {
            let note = format!("node {} stopped answering: {message}", node.name());
            self.events.publish(&*vm, EventType::Warning, "NodeLost", &note).await;
        }
        Ok(Action::AwaitChange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(ready: bool, beat: Option<DateTime<Utc>>) -> NodeStatus {
        let mut s = NodeStatus { last_heartbeat_time: beat, ..Default::default() };
        let c = if ready { ConditionStatus::True } else { ConditionStatus::False };
        set_condition(&mut s.conditions, conditions::READY, c, "AgentHeartbeat", "");
        s
    }

    #[test]
    fn a_fresh_node_is_looked_at_again_when_its_heartbeat_would_turn_stale() {
        let now = Utc::now();
        let grace = chrono::Duration::seconds(6);
        let v = verdict(&status(true, Some(now - chrono::Duration::seconds(2))), now, grace);
        assert_eq!(v, Verdict::RecheckIn(Duration::from_millis(4100)));
    }

    #[test]
    fn a_silent_ready_node_is_lost_and_a_not_ready_one_left_alone() {
        let now = Utc::now();
        let grace = chrono::Duration::seconds(6);
        let lost = verdict(&status(true, Some(now - chrono::Duration::seconds(9))), now, grace);
        assert_eq!(lost, Verdict::Lost { message: "no heartbeat from the node agent for 9s".into() });
        assert_eq!(verdict(&status(false, Some(now - chrono::Duration::seconds(90))), now, grace), Verdict::NotReady);
        assert!(matches!(verdict(&status(true, None), now, grace), Verdict::Lost { .. }));
    }
}
