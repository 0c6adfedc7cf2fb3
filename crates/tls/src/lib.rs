//! TLS for nexus: a cluster CA and the serving certificates it signs
//! ([`pki`]), and HTTPS listeners for the apiserver and the node agent
//! ([`server`]). Clients trust the CA through `nexus_client::tls`.

pub mod pki;
pub mod server;

pub use server::{Serving, ServingError, TlsConfigError, TlsListener, serve, server_config, serving};
