//! The nexus node agent: runs Firecracker microVMs on one host, with their
//! TAP devices on a bridge, and answers the controller's declarative calls.
//!
//! - [`vm`]: the VM runtime: its front door ([`vm::Runtime`]) and one
//!   owner task per VM, fed typed commands, that launches, configures,
//!   observes and tears down that VM;
//! - [`host`]: what the node's VMs share: the bridge, NAT, addresses, TAP
//!   devices, clone namespaces, cgroups and scopes, jails, VMM processes,
//!   disk copies and images;
//! - [`server`]: the agent's HTTP API, the Firecracker passthrough, the
//!   node's credentials and its registration with the apiserver;
//! - [`firecracker`]: Firecracker's API, typed, over its unix socket;
//! - [`paths`]: the run directory's layout, where names become paths.

pub mod error;
pub mod firecracker;
pub mod host;
pub mod paths;
pub mod server;
pub mod vm;
