//! The condition types the system writes into statuses, and the reasons
//! it gives, named once so that writers and readers (the controllers,
//! nexusctl, the console's tests) agree on the spelling.

/// The object does what its spec asks (a VM's guest runs and passed its
/// probe, a node's agent beats, a snapshot's files are complete).
pub const READY: &str = "Ready";
/// A VM's template and images resolved into a complete configuration.
pub const RESOLVED: &str = "Resolved";
/// A VM is placed on a node.
pub const SCHEDULED: &str = "Scheduled";
/// A pool's rollout moves (or why it does not).
pub const PROGRESSING: &str = "Progressing";
/// A pool could not make one of its VMs.
pub const REPLICA_FAILURE: &str = "ReplicaFailure";
/// A pool has at least its minimum of VMs available.
pub const AVAILABLE: &str = "Available";
/// A running VM's spec asks for what only a restart gives it (drives added
/// or removed).
pub const RESTART_PENDING: &str = "RestartPending";

/// A node's run directory is short of free space (True): new VMs are not
/// placed there until it has room again.
pub const DISK_PRESSURE: &str = "DiskPressure";

/// Reasons of conditions (and of the Events that go with them).
pub mod reason {
    /// `Resolved`: the configuration is complete.
    pub const RESOLVED: &str = "Resolved";
    /// `Scheduled`: placed on a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// `Scheduled` False: no node fits now.
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// `Scheduled` False: the snapshot to restore from is on a node that is gone.
    pub const SNAPSHOT_NODE_NOT_FOUND: &str = "SnapshotNodeNotFound";
    /// `Ready`: the guest runs (no readiness probe).
    pub const RUNNING: &str = "Running";
    /// `Ready`: the readiness probe passed.
    pub const PROBE_PASSED: &str = "ProbePassed";
    /// `Ready` False: the readiness probe failed.
    pub const PROBE_FAILED: &str = "ProbeFailed";
    /// `Ready` False: the node has not run the readiness probe yet.
    pub const PROBE_PENDING: &str = "ProbePending";
    /// `Ready` False: the VMM ended and the restart policy keeps it down.
    pub const EXITED: &str = "Exited";
    /// `Ready` False: the node refused the VM for good.
    pub const FAILED: &str = "Failed";
    /// `Ready` False: a node found an image different from its Image.
    pub const IMAGE_INVALID: &str = "ImageInvalid";
    /// `Ready` Unknown: the VM's node is not Ready.
    pub const NODE_NOT_READY: &str = "NodeNotReady";
    /// `Ready` Unknown: the node named does not exist.
    pub const NODE_NOT_FOUND: &str = "NodeNotFound";
    /// `Ready` and `Scheduled` False: the VM's node was deleted.
    pub const NODE_DELETED: &str = "NodeDeleted";
    /// A node's `Ready`: its agent beats.
    pub const AGENT_HEARTBEAT: &str = "AgentHeartbeat";
    /// A node's `Ready` False: its agent stopped beating.
    pub const NODE_STATUS_UNKNOWN: &str = "NodeStatusUnknown";
    /// A snapshot's `Ready` Unknown: its files are being written.
    pub const CREATING: &str = "Creating";
    /// A snapshot's `Ready`: its files are complete.
    pub const CREATED: &str = "Created";
    /// A pool's `ReplicaFailure`: a VM could not be created.
    pub const FAILED_CREATE: &str = "FailedCreate";
    /// A VM's `Ready` False: a Volume it names is used by another VM.
    pub const VOLUME_IN_USE: &str = "VolumeInUse";
    /// `Scheduled` False: the VM's volumes are on different nodes.
    pub const VOLUMES_APART: &str = "VolumesOnDifferentNodes";
    /// A VM's `RestartPending` True: part of its spec takes effect at its
    /// next start.
    pub const DRIVES_CHANGED: &str = "DrivesChanged";
    /// The node's disk is full: a VM's disk, snapshot or log could not be
    /// written there.
    pub const NODE_DISK_FULL: &str = "NodeDiskFull";
    /// A node's `DiskPressure` True: less free space than the agent keeps.
    pub const LOW_DISK_SPACE: &str = "LowDiskSpace";
    /// A node's `DiskPressure` False.
    pub const ENOUGH_DISK_SPACE: &str = "EnoughDiskSpace";
    /// The VMM does not answer its API (stopped, or stuck).
    pub const VMM_NOT_ANSWERING: &str = "VmmNotAnswering";
}
