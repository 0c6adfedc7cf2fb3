//! Clients of nexus's HTTP APIs: the apiserver's typed client with watch
//! streams ([`apiserver`]), the node agents' client ([`agent`]), which
//! certificate authorities they trust ([`tls`]), and the request id they
//! pass on ([`trace`]). The types they send and receive live in
//! `nexus-api`, which does no I/O.

pub mod agent;
pub mod apiserver;
pub mod fence;
pub mod servers;
pub mod tls;
pub mod trace;

pub use apiserver::{Client, ClientError, Event, ListParams};

use std::time::Duration;

/// How long a peer may stay silent before its connection is given up: a
/// request or watch to a host cut off from this one fails after about this
/// long instead of waiting for TCP's own retransmission timeouts (minutes),
/// and the next attempt opens a new connection.
pub const DEAD_PEER: Duration = Duration::from_secs(5);

/// The HTTP client settings every client here starts from: keepalive probes
/// on idle connections (idle 2 s, then one a second) and a user timeout on
/// unacknowledged data, both ending a connection after [`DEAD_PEER`]. A
/// busy but living peer's kernel still answers both, so long requests and
/// watches to it are not cut.
pub(crate) fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tcp_keepalive(Duration::from_secs(2))
        .tcp_keepalive_interval(Duration::from_secs(1))
        .tcp_keepalive_retries(3)
        .tcp_user_timeout(DEAD_PEER)
}
