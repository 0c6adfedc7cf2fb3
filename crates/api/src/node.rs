//! The `Node` kind: one host running a node agent.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{NodeAccess, Policy, Readers, Writers};
use crate::registry::{AGE, Column, Format, NAME};

use crate::conditions;
use crate::meta::{Condition, ConditionStatus, Object, ResourceSpec, find_condition};

/// A host that runs microVMs.
pub type Node = Object<NodeSpec>;

/// Desired state of a node, written by operators.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// When true, no new VMs are placed here.
    #[serde(default)]
    pub unschedulable: bool,
}

/// What the node's agent reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeStatus {
    /// Base URL of the agent's API (`http://host:port`).
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub capacity: NodeCapacity,
    #[serde(default)]
    pub agent_version: String,
    /// Version string the VMM binary reports.
    #[serde(default)]
    pub firecracker_version: String,
    /// Name of the bridge TAP devices are attached to.
    #[serde(default)]
    pub bridge: String,
    /// The VM subnet (`172.30.0.0/24`), empty when the bridge has no address.
    #[serde(default)]
    pub subnet: String,
    /// What the VMs placed here take (Running and Paused ones).
    #[serde(default)]
    pub allocated: NodeAllocation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Directories under which the agent opens kernels and disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_roots: Vec<String>,
    /// How the agent makes VM disks: `reflink` (constant time) or `copy`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub disk_clone: String,
    /// VMM processes that ended unasked in the last minute, oldest first.
    /// The agent beats at once when one ends, so the controller looks at
    /// that VM within moments instead of at its next recheck.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vmm_exits: Vec<VmmExitNotice>,
    /// VMs whose removal the agent finished in the last minute, oldest
    /// first: a removal is asked for and answered at once, and this tells
    /// the controller to come back for its result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_vms: Vec<VmmExitNotice>,
}

/// One VMM process that ended without the agent stopping it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmmExitNotice {
    /// The VM's uid.
    pub uid: String,
    pub at: DateTime<Utc>,
}

/// Resources a node offers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeCapacity {
    pub vcpu: u32,
    pub mem_mib: u64,
    pub max_vms: u32,
}

/// Resources taken on a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeAllocation {
    pub vcpu: u32,
    pub mem_mib: u64,
    pub vms: u32,
}

impl ResourceSpec for NodeSpec {
    type Status = NodeStatus;
    const KIND: &'static str = "Node";
    const PLURAL: &'static str = "nodes";
    const NAMESPACED: bool = false;
    const POLICY: Policy = Policy::cluster(Readers::Everyone, Writers::ClusterAdmins).nodes(NodeAccess::Own);
    const ALIASES: &'static [&'static str] = &["node", "no"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("READY", &["status.conditions"], Format::Condition(conditions::READY)),
        Column::new("ADDRESS", &["status.address"], Format::Text),
        Column::new("DISK-PRESSURE", &["status.conditions"], Format::Condition(conditions::DISK_PRESSURE)).wide(),
        Column::new("VCPU", &["status.capacity.vcpu"], Format::Text).wide(),
        Column::new("MEMORY", &["status.capacity.memMib"], Format::Mebibytes).wide(),
        Column::new("MAX-VMS", &["status.capacity.maxVms"], Format::Text).wide(),
        AGE,
        Column::new("AGENT", &["status.agentVersion"], Format::Text).wide(),
        Column::new("FIRECRACKER", &["status.firecrackerVersion"], Format::Text).wide(),
    ];
}

impl NodeStatus {
    /// Whether the agent says it is Ready and heartbeated within `grace`.
    pub fn is_ready(&self, now: DateTime<Utc>, grace: chrono::Duration) -> bool {
        let ready =
            find_condition(&self.conditions, conditions::READY).is_some_and(|c| c.status == ConditionStatus::True);
        let fresh = self.last_heartbeat_time.is_some_and(|t| now - t <= grace);
        ready && fresh && !self.address.is_empty()
    }
}
