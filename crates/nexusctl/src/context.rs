//! What every command works with: the client and project it was given,
//! how it fails, and how it puts values into request paths.

use nexus_client::{Client, ClientError};

use crate::render;

/// What every command needs.
#[derive(Debug)]
pub struct Context {
    pub client: Client,
    pub project: String,
}

/// A failed command: the message and the exit code (1 error, 2 usage).
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn error(message: impl Into<String>) -> Self {
        Failure { code: 1, message: message.into() }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Failure { code: 2, message: message.into() }
    }
    pub fn api(e: &ClientError) -> Self {
        Failure::error(render::client_error(e))
    }
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
