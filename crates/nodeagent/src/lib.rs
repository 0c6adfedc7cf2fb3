//! The nexus node agent: runs Firecracker microVMs on one host, with their
//! TAP devices on a bridge, and answers the controller's declarative calls.

pub mod api;
pub mod cgroup;
pub mod clonenet;
pub mod credentials;
pub mod dirwatch;
pub mod disk;
pub mod error;
pub mod exits;
pub mod fetch;
pub mod firecracker;
pub mod forks;
pub mod hostcheck;
pub mod images;
pub mod ipam;
pub mod jail;
pub mod logs;
pub mod nat;
pub mod net;
pub mod paths;
pub mod probe;
pub mod process;
pub mod proxy;
pub mod register;
pub mod scope;
pub mod snapshots;
pub mod vm_metrics;
pub mod vms;
