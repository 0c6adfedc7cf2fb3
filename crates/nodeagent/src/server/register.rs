//! Registration of this host's `Node` and its heartbeat.

use std::time::Duration;

use chrono::Utc;
use nexus_api::conditions;
use nexus_api::meta::{find_condition, set_condition};
use nexus_api::node::NodeCapacity;
use nexus_api::{ConditionStatus, Node, NodeSpec, NodeStatus};
use nexus_client::Client;

/// How long an unasked VMM exit stays in the Node's status.
const EXIT_WINDOW: Duration = Duration::from_secs(60);

/// How long after a notice (a VMM's exit, a removal done) the beat that
/// carries it goes out, so that the notices of a burst go out together.
const NOTICE_DELAY: Duration = Duration::from_millis(50);

/// The least time between two beats that a notice brings forward: while
/// VMs end one after another (a mass delete), each beat carries every
/// notice of its quarter second rather than one or two, at the cost of up
/// to this much delay for those notices (a lone notice waits only
/// [`NOTICE_DELAY`]).
const NOTICE_GAP: Duration = Duration::from_millis(250);

/// What the agent reports about its node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub address: String,
    pub capacity: NodeCapacity,
    pub firecracker_version: String,
    pub bridge: String,
    pub runtime: std::sync::Arc<crate::vm::Runtime>,
    /// The share of the run directory's filesystem kept free (percent):
    /// below it the node reports `DiskPressure`.
    pub min_free_percent: u8,
}

/// Registers the node (creating it if needed) and writes a heartbeat every
/// `interval`, and at once when a VMM ends unasked, forever. Failures are
/// logged and retried on the next beat.
pub async fn heartbeat_loop(client: Client, info: NodeInfo, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered = false;
    // The node as the last beat wrote it: the next beat writes over it
    // without reading it first, unless someone else wrote meanwhile.
    let mut last: Option<Node> = None;
    let mut last_beat = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            // A VMM ended unasked, or a removal finished: tell the
            // controller now (after a moment, so a burst goes out in one
            // beat, and not sooner than NOTICE_GAP after the last).
            _ = info.runtime.host().exits.recorded() => {
                let now = tokio::time::Instant::now();
                tokio::time::sleep_until((now + NOTICE_DELAY).max(last_beat + NOTICE_GAP)).await;
            }
        }
        last_beat = tokio::time::Instant::now();
        // A beat that hangs (the network to the apiserver gone) is given up
        // and the next one opens a new connection, so that beats resume as
        // soon as the network does.
        let limit = (interval * 3).clamp(Duration::from_secs(3), Duration::from_secs(10));
        match tokio::time::timeout(limit, beat(&client, &info, &mut last)).await {
            Ok(Ok(())) if !registered => {
                registered = true;
                tracing::info!(node = %info.name, address = %info.address, "node registered");
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(node = %info.name, error = %e, "heartbeat failed"),
            Err(_) => {
                tracing::warn!(node = %info.name, "heartbeat got no answer in {limit:?}; trying a new connection")
            }
        }
    }
}

/// Writes one heartbeat. With `last` (this agent's previous write) the
/// status is written on the condition that nothing else wrote the node
/// since (a request saved per beat); otherwise, or when something did, the
/// node is read (or created) and its status written over. `last` holds
/// what this beat wrote, and nothing after a failure.
async fn beat(client: &Client, info: &NodeInfo, last: &mut Option<Node>) -> Result<(), nexus_client::ClientError> {
    if let Some(node) = last.take() {
        match client.replace_status(&with_status(node, info)).await {
            Ok(written) => {
                *last = Some(written);
                return Ok(());
            }
            // Changed meanwhile (marked lost, cordoned, relabelled) or deleted.
            Err(e) if e.is_conflict() || e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    let node: Node = match client.get::<NodeSpec>("", &info.name).await {
        Ok(n) => n,
        Err(e) if e.is_not_found() => client.create(&Node::new(&info.name, None, NodeSpec::default())).await?,
        Err(e) => return Err(e),
    };
    let mut node = with_status(node, info);
    // Unconditional: the agent is the only writer of its node's status
    // (the lifecycle controller's NotReady is what this beat corrects).
    node.metadata.resource_version = None;
    *last = Some(client.replace_status(&node).await?);
    Ok(())
}

/// `node` with the status this agent reports now, keeping the conditions
/// it had.
fn with_status(mut node: Node, info: &NodeInfo) -> Node {
    let mut status = node.status.take().unwrap_or_default();
    status = NodeStatus {
        address: info.address.clone(),
        capacity: info.capacity.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        firecracker_version: info.firecracker_version.clone(),
        bridge: info.bridge.clone(),
        subnet: info.runtime.host().subnet().map(|s| s.cidr()).unwrap_or_default(),
        allocated: info.runtime.allocation(),
        image_roots: info.runtime.host().cfg.image_roots.list(),
        disk_clone: info.runtime.host().disk_clone().to_string(),
        last_heartbeat_time: Some(Utc::now()),
        conditions: std::mem::take(&mut status.conditions),
        vmm_exits: info.runtime.host().exits.recent(EXIT_WINDOW),
        removed_vms: info.runtime.host().exits.recent_removals(EXIT_WINDOW),
    };
    set_condition(
        &mut status.conditions,
        conditions::READY,
        ConditionStatus::True,
        conditions::reason::AGENT_HEARTBEAT,
        "the node agent is running",
    );
    disk_pressure(&mut status, info);
    node.status = Some(status);
    node
}

/// Sets the node's `DiskPressure` condition from the run directory's free
/// space (left as it was when the space cannot be read).
fn disk_pressure(status: &mut NodeStatus, info: &NodeInfo) {
    let root = info.runtime.host().cfg.run_dir.root().to_path_buf();
    let space = match crate::host::space::of(&root) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(dir = %root.display(), error = %e, "cannot read the run directory's free space");
            return;
        }
    };
    let (state, reason, message) = match crate::host::space::pressure(space, info.min_free_percent) {
        Some(why) => (ConditionStatus::True, conditions::reason::LOW_DISK_SPACE, why),
        None => (
            ConditionStatus::False,
            conditions::reason::ENOUGH_DISK_SPACE,
            format!("the run directory's filesystem has {} MiB free", space.free >> 20),
        ),
    };
    let was = find_condition(&status.conditions, conditions::DISK_PRESSURE).map(|c| c.status);
    if state == ConditionStatus::True && was != Some(ConditionStatus::True) {
        tracing::warn!(node = %info.name, %message, "disk pressure: new VMs go elsewhere until there is room");
    }
    set_condition(&mut status.conditions, conditions::DISK_PRESSURE, state, reason, &message);
}

/// vCPUs and memory of this host.
pub fn host_capacity(max_vms: u32) -> NodeCapacity {
    let vcpu = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    NodeCapacity { vcpu, mem_mib, max_vms }
}

/// The version the VMM binary prints for `--version`, or why it could not.
pub fn firecracker_version(binary: &std::path::Path) -> String {
    match std::process::Command::new(binary).arg("--version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_string(),
        Err(e) => format!("unavailable: {e}"),
    }
}
