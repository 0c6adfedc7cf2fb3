//! Request bodies, checked the way Firecracker checks them: unknown fields
//! and missing required fields are refused before any rule is applied.
//!
//! What `GET /vm/config` reports is these bodies serialized: fields
//! Firecracker reports as `null` (a drive's `partuuid`, a bucket's
//! `one_time_burst`, a missing rate limiter) are kept as `null`, not left out.
//!
//! Deliberately not shared with the agent's client models: a stand-in that
//! reused the client's types would agree with the client's mistakes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub huge_pages: HugePages,
}

/// `huge_pages`: serde's own refusal of another value is Firecracker's
/// ("unknown variant `1G`, expected `None` or `2M`").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    TwoMiB,
}

/// A guest MAC address, refused while parsing as Firecracker refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Mac(pub String);

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parts: Vec<&str> = text.split(':').collect();
        let ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        if ok { Ok(Mac(text)) } else { Err(serde::de::Error::custom("The provided MAC address is invalid.")) }
    }
}

/// A logger level, any case, `Warn` or `Warning`; anything else is
/// refused while parsing, in Firecracker's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Level(pub String);

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.to_lowercase().as_str() {
            "off" | "trace" | "debug" | "info" | "warn" | "warning" | "error" => Ok(Level(text)),
            _ => Err(serde::de::Error::custom("Invalid LevelFilter")),
        }
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: HugePages::None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default)]
    pub initrd_path: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default)]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

impl TokenBucket {
    /// The bucket Firecracker makes of this configuration: none for a size
    /// or refill time of 0 (such a bucket limits nothing).
    fn live(self) -> Option<TokenBucket> {
        (self.size > 0 && self.refill_time > 0).then_some(self)
    }
}

impl RateLimiter {
    /// The limiter Firecracker keeps for a device configured with `self`
    /// (`PUT`): buckets of size or refill time 0 are dropped; none when
    /// neither is left.
    pub fn live(self) -> Option<RateLimiter> {
        let live = RateLimiter {
            bandwidth: self.bandwidth.and_then(TokenBucket::live),
            ops: self.ops.and_then(TokenBucket::live),
        };
        (live.bandwidth.is_some() || live.ops.is_some()).then_some(live)
    }

    /// `current` after a `PATCH` with `update`, bucket by bucket as
    /// Firecracker does: an absent bucket is left as it is, one of size or
    /// refill time 0 is removed, any other replaces it.
    pub fn updated(current: Option<RateLimiter>, update: &RateLimiter) -> Option<RateLimiter> {
        let current = current.unwrap_or(RateLimiter { bandwidth: None, ops: None });
        let apply = |now: Option<TokenBucket>, new: Option<TokenBucket>| match new {
            None => now,
            Some(b) => b.live(),
        };
        let next =
            RateLimiter { bandwidth: apply(current.bandwidth, update.bandwidth), ops: apply(current.ops, update.ops) };
        (next.bandwidth.is_some() || next.ops.is_some()).then_some(next)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default)]
    pub socket: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<Mac>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    pub action_type: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /machine-config`: every field optional.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPatch {
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    #[serde(default)]
    pub mem_size_mib: Option<usize>,
    #[serde(default)]
    pub smt: Option<bool>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(default)]
    pub snapshot_type: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: String,
    pub backend_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub resume_vm: Option<bool>,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default)]
    pub clock_realtime: Option<bool>,
}

/// What the simulator writes as "microVM state": its configuration, so a
/// load restores the same devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    pub magic: String,
    pub firecracker_version: String,
    pub machine: MachineConfig,
    pub boot: Option<BootSource>,
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    /// The metadata service's configuration (its contents are not kept).
    #[serde(default)]
    pub mmds_config: Option<MmdsConfig>,
}

/// `PUT /mmds/config`, and what `GET /vm/config` reports of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    pub network_interfaces: Vec<String>,
    #[serde(default)]
    pub ipv4_address: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub imds_compat: bool,
}

/// The metadata service's protocol; Firecracker's default is `V1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

/// Marks a state file as written by this simulator.
pub const SNAPSHOT_MAGIC: &str = "firecracker-sim-snapshot-v1";
