//! The agent's error type and its mapping to HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nexus_api::ErrorBody;

use crate::firecracker::FcError;
use crate::host::jail::JailError;
use crate::host::net::NetError;
use crate::host::process::ProcessError;
use crate::paths::PathError;

/// Everything an agent call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("missing or wrong agent credential")]
    Unauthorized,
    /// The caller's lease term is older than one this agent has already
    /// served (see `server::fence`).
    #[error("{0}")]
    Fenced(String),
    #[error(transparent)]
    BadPath(#[from] PathError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    /// The thing is in use (a volume a VMM has attached).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    ImageInvalid(String),
    #[error("Firecracker step {step} failed")]
    Firecracker {
        step: &'static str,
        #[source]
        source: FcError,
    },
    #[error("the VMM did not open its API socket {socket} within {seconds}s")]
    VmmDidNotStart { socket: String, seconds: u64 },
    #[error("host networking failed")]
    Net(#[from] NetError),
    #[error("starting the VMM failed")]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot could not be copied from the node that took it (it did
    /// not answer, or a file did not match its sha256): worth retrying.
    #[error("{0}")]
    SnapshotCopy(String),
    /// The node's disk is full: worth retrying once there is room.
    #[error("{what} failed: the node's disk is full")]
    DiskFull {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// An I/O failure doing `what`; a full disk is told apart (the node
    /// recovers by itself once there is room).
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| {
            let full = source.kind() == std::io::ErrorKind::StorageFull || source.raw_os_error() == Some(libc::ENOSPC);
            if full { AgentError::DiskFull { what, source } } else { AgentError::Io { what, source } }
        }
    }

    /// The HTTP status; the only place the agent chooses one. 4xx means
    /// sending the same request again will fail the same way.
    pub fn status_code(&self) -> StatusCode {
        match self {
            AgentError::Unauthorized => StatusCode::UNAUTHORIZED,
            AgentError::BadPath(_) | AgentError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Forbidden(_) => StatusCode::FORBIDDEN,
            AgentError::Conflict(_) | AgentError::Fenced(_) => StatusCode::CONFLICT,
            AgentError::ImageInvalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Firecracker { source, .. } if !source.is_retryable() => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Firecracker { .. } | AgentError::VmmDidNotStart { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Jail(JailError::Unreadable { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Jail(JailError::Exhausted { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Net(_) | AgentError::Process(_) | AgentError::Jail(_) | AgentError::Io { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            AgentError::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
            AgentError::SnapshotCopy(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            AgentError::Unauthorized => "Unauthorized",
            AgentError::BadPath(_) | AgentError::Invalid(_) => "Invalid",
            AgentError::NotFound(_) => "NotFound",
            AgentError::Forbidden(_) => "Forbidden",
            AgentError::Conflict(_) => "Conflict",
            AgentError::Fenced(_) => "Fenced",
            AgentError::ImageInvalid(_) => "ImageInvalid",
            AgentError::Firecracker { source, .. } if !source.is_retryable() => "FirecrackerRejected",
            AgentError::Firecracker { source: FcError::Timeout { .. }, .. } => {
                nexus_api::conditions::reason::VMM_NOT_ANSWERING
            }
            AgentError::Firecracker { .. } | AgentError::VmmDidNotStart { .. } => "VmmUnavailable",
            AgentError::Net(_) => "NetworkSetupFailed",
            AgentError::Process(_) => "VmmLaunchFailed",
            AgentError::Jail(JailError::Unreadable { .. }) => "ImageUnreadable",
            AgentError::Jail(JailError::Exhausted { .. }) => "NoVmmUser",
            AgentError::Jail(_) => "JailFailed",
            AgentError::Io { .. } => "HostError",
            AgentError::DiskFull { .. } => nexus_api::conditions::reason::NODE_DISK_FULL,
            AgentError::SnapshotCopy(_) => "SnapshotCopyFailed",
        }
    }

    fn suggestion(&self) -> Option<String> {
        match self {
            AgentError::Unauthorized => {
                Some("send this node's agent credential as `Authorization: Bearer <token>`".into())
            }
            AgentError::ImageInvalid(_) => Some(
                "the file on this node differs from what its Image says: fix the file or the Image's sha256".into(),
            ),
            AgentError::Forbidden(m) if m.contains("image roots") || m.contains("images must be") => Some(
                "name an Image whose path lies under one of the node's image roots (nexus-nodeagent --image-root)"
                    .into(),
            ),
            AgentError::Firecracker { step, source } if !source.is_retryable() => Some(format!(
                "Firecracker rejected the {step} configuration; fix the VM spec (see faultMessage) and apply it again"
            )),
            AgentError::Firecracker { source: FcError::Timeout { .. }, .. } => Some(
                "the VMM is stopped (SIGSTOP) or stuck: a stop or a delete of the VM still ends it; check the \
                 host's load and the VMM's log"
                    .into(),
            ),
            AgentError::DiskFull { .. } => Some(
                "free space in the node's run directory (nexus-nodeagent --run-dir), or delete VMs or snapshots on \
                 the node; what failed is tried again by itself once there is room"
                    .into(),
            ),
            AgentError::Process(_) => {
                Some("check that the firecracker binary configured on the agent exists and is executable".into())
            }
            AgentError::NotFound(m) if m.starts_with("snapshot ") => Some(
                "take a new snapshot of a running VM and restore from that; a snapshot's files stay on the node that took it"
                    .into(),
            ),
            AgentError::NotFound(m) if m.contains("is not running on this node") => {
                Some("start the VM, wait until it is Running, then take the snapshot again".into())
            }
            _ => None,
        }
    }

    /// The full message with its causes, for logs and error bodies.
    pub fn chain(&self) -> String {
        let mut msg = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            msg.push_str(": ");
            msg.push_str(&c.to_string());
            cause = c.source();
        }
        msg
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::warn!(error = %self.chain(), "agent call failed");
        }
        let fault_message = match &self {
            AgentError::Firecracker { source, .. } => source.fault_message().map(str::to_string),
            _ => None,
        };
        let body = ErrorBody {
            error: self.reason().to_string(),
            message: self.chain(),
            status: status.as_u16(),
            fault_message,
            suggestion: self.suggestion(),
            request_id: String::new(),
        };
        (status, axum::Json(body)).into_response()
    }
}
