//! Endpoints about access rather than objects: tokens (create, list,
//! revoke, rotate), node joins and node agent credentials, `whoami`, and the
//! audit log. The auth layer has decided who may call each; the token
//! endpoints then show and change only the tokens their caller manages
//! ([`Caller::manages_tokens_of`]).

use std::path::Path;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use nexus_api::ClusterRoleBindingSpec;
use nexus_api::auth::{AuditList, IssuedToken, NodeCredential, RotateRequest, TokenList, TokenRequest, WhoAmI};
use nexus_api::rbac::{Role, Subject};
use nexus_api::{ClusterRoleBinding, Object, ResourceSpec};
use serde::Deserialize;

use crate::auth::Caller;
use crate::auth::tokens::{DEFAULT_GRACE, JOIN_TTL};
use crate::error::{ApiError, AuditMessage};
use crate::state::{AppState, SharedState};
use crate::store::access::{AuditQuery, TokenRow};
use crate::store::{AuditInfo, Write};

/// Lifetime of the tokens nodes get when they join; agents rotate them at
/// half of it.
pub const NODE_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The routes of this module.
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", get(get_token).delete(revoke_token))
        .route("/v1/tokens/{id}/rotate", post(rotate_token))
        .route("/v1/nodes/{name}/join", post(join))
        .route("/v1/nodes/{name}/credential", get(get_credential).put(put_credential))
        .route("/v1/audit", get(audit))
}

fn forbidden(message: String, suggestion: &str) -> ApiError {
    ApiError::Refused { message, suggestion: suggestion.to_string() }
}

/// A response carrying a line for its audit record.
fn with_note(resp: impl IntoResponse, note: String) -> Response {
    let mut resp = resp.into_response();
    resp.extensions_mut().insert(AuditMessage(note));
    resp
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|e| ApiError::Malformed { kind: what.into(), message: e.to_string() });
    }
    serde_json::from_slice(body).map_err(|e| ApiError::Malformed { kind: what.into(), message: e.to_string() })
}

async fn whoami(Extension(caller): Extension<Caller>) -> Json<WhoAmI> {
    Json(WhoAmI {
        subject: caller.subject.to_string(),
        projects: caller.grants.projects.iter().map(|(p, r)| (p.clone(), r.iter().copied().collect())).collect(),
        cluster: caller.grants.cluster.iter().copied().collect(),
    })
}

async fn create_token(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: TokenRequest = parse_json(&body, "TokenRequest")?;
    let subject = match &req.subject {
        Some(s) => Subject::parse(s).map_err(ApiError::BadRequest)?,
        None => caller.subject.clone(),
    };
    if !caller.manages_tokens_of(&subject) {
        return Err(forbidden(
            format!("{} may not issue tokens for {subject}", caller.subject),
            "project admins issue tokens for their project's service accounts (sa:PROJECT:NAME); cluster admins for anyone",
        ));
    }
    let ttl = match (req.ttl_seconds, &subject) {
        (Some(0), _) => return Err(ApiError::BadRequest("ttlSeconds must be positive".into())),
        (Some(s), _) => Some(Duration::from_secs(s)),
        (None, Subject::Join) => Some(JOIN_TTL),
        (None, _) => None,
    };
    let issued = state.tokens.issue(&state.store, &subject, &req.description, ttl, &caller.subject.to_string()).await?;
    let note = format!("issued token {} for {subject}", issued.info.id);
    Ok(with_note((StatusCode::CREATED, Json(issued)), note))
}

/// Query of the token list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenQuery {
    subject: Option<String>,
}

async fn list_tokens(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<TokenQuery>,
) -> Result<Json<TokenList>, ApiError> {
    let rows = state.store.tokens(None).await?;
    let items = rows
        .into_iter()
        .filter(|r| Subject::parse(&r.info.subject).is_ok_and(|s| caller.manages_tokens_of(&s) || s == caller.subject))
        .filter(|r| q.subject.as_ref().is_none_or(|s| *s == r.info.subject))
        .map(|r| r.info)
        .collect();
    Ok(Json(TokenList { items }))
}

/// The token `id`, if the caller may act on it.
async fn token_for(state: &AppState, caller: &Caller, id: &str) -> Result<TokenRow, ApiError> {
    let not_found = || ApiError::NotFound { kind: "Token".into(), project: String::new(), name: id.to_string() };
    let row = state.store.token(id).await?.ok_or_else(not_found)?;
    let subject = Subject::parse(&row.info.subject).map_err(ApiError::Internal)?;
    // Tokens the caller may not manage do not exist for it (nor its own
    // node or controller token, which rotate only through their owner).
    if caller.manages_tokens_of(&subject) || subject == caller.subject { Ok(row) } else { Err(not_found()) }
}

async fn get_token(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<nexus_api::auth::TokenInfo>, ApiError> {
    Ok(Json(token_for(&state, &caller, &id).await?.info))
}

async fn revoke_token(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let row = token_for(&state, &caller, &id).await?;
    state.tokens.revoke(&state.store, &id).await?;
    let mut info = row.info;
    info.revoked_at = Some(Utc::now());
    let note = format!("revoked token {id} of {}", info.subject);
    Ok(with_note(Json(info), note))
}

async fn rotate_token(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: RotateRequest = parse_json(&body, "RotateRequest")?;
    let row = token_for(&state, &caller, &id).await?;
    if row.info.revoked_at.is_some() || row.info.replaced_by.is_some() {
        return Err(ApiError::Conflict {
            kind: "Token".into(),
            name: id,
            sent: "active".into(),
            current: if row.info.revoked_at.is_some() { "revoked".into() } else { "already rotated".into() },
        });
    }
    let grace = req.grace_seconds.map(Duration::from_secs).unwrap_or(DEFAULT_GRACE);
    let issued = state.tokens.rotate(&state.store, &row, grace, &caller.subject.to_string()).await?;
    let note =
        format!("rotated token {id} of {} into {} ({} s grace)", row.info.subject, issued.info.id, grace.as_secs());
    Ok(with_note((StatusCode::CREATED, Json(issued)), note))
}

fn check_node_name(name: &str) -> Result<(), ApiError> {
    let mut errors = nexus_api::validation::FieldErrors::default();
    nexus_api::validation::validate_dns_label(&mut errors, "name", name);
    if errors.is_empty() { Ok(()) } else { Err(ApiError::BadRequest(format!("invalid path: {errors}"))) }
}

async fn join(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, ApiError> {
    check_node_name(&name)?;
    let subject = Subject::Node(name.clone());
    let issued: IssuedToken = state
        .tokens
        .issue(&state.store, &subject, &format!("node {name}"), Some(NODE_TOKEN_TTL), &caller.subject.to_string())
        .await?;
    let note = format!("node {name} joined; issued token {}", issued.info.id);
    Ok(with_note((StatusCode::CREATED, Json(issued)), note))
}

async fn get_credential(
    State(state): State<SharedState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<NodeCredential>, ApiError> {
    check_node_name(&name)?;
    state.store.node_credential(&name).await?.map(Json).ok_or(ApiError::NotFound {
        kind: "NodeCredential".into(),
        project: String::new(),
        name,
    })
}

async fn put_credential(
    State(state): State<SharedState>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_node_name(&name)?;
    let cred: NodeCredential = parse_json(&body, "NodeCredential")?;
    if cred.secret.len() < 32 {
        return Err(ApiError::BadRequest("the credential must be at least 32 characters".into()));
    }
    state.store.put_node_credential(&name, &cred).await?;
    Ok(with_note(StatusCode::NO_CONTENT, format!("node {name} set its agent credential")))
}

/// Query of the audit log.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    project: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    actor: Option<String>,
    result: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    limit: Option<i64>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

async fn audit(
    State(state): State<SharedState>,
    query: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditList>, ApiError> {
    let Query(p) = query.map_err(|e| {
        ApiError::BadRequest(format!(
            "{e}; parameters: project, kind, name, actor, result (allowed|denied|failed), since, until (RFC 3339), limit, continue"
        ))
    })?;
    // Filters are compared with what is stored: names, kinds and subjects.
    for (param, value) in [("project", &p.project), ("kind", &p.kind), ("name", &p.name), ("actor", &p.actor)] {
        if let Some(v) = value
            && (v.len() > 253 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
        {
            return Err(ApiError::BadRequest(format!(
                "{param}={:?} is not a name: letters, digits, '-', '_', '.' and ':' only",
                nexus_api::validation::truncate(v, 80)
            )));
        }
    }
    if let Some(r) = &p.result
        && !["allowed", "denied", "failed"].contains(&r.as_str())
    {
        return Err(ApiError::BadRequest("result must be allowed, denied or failed".into()));
    }
    let after_id = match &p.continue_token {
        Some(c) => {
            c.parse::<i64>().map_err(|_| ApiError::BadRequest("continue must be the previous page's token".into()))?
        }
        None => 0,
    };
    let limit = p.limit.unwrap_or(500).clamp(1, 5000);
    let q = AuditQuery {
        project: p.project,
        kind: p.kind,
        name: p.name,
        actor: p.actor,
        result: p.result,
        since: p.since,
        until: p.until,
        after_id,
        limit: limit + 1,
    };
    let mut items = state.store.audit(&q).await?;
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let continue_token = if more { items.last().map(|r| r.id.to_string()) } else { None };
    Ok(Json(AuditList { items, continue_token }))
}

/// On an empty store, makes the first admin: a ClusterRoleBinding
/// `bootstrap-cluster-admin` for `user:admin`, and a token for it written
/// to `token_file` (mode 0600). Of several apiservers starting at once on
/// one PostgreSQL, the one whose binding is created writes the token.
/// Returns the file written, if any.
pub async fn bootstrap(state: &AppState, token_file: &Path) -> Result<Option<std::path::PathBuf>, ApiError> {
    if state.store.token_count().await? > 0 {
        return Ok(None);
    }
    let spec = ClusterRoleBindingSpec { role: Role::ClusterAdmin, subjects: vec!["user:admin".into()] };
    let mut binding: ClusterRoleBinding = Object::new("bootstrap-cluster-admin", None, spec);
    binding.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    binding.metadata.generation = Some(1);
    binding.metadata.creation_timestamp = Some(Utc::now());
    let audit = AuditInfo {
        request_id: "bootstrap".into(),
        actor: "system:apiserver".into(),
        verb: "create",
        status_code: 201,
        ..Default::default()
    };
    let created = state
        .store
        .mutate(ClusterRoleBindingSpec::KIND, "", "bootstrap-cluster-admin", &audit, move |current, rv| {
            if current.is_some() {
                return Ok(Write::Unchanged(serde_json::Value::Null));
            }
            binding.metadata.resource_version = Some(rv.to_string());
            Ok(Write::Put(serde_json::to_value(&binding)?))
        })
        .await?;
    if !created.committed {
        return Ok(None);
    }
    state.bindings.invalidate();
    let admin = Subject::User("admin".into());
    let issued = state.tokens.issue(&state.store, &admin, "bootstrap admin", None, "system:apiserver").await?;
    write_secret(token_file, &issued.token)
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", token_file.display())))?;
    Ok(Some(token_file.to_path_buf()))
}

/// Writes `secret` to `path`, readable by its owner only.
pub fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("partial");
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
