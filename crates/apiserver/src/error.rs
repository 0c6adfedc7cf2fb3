//! The apiserver's error type and the one place it becomes an HTTP response.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nexus_api::ErrorBody;
use nexus_api::validation::FieldErrors;

use crate::request_id;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{kind} {name:?} not found{}", in_project(.project))]
    NotFound { kind: String, project: String, name: String },
    #[error("{kind} {name:?} already exists{}", in_project(.project))]
    AlreadyExists { kind: String, project: String, name: String },
    #[error("{kind} {name:?} was modified: resourceVersion {sent} is stale (now {current})")]
    Conflict { kind: String, name: String, sent: String, current: String },
    #[error("{kind} is invalid: {errors}")]
    Invalid { kind: String, errors: FieldErrors },
    #[error("the request body is not a valid {kind}: {message}")]
    Malformed { kind: String, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("resourceVersion {requested} is too old: changes up to {oldest} were compacted away")]
    Gone { requested: i64, oldest: i64 },
    #[error("resourceVersion {requested} is newer than the newest change ({newest})")]
    TooNew { requested: i64, newest: i64 },
    #[error("storage failed")]
    Storage(sqlx::Error),
    /// The store's disk is full: reads work, writes wait for room.
    #[error("the apiserver's storage is full ({0}); this change was not made")]
    StorageFull(String),
    #[error("storage returned a corrupt object")]
    Corrupt(#[from] serde_json::Error),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("not authenticated: {0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(#[from] nexus_api::rbac::Denied),
    #[error("{message}")]
    Refused { message: String, suggestion: String },
    #[error("request bodies must be JSON")]
    UnsupportedMediaType,
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_secs: u64 },
    #[error("{message}")]
    QuotaExceeded { message: String },
    /// Something the request needs (a node agent) cannot be reached or
    /// is not there yet.
    #[error("{message}")]
    Unavailable { message: String, suggestion: String },
    /// The object is used by another and cannot go until it is not.
    #[error("{message}")]
    InUse { message: String, suggestion: String },
    /// The request needs its object in another state (a fork, a Running VM).
    #[error("{message}")]
    NotRunning { message: String, suggestion: String },
    /// The writer's lease term has ended (see `nexus_api::lease::Fence`).
    #[error("{message}")]
    Fenced { message: String },
    /// A node agent refused the onward call; its status is passed on.
    #[error("{message}")]
    Upstream { status: u16, message: String, suggestion: Option<String> },
}

impl From<sqlx::Error> for ApiError {
    /// A full disk (SQLite's SQLITE_FULL, PostgreSQL's 53100 disk_full, or
    /// ENOSPC) is told apart from other storage failures.
    fn from(e: sqlx::Error) -> Self {
        let full = match &e {
            sqlx::Error::Database(db) => {
                matches!(db.code().as_deref(), Some("13" | "53100")) || db.message().contains("disk is full")
            }
            sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28),
            _ => false,
        };
        if full { ApiError::StorageFull(e.to_string()) } else { ApiError::Storage(e) }
    }
}

fn in_project(project: &str) -> String {
    if project.is_empty() { String::new() } else { format!(" in project {project:?}") }
}

impl ApiError {
    /// The HTTP status of this error; the only place statuses are chosen.
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists { .. }
            | ApiError::Conflict { .. }
            | ApiError::InUse { .. }
            | ApiError::NotRunning { .. }
            | ApiError::Fenced { .. } => StatusCode::CONFLICT,
            ApiError::Invalid { .. } | ApiError::Malformed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::Refused { .. } | ApiError::QuotaExceeded { .. } => StatusCode::FORBIDDEN,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            // Only client errors are passed on: the agent's own failures are Unavailable.
            ApiError::Upstream { status, .. } => {
                StatusCode::from_u16(*status).ok().filter(|s| s.is_client_error()).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            ApiError::Gone { .. } | ApiError::TooNew { .. } => StatusCode::GONE,
            ApiError::Storage(_) | ApiError::Corrupt(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::InUse { .. } => "InUse",
            ApiError::NotRunning { .. } => "NotRunning",
            ApiError::Fenced { .. } => "Fenced",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::Malformed { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Unauthorized(_) => "Unauthorized",
            ApiError::Forbidden(_) | ApiError::Refused { .. } => "Forbidden",
            ApiError::QuotaExceeded { .. } => "QuotaExceeded",
            ApiError::UnsupportedMediaType => "UnsupportedMediaType",
            ApiError::TooManyRequests { .. } => "TooManyRequests",
            ApiError::Unavailable { .. } => "ServiceUnavailable",
            ApiError::Upstream { status: 404, .. } => "NotFound",
            ApiError::Upstream { .. } => "BadRequest",
            ApiError::Gone { .. } | ApiError::TooNew { .. } => "Expired",
            ApiError::Storage(_) | ApiError::Corrupt(_) | ApiError::Internal(_) => "InternalError",
            ApiError::StorageFull(_) => "StorageFull",
        }
    }

    fn suggestion(&self) -> Option<String> {
        match self {
            ApiError::NotFound { kind, .. } => {
                Some(format!("list what exists with `nexusctl get {}`", kind.to_lowercase()))
            }
            ApiError::AlreadyExists { .. } => {
                Some("choose another name, or use `nexusctl apply` to update the existing object".into())
            }
            ApiError::Conflict { .. } => {
                Some("read the object again and retry your change on the latest version".into())
            }
            ApiError::Gone { .. } | ApiError::TooNew { .. } => {
                Some("list again and watch from the list's resourceVersion".into())
            }
            ApiError::Invalid { errors, .. } => errors.0.first().map(|e| format!("{}: {}", e.field, e.expected)),
            ApiError::Unauthorized(_) => Some(
                "create a token with `nexusctl token create` (an admin's token is written to the apiserver's data \
                 directory on first start) and pass it with --token or a context"
                    .into(),
            ),
            ApiError::Forbidden(d) => Some(d.suggestion.map(str::to_string).unwrap_or_else(|| {
                format!("ask an admin of the project for a RoleBinding that allows {} on {}", d.verb.as_str(), d.what)
            })),
            ApiError::Refused { suggestion, .. }
            | ApiError::Unavailable { suggestion, .. }
            | ApiError::InUse { suggestion, .. }
            | ApiError::NotRunning { suggestion, .. } => Some(suggestion.clone()),
            ApiError::Upstream { suggestion, .. } => suggestion.clone(),
            ApiError::UnsupportedMediaType => {
                Some("send the body with Content-Type: application/json (a create may also be application/yaml)".into())
            }
            ApiError::TooManyRequests { retry_after_secs, .. } => {
                Some(format!("slow down: retry after {retry_after_secs} s (Retry-After)"))
            }
            ApiError::QuotaExceeded { .. } => Some(
                "delete something in the project, or ask its admin to raise the quota (nexusctl describe quota)".into(),
            ),
            ApiError::Storage(_) | ApiError::Corrupt(_) | ApiError::Internal(_) => {
                Some("retry; if it persists, check the apiserver's log for this requestId".into())
            }
            ApiError::Fenced { .. } => Some(
                "this process no longer leads: it stops acting and campaigns for the lease again; nothing to do by \
                 hand"
                    .into(),
            ),
            ApiError::StorageFull(_) => Some(
                "free space where the apiserver keeps its store (its --data-dir, or the PostgreSQL server's disk); \
                 reads keep working, and writes work again by themselves once there is room"
                    .into(),
            ),
            _ => None,
        }
    }

    /// The response body for this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.reason().to_string(),
            // Messages may quote what was sent: never a megabyte of it.
            message: nexus_api::validation::truncate(&self.to_string(), 1000),
            status: self.status_code().as_u16(),
            fault_message: None,
            suggestion: self.suggestion().map(|s| nexus_api::validation::truncate(&s, 1000)),
            request_id: request_id::current(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status_code().is_server_error() {
            tracing::error!(error = ?self, "request failed");
        }
        let mut resp = (self.status_code(), axum::Json(self.body())).into_response();
        if let ApiError::TooManyRequests { retry_after_secs, .. } = &self
            && let Ok(v) = axum::http::HeaderValue::from_str(&retry_after_secs.to_string())
        {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        resp.extensions_mut().insert(AuditMessage(self.to_string()));
        resp
    }
}

/// The reason a request was refused or failed (or a note on what it did),
/// carried by its response for its audit record.
#[derive(Debug, Clone)]
pub struct AuditMessage(pub String);
