//! Clients of nexus's HTTP APIs: the apiserver's typed client with watch
//! streams ([`apiserver`]), the node agents' client ([`agent`]), which
//! certificate authorities they trust ([`tls`]), and the request id they
//! pass on ([`trace`]). The types they send and receive live in
//! `nexus-api`, which does no I/O.

pub mod agent;
pub mod apiserver;
pub mod tls;
pub mod trace;

pub use apiserver::{Client, ClientError, Event, ListParams};
