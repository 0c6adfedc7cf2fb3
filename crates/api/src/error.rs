//! The error body every non-2xx response carries.

use serde::{Deserialize, Serialize};

/// Body of every non-2xx response from the apiserver and the node agent.
///
/// `error` is a stable machine-readable reason (`NotFound`, `Conflict`,
/// `Invalid`, ...); `message` is for people; `suggestion` says what to do
/// about it; `faultMessage` carries Firecracker's own words when the failure
/// came from a VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<String>,
    #[serde(default)]
    pub request_id: String,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.error, self.status, self.message)?;
        if let Some(fault) = &self.fault_message {
            write!(f, "; firecracker said: {fault}")?;
        }
        if let Some(suggestion) = &self.suggestion {
            write!(f, "; {suggestion}")?;
        }
        Ok(())
    }
}
