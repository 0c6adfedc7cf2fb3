//! Wire types of the node agent's API, used by the controller and the agent.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::vm::{PowerState, RestartPolicy};

/// Prefix of every TAP device a node agent creates.
pub const TAP_PREFIX: &str = "nxt";

/// The TAP device of VM `uid` on its node: the prefix and the first 12 hex
/// digits of the uid (IFNAMSIZ allows 15 characters).
pub fn tap_name(uid: &str) -> String {
    let hex: String = uid.chars().filter(|c| *c != '-').take(12).collect();
    format!("{TAP_PREFIX}{hex}")
}

/// The fully resolved configuration of one VM, as the controller asks a
/// node agent to realise it. Sending the same request twice is a no-op.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnsureVm {
    /// The VM object's uid; names the run directory, the TAP and the VMM.
    pub uid: String,
    /// `project/name`, for logs and inventory only.
    pub display_name: String,
    pub state: PowerState,
    pub vcpu: u8,
    pub mem_mib: u32,
    pub kernel_path: String,
    pub rootfs_path: String,
    pub boot_args: String,
    pub mac: String,
    /// `auto` or an address in the node's VM subnet; `None`: no `ip=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Boot from this snapshot instead of the kernel, when the VMM is new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreFrom>,
    /// Whether a VMM that ended on its own is started again.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// The kernel's expected sha256 (from its Image), checked before use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_sha256: Option<String>,
    /// The root filesystem's expected sha256 (from its Image), checked
    /// before use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_sha256: Option<String>,
    /// Where the node downloads the kernel when its copy is missing or does
    /// not match `kernel_sha256`: a URL, or a path on the apiserver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_source: Option<String>,
    /// The same for the root filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_source: Option<String>,
    /// Host path of the initial ramdisk, when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_source: Option<String>,
    /// The guest check the node runs while the VM runs; its result comes
    /// back in the report's `probe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<crate::vm::ReadinessProbe>,
    /// The VM's `metadata.generation` (the applied limits report it).
    #[serde(default)]
    pub generation: i64,
    /// Extra drives, attached after the root drive in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<crate::storage::ResolvedDrive>,
    /// I/O limits of the root drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_rate_limiter: Option<crate::storage::RateLimiter>,
    /// I/O limits of the network interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_limits: Option<crate::storage::NetworkLimits>,
    /// Who the VM is, for the document its guest reads from the metadata
    /// service; the agent adds the uid, its node and the VM's address.
    /// Changed on a running VM without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::guest::GuestIdentity>,
}

/// A snapshot to start a VM from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreFrom {
    /// uid of the Snapshot object; its files are the node's
    /// `snapshots/<uid>`.
    pub snapshot_uid: String,
    /// Where to copy the files from when this node has no intact copy: the
    /// node that took the snapshot. Absent when this is that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<SnapshotOrigin>,
}

/// The node that took a snapshot, as another node reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotOrigin {
    /// Its Node name.
    pub node: String,
    /// Its agent's base URL (`https://10.0.0.5:7444`).
    pub address: String,
}

/// `GET /v1/snapshots/{uid}/transfer` on the node that took a snapshot:
/// what another node needs to copy it (each file then from
/// `.../transfer/{name}`, `name` one of [`SNAPSHOT_FILES`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotManifest {
    pub report: SnapshotReport,
    /// sha256 of each file, by name, recorded by this node from the files
    /// as it wrote them.
    pub sha256: std::collections::BTreeMap<String, String>,
}

/// The files of a snapshot, by the names its report and transfers use.
pub const SNAPSHOT_FILES: [&str; 3] = ["state", "memory", "disk"];

/// Body of `PUT /v1/snapshots/{uid}`: take snapshot `uid` of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotRequest {
    /// uid of the VM to snapshot.
    pub vm_uid: String,
    /// Leave the VM running afterwards (resuming it if it is paused, as
    /// after a crash mid-snapshot); else it stays Paused.
    #[serde(default = "yes")]
    pub resume_after: bool,
}

fn yes() -> bool {
    true
}

/// A complete snapshot on a node: the VM state, its memory and its disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotReport {
    /// uid of the Snapshot object.
    pub uid: String,
    /// uid of the VM it was taken from.
    pub vm_uid: String,
    pub files: Vec<crate::snapshot::SnapshotFile>,
    /// Bytes the files take on disk.
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
    /// How long the VM was paused for it, in milliseconds.
    pub paused_millis: u64,
    /// The guest's MAC address: a VM restored from the snapshot has it.
    pub mac: String,
    /// The guest's address, when it had one from the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// Body of `PUT /v1/volumes/{uid}`: make volume `uid` on the node (a
/// no-op when it is there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeRequest {
    /// `project/name`, for logs only.
    pub display_name: String,
    /// An empty sparse disk of this many MiB, or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// a copy of this image file (checked against its sha256, downloaded
    /// from its source when the node lacks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageFile>,
}

/// An Image's file as a node finds, checks and fetches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageFile {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A volume on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeReport {
    pub uid: String,
    /// Its file on the node.
    pub path: String,
    /// Its size (apparent bytes).
    pub size_bytes: u64,
}

/// What a node agent observes about one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObservedState {
    Running,
    Paused,
    Stopped,
    /// The VMM ended on its own and the restart policy keeps it down; the
    /// report's `exit` says how. Asking for `Stopped` clears this.
    Exited,
    /// Nothing of this VM exists on the node.
    Absent,
    /// Its removal is under way (the guest asked to shut down, then the
    /// VMM stopped, then its files and links removed); ask again for the
    /// result, or wait for the node's `removedVms` notice.
    Removing,
}

/// A node agent's report on one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmReport {
    pub uid: String,
    pub state: ObservedState,
    /// What runs on the host for the VM: the VM's `status.runtime` as the
    /// controller writes it.
    #[serde(flatten)]
    pub runtime: crate::vm::VmRuntime,
    /// The readiness probe's result, when the VM has one and its guest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeResult>,
}

/// What a readiness probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    pub passed: bool,
    /// What was seen: the matching line, or why it failed.
    pub message: String,
}

/// Everything the agent finds on its host, known to it or not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// Each VM's report, when asked for (`?vms=true`).
    #[serde(default)]
    pub vms: Vec<VmReport>,
    /// TAP devices with the agent's name prefix.
    pub taps: Vec<String>,
    /// Unix sockets found anywhere under the run directory.
    pub sockets: Vec<String>,
    /// Entries of `<run dir>/vms` (normally VM uids).
    pub run_dirs: Vec<String>,
    /// Live VMM processes of this agent, whether or not a run directory names them.
    #[serde(default)]
    pub vmms: Vec<VmmProcess>,
    /// Entries of `<run dir>/snapshots` (normally Snapshot uids).
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// Network namespaces ready for restored VMs (`--spare-netns`).
    #[serde(default)]
    pub spare_namespaces: u32,
}

/// A VMM process the agent found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmmProcess {
    pub pid: u32,
    pub uid: String,
}

/// What the controller's garbage collector asks a node to remove: things it
/// has seen unclaimed by any VM for longer than its grace period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Collect {
    /// VM uids: their VMM, TAP and run directory go.
    #[serde(default)]
    pub uids: Vec<String>,
    /// TAP devices (agent prefix only).
    #[serde(default)]
    pub taps: Vec<String>,
    /// Socket files under the run directory.
    #[serde(default)]
    pub sockets: Vec<String>,
    /// Snapshot uids: their files go.
    #[serde(default)]
    pub snapshots: Vec<String>,
}

/// What the agent removed for a [`Collect`] request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectReport {
    /// One line per removed thing (`vm <uid>`, `tap <name>`, `socket <path>`,
    /// `snapshot <uid>`).
    pub removed: Vec<String>,
}

/// What a node offers, what its VMs take, and how it runs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityReport {
    pub capacity: crate::node::NodeCapacity,
    pub allocated: crate::node::NodeAllocation,
    /// The VM subnet, when the bridge has an address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// `systemd` (a transient scope per VMM) or `direct`.
    pub process_manager: String,
    /// Whether unscoped VMMs get cgroup limits.
    pub cgroups: bool,
    /// How VM disks are made: `reflink` (constant time) or `copy`.
    pub disk_clone: String,
}

/// A VM's metrics as its node collected them: cumulative counters (see the
/// node agent's `/metrics` for their names) and their rates over the last
/// sampling interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmStats {
    pub uid: String,
    /// When the values were read.
    pub at: DateTime<Utc>,
    /// Firecracker's counters, summed over its flushes.
    pub counters: std::collections::BTreeMap<String, f64>,
    /// The same counters' rates per second over the last interval.
    #[serde(default)]
    pub rates_per_second: std::collections::BTreeMap<String, f64>,
    /// CPU time of the VMM process, from the host.
    pub cpu_seconds: f64,
    /// CPU use over the last interval, percent of one CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Resident memory of the VMM process.
    pub rss_bytes: u64,
    /// Each drive's counters (read and write bytes and ops, throttled
    /// requests), by drive id (`rootfs` and the extra drives' names).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub drives: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
}

/// A node's use of its host, and its VMs' stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStats {
    pub at: DateTime<Utc>,
    /// CPU use of the whole host over the last interval, percent of all CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// Resident memory of all VMMs.
    pub vm_rss_bytes: u64,
    pub vms: Vec<VmStats>,
}
