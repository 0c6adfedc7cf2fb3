//! Firecracker's API: typed request bodies and a client over its unix socket.

pub mod client;
pub mod models;

pub use client::{FcClient, FcError};
