//! The node lifecycle: a node whose agent stops heartbeating is marked
//! NotReady, and the VMs placed on it are told so. When it beats again, its
//! agent marks it Ready and the VMs are reconciled (adopted, not remade).

use std::time::Duration;

use chrono::Utc;
use nexus_api::client::{Client, ListParams};
use nexus_api::event::EventType;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::node::CONDITION_READY;
use nexus_api::{ConditionStatus, NodeSpec, VmSpec};

use crate::events::Recorder;

/// Checks every node every `every`; a heartbeat older than `grace` makes it NotReady.
pub async fn run(api: Client, events: Recorder, grace: chrono::Duration, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        if let Err(e) = check(&api, &events, grace).await {
            tracing::warn!(error = %e, "checking nodes failed");
        }
    }
}

async fn check(api: &Client, events: &Recorder, grace: chrono::Duration) -> Result<(), nexus_api::client::ClientError> {
    let nodes = api.list::<NodeSpec>(None, &ListParams::default()).await?.items;
    let now = Utc::now();
    for mut node in nodes {
        let mut status = node.status_or_default();
        let fresh = status.last_heartbeat_time.is_some_and(|t| now - t <= grace);
        let ready =
            find_condition(&status.conditions, CONDITION_READY).is_some_and(|c| c.status == ConditionStatus::True);
        if fresh || !ready {
            continue;
        }
        let age = status.last_heartbeat_time.map(|t| (now - t).num_seconds()).unwrap_or(-1);
        let message = format!("no heartbeat from the node agent for {age}s");
        set_condition(&mut status.conditions, CONDITION_READY, ConditionStatus::False, "NodeStatusUnknown", &message);
        node.status = Some(status);
        match api.replace_status(&node).await {
            // The agent came back meanwhile: its write wins.
            Err(e) if e.is_conflict() => continue,
            other => other?,
        };
        tracing::warn!(node = %node.name(), %message, "node lost");
        let params =
            ListParams { field_selector: Some(format!("spec.nodeName={}", node.name())), ..Default::default() };
        for vm in api.list::<VmSpec>(None, &params).await?.items {
            events
                .vm(&vm, EventType::Warning, "NodeLost", &format!("node {} stopped answering: {message}", node.name()))
                .await;
        }
    }
    Ok(())
}
