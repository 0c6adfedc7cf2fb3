//! REST handlers shared by every kind: create, get, list, replace,
//! replace status, delete, and watch (a list with `watch=true`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use nexus_api::validation::{FieldErrors, validate_envelope};
use nexus_api::{ListMeta, Object, ObjectList, ResourceSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::admission::{host_paths, quota};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::request_id::RequestIds;
use crate::selector::Selector;
use crate::state::{AppState, SharedState};
use crate::store::{AuditInfo, Mutation, Write};
use crate::watch;

/// Query parameters accepted on collection and object endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    pub watch: Option<bool>,
    pub resource_version: Option<String>,
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    /// `All` validates and answers without storing anything.
    pub dry_run: Option<String>,
    /// Most items in one list page.
    pub limit: Option<i64>,
    /// Token from the previous page's `metadata.continue`.
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
}

/// Encodes a (project, name) list position as an opaque token.
fn encode_continue(project: &str, name: &str) -> String {
    format!("{project}\u{0}{name}").bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<(String, String), ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "continue token {:?} is not valid; pass metadata.continue from the previous page unchanged",
            nexus_api::validation::truncate(token, 80)
        ))
    };
    // Bytes, not chars: the token may hold anything a client sends.
    let raw = token.as_bytes();
    if raw.len() % 2 != 0 || raw.len() > 512 || !raw.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    let hex = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    };
    let bytes: Vec<u8> = raw.chunks(2).map(|p| hex(p[0]) << 4 | hex(p[1])).collect();
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (project, name) = text.split_once('\u{0}').ok_or_else(bad)?;
    // Both halves are names: nothing else is a position in a list (and
    // PostgreSQL refuses NUL bytes in text).
    let is_name =
        |s: &str| s.len() <= 63 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !is_name(project) || !is_name(name) {
        return Err(bad());
    }
    Ok((project.to_string(), name.to_string()))
}

impl Params {
    fn dry_run(&self) -> Result<bool, ApiError> {
        match self.dry_run.as_deref() {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::BadRequest(format!("dryRun={other:?} is not supported; use dryRun=All"))),
        }
    }
}

/// The project and name a route names (cluster-scoped kinds have no project).
struct Target {
    project: String,
    name: Option<String>,
}

fn target<S: ResourceSpec>(path: &HashMap<String, String>) -> Result<Target, ApiError> {
    let project = if S::NAMESPACED { path.get("project").cloned().unwrap_or_default() } else { String::new() };
    let mut errors = FieldErrors::default();
    if S::NAMESPACED && !project.is_empty() {
        nexus_api::validation::validate_dns_label(&mut errors, "project", &project);
    }
    let name = path.get("name").cloned();
    if let Some(n) = &name {
        nexus_api::validation::validate_dns_label(&mut errors, "name", n);
    }
    if !errors.is_empty() {
        return Err(ApiError::BadRequest(format!("invalid path: {errors}")));
    }
    Ok(Target { project, name })
}

fn not_found<S: ResourceSpec>(t: &Target) -> ApiError {
    ApiError::NotFound {
        kind: S::KIND.to_string(),
        project: t.project.clone(),
        name: t.name.clone().unwrap_or_default(),
    }
}

/// The audit facts of a change made for `caller`.
pub(crate) fn audit(caller: &Caller, ids: &RequestIds, verb: &'static str, status_code: u16) -> AuditInfo {
    AuditInfo {
        request_id: ids.id.clone(),
        correlation_id: ids.correlation.clone(),
        actor: caller.subject.to_string(),
        token_id: caller.token_id.clone(),
        verb,
        status_code,
        fence: ids.fence.clone(),
    }
}

/// The answer to a mutation: its object, marked as audited when its change
/// committed (with its record), after the binding cache learned of it.
pub(crate) fn answer<S: ResourceSpec>(state: &AppState, status: StatusCode, m: Mutation) -> Response {
    if m.committed && crate::auth::bindings::is_binding(S::KIND) {
        state.bindings.invalidate();
    }
    let mut resp = (status, Json(m.object)).into_response();
    if m.committed {
        resp.extensions_mut().insert(crate::audit::Recorded);
    }
    resp
}

/// The JSON Schema of every kind, by kind.
static SCHEMAS: std::sync::LazyLock<HashMap<&'static str, Value>> = std::sync::LazyLock::new(|| {
    nexus_api::registry::kinds()
        .iter()
        .filter_map(|k| {
            nexus_api::schema::all()
                .into_iter()
                .find(|(stem, _)| *stem == k.kind.to_lowercase())
                .map(|(_, s)| (k.kind, s))
        })
        .collect()
});

/// A body sent as YAML (`Content-Type: application/yaml`, as the web
/// console's "create from YAML" sends it), as JSON; any other body as it is.
/// A YAML syntax error names its line and column.
fn yaml_to_json<S: ResourceSpec>(headers: &axum::http::HeaderMap, body: Bytes) -> Result<Bytes, ApiError> {
    let yaml = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        matches!(v.split(';').next().map(str::trim), Some("application/yaml" | "application/x-yaml" | "text/yaml"))
    });
    if !yaml {
        return Ok(body);
    }
    let value: Value = serde_saphyr::from_slice(&body)
        .map_err(|e| ApiError::Malformed { kind: S::KIND.to_string(), message: format!("YAML: {e}") })?;
    Ok(Bytes::from(serde_json::to_vec(&value)?))
}

/// Parses and validates a request body as an object of kind `S`.
fn parse_object<S: ResourceSpec>(body: &Bytes) -> Result<Object<S>, ApiError> {
    // Read once as JSON, then typed from that.
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed { kind: S::KIND.to_string(), message: e.to_string() })?;
    object_from_value(&value)
}

/// Checks `value`, sent as an object of kind `S`, against the kind's schema
/// and validation, and returns it typed.
pub(crate) fn object_from_value<S: ResourceSpec>(value: &Value) -> Result<Object<S>, ApiError> {
    let malformed = |message: String| ApiError::Malformed { kind: S::KIND.to_string(), message };
    // An array where the schema wants an object is refused before serde
    // (whose structs would take the fields in order).
    if let Some((path, want, got)) = SCHEMAS.get(S::KIND).and_then(|schema| nexus_api::shape::mismatch(value, schema)) {
        return Err(malformed(format!("{path}: expected {want}, got {got}")));
    }
    let obj: Object<S> = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        malformed(if path == "." { inner.to_string() } else { format!("{path}: {inner}") })
    })?;
    let mut errors = FieldErrors::default();
    validate_envelope(&obj, &mut errors);
    obj.spec.validate(&mut errors);
    if !errors.is_empty() {
        return Err(ApiError::Invalid { kind: S::KIND.to_string(), errors });
    }
    Ok(obj)
}

fn to_value<S: ResourceSpec>(obj: &Object<S>) -> Result<Value, ApiError> {
    Ok(serde_json::to_value(obj)?)
}

fn from_value<S: ResourceSpec>(v: Value) -> Result<Object<S>, ApiError> {
    Ok(serde_json::from_value(v)?)
}

fn check_version<S: ResourceSpec>(sent: &Object<S>, current: &Object<S>) -> Result<(), ApiError> {
    match &sent.metadata.resource_version {
        Some(rv) if Some(rv) != current.metadata.resource_version.as_ref() => Err(ApiError::Conflict {
            kind: S::KIND.to_string(),
            name: current.name().to_string(),
            sent: rv.clone(),
            current: current.metadata.resource_version.clone().unwrap_or_default(),
        }),
        _ => Ok(()),
    }
}

/// `POST` on a collection.
pub async fn create<S: ResourceSpec>(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Extension(ids): Extension<RequestIds>,
    Path(path): Path<HashMap<String, String>>,
    Query(params): Query<Params>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t = target::<S>(&path)?;
    let body = yaml_to_json::<S>(&headers, body)?;
    let mut obj = parse_object::<S>(&body)?;
    crate::admission::create(&state, &caller, &t.project, &obj).await?;
    if S::NAMESPACED {
        match &obj.metadata.project {
            Some(p) if *p != t.project => {
                let mut errors = FieldErrors::default();
                errors.add(
                    "metadata.project",
                    p,
                    &format!("must match the project in the URL ({:?}) or be omitted", t.project),
                );
                return Err(ApiError::Invalid { kind: S::KIND.to_string(), errors });
            }
            _ => obj.metadata.project = Some(t.project.clone()),
        }
    }
    stamp_new(&mut obj);
    let name = obj.name().to_string();
    if params.dry_run()? {
        if state.store.get(S::KIND, &t.project, &name).await?.is_some() {
            return Err(ApiError::AlreadyExists { kind: S::KIND.into(), project: t.project, name });
        }
        return Ok((StatusCode::CREATED, Json(obj)).into_response());
    }
    let stored = store_new(&state, &audit(&caller, &ids, "create", 201), &t.project, obj, Vec::new()).await?;
    Ok(answer::<S>(&state, StatusCode::CREATED, stored))
}

/// Gives `obj`, about to be created, what the server sets on a new object
/// (uid, generation 1, creation time; no status).
pub(crate) fn stamp_new<S: ResourceSpec>(obj: &mut Object<S>) {
    obj.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    obj.metadata.generation = Some(1);
    obj.metadata.creation_timestamp = Some(Utc::now());
    obj.metadata.deletion_timestamp = None;
    obj.status = None;
}

/// Stores the new object `obj` (stamped, admitted) in `project` unless one
/// of its name exists, within the project's quotas counted as if the
/// objects in `also` (kind, name, object) were stored with it: a request
/// that makes several objects is refused at its first write when they do
/// not all fit.
pub(crate) async fn store_new<S: ResourceSpec>(
    state: &AppState,
    audit: &AuditInfo,
    project: &str,
    mut obj: Object<S>,
    also: Vec<(&'static str, String, Value)>,
) -> Result<Mutation, ApiError> {
    let (owned_project, name) = (project.to_string(), obj.name().to_string());
    let key = name.clone();
    // Quotas read every kind they count when any of the objects is counted.
    let reads = std::iter::once(S::KIND)
        .chain(also.iter().map(|(k, _, _)| *k))
        .map(|k| quota::reads(k, project))
        .find(|r| !matches!(r, crate::store::Reads::Nothing))
        .unwrap_or(crate::store::Reads::Nothing);
    state
        .store
        .mutate_seeing(S::KIND, project, &name, audit, reads, move |current, seen, rv| {
            if current.is_some() {
                return Err(ApiError::AlreadyExists { kind: S::KIND.into(), project: owned_project, name: key });
            }
            obj.metadata.resource_version = Some(rv.to_string());
            let value = to_value(&obj)?;
            let mut all = vec![(S::KIND, obj.name().to_string(), value.clone())];
            all.extend(also);
            quota::admit_all(&all, seen)?;
            Ok(Write::Put(value))
        })
        .await
}

/// `GET` on an object.
pub async fn get<S: ResourceSpec>(
    State(state): State<SharedState>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let t = target::<S>(&path)?;
    let name = t.name.clone().unwrap_or_default();
    match state.store.get(S::KIND, &t.project, &name).await? {
        Some(v) => Ok(Json(v)),
        None => Err(not_found::<S>(&t)),
    }
}

/// `GET` on a collection: a list, or a watch stream with `watch=true`.
pub async fn list<S: ResourceSpec>(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Path(path): Path<HashMap<String, String>>,
    Query(params): Query<Params>,
) -> Result<Response, ApiError> {
    let t = target::<S>(&path)?;
    let project = (S::NAMESPACED && !t.project.is_empty()).then_some(t.project.clone());
    // Across projects (and for kinds whose objects are about objects in
    // projects, such as Events), a caller sees the projects it may read.
    let by_project = S::POLICY.read == nexus_api::policy::Readers::EveryoneInTheirProjects;
    let visible = if (S::NAMESPACED && project.is_none()) || by_project { caller.readable_projects() } else { None };
    let labels = Selector::labels(params.label_selector.as_deref().unwrap_or(""))?;
    let fields = Selector::fields(
        params.field_selector.as_deref().unwrap_or(""),
        &nexus_api::registry::KindInfo::of::<S>().field_selectors,
    )?;
    let filter = watch::Filter { kind: S::KIND.to_string(), project, labels, fields, visible };
    if params.watch.unwrap_or(false) {
        if params.continue_token.is_some() || params.limit.is_some() {
            return Err(ApiError::BadRequest(
                "limit and continue do not apply to a watch; list first, then watch from the list's resourceVersion"
                    .into(),
            ));
        }
        let since = match params.resource_version.as_deref() {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(rv.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "resourceVersion {rv:?} is not a number; pass the resourceVersion of a list or event"
                ))
            })?),
        };
        let slot = state.limits.open_watch(&caller.subject)?;
        metrics::counter!("nexus_apiserver_watches_total", "kind" => S::KIND).increment(1);
        return watch::stream(state, filter, since, slot).await;
    }
    let limit = match params.limit {
        None | Some(0) => None,
        Some(n) if n > 0 => Some(n),
        Some(n) => return Err(ApiError::BadRequest(format!("limit={n} must be a positive number of items"))),
    };
    metrics::counter!("nexus_apiserver_lists_total", "kind" => S::KIND).increment(1);
    let mut after = params.continue_token.as_deref().map(decode_continue).transpose()?;
    let batch = limit.unwrap_or(500).clamp(1, 500);
    let mut items: Vec<Value> = Vec::new();
    let mut list_rv = None;
    let mut more = false;
    'pages: loop {
        let (page, rv) = state.store.list_page(S::KIND, filter.project.as_deref(), after.clone(), batch).await?;
        list_rv.get_or_insert(rv);
        let count = page.items.len();
        for (i, (project, name, obj)) in page.items.into_iter().enumerate() {
            after = Some((project, name));
            if filter.matches(&obj) {
                items.push(obj);
                if limit.is_some_and(|l| items.len() as i64 >= l) {
                    more = page.more || i + 1 < count;
                    break 'pages;
                }
            }
        }
        if !page.more {
            break;
        }
    }
    let continue_token = if more { after.map(|(p, n)| encode_continue(&p, &n)) } else { None };
    Ok(Json(ObjectList {
        api_version: nexus_api::API_VERSION.to_string(),
        kind: format!("{}List", S::KIND),
        metadata: ListMeta { resource_version: list_rv.map(|rv| rv.to_string()), continue_token },
        items,
    })
    .into_response())
}

/// Parses a sent object and applies `merge(current, sent)` to the stored
/// one under optimistic concurrency: the shared body of both `PUT`s.
#[allow(clippy::too_many_arguments)]
async fn update<S: ResourceSpec>(
    state: &AppState,
    caller: &Caller,
    ids: &RequestIds,
    path: &HashMap<String, String>,
    params: &Params,
    body: &Bytes,
    verb: &'static str,
    merge: impl FnOnce(&mut Object<S>, &Object<S>) + Send + 'static,
) -> Result<Response, ApiError> {
    let t = target::<S>(path)?;
    let sent = parse_object::<S>(body)?;
    let name = t.name.clone().unwrap_or_default();
    check_url_name::<S>(&sent, &name)?;
    if verb == "update" {
        crate::admission::update(state, &t.project, &sent).await?;
    }
    // Host paths are checked against the stored object in the write's own
    // transaction; the refusal, which names the nodes' image roots, is
    // worded after it.
    let raw_paths_ok = verb != "update" || host_paths::may_name_raw_paths(state, caller, &t.project);
    let refused_path: Arc<Mutex<Option<(&'static str, String)>>> = Arc::default();
    let refused = refused_path.clone();
    let dry_run = params.dry_run()?;
    let (project, missing) = (t.project.clone(), not_found::<S>(&t));
    // Spec updates count against quotas (a VM grown past its project's).
    let reads = if verb == "update" { quota::reads(S::KIND, &project) } else { Default::default() };
    let result = state
        .store
        .mutate_seeing(S::KIND, &project, &name, &audit(caller, ids, verb, 200), reads, move |current, seen, rv| {
            let current = from_value::<S>(current.ok_or(missing)?)?;
            check_version(&sent, &current)?;
            if let Some(found) = host_paths::unpermitted(raw_paths_ok, &sent, Some(&current)) {
                *refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(found);
                return Err(ApiError::Refused { message: String::new(), suggestion: String::new() });
            }
            if verb == "update" {
                let mut errors = FieldErrors::default();
                sent.spec.validate_update(&current.spec, &mut errors);
                if !errors.is_empty() {
                    return Err(ApiError::Invalid { kind: S::KIND.to_string(), errors });
                }
            }
            let mut next = current.clone();
            merge(&mut next, &sent);
            let write = finish_write(current, next, rv, dry_run)?;
            if let Write::Put(v) = &write {
                quota::admit(S::KIND, v["metadata"]["name"].as_str().unwrap_or_default(), v, seen)?;
            }
            Ok(write)
        })
        .await;
    let refused = refused_path.lock().unwrap_or_else(PoisonError::into_inner).take();
    match (result, refused) {
        (Err(_), Some((field, path))) => Err(host_paths::refused(state, field, &path).await),
        (result, _) => Ok(answer::<S>(state, StatusCode::OK, result?)),
    }
}

/// `PUT` on an object: replaces metadata and spec; status is kept as stored.
pub async fn replace<S: ResourceSpec>(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Extension(ids): Extension<RequestIds>,
    Path(path): Path<HashMap<String, String>>,
    Query(params): Query<Params>,
    body: Bytes,
) -> Result<Response, ApiError> {
    update::<S>(&state, &caller, &ids, &path, &params, &body, "update", |next, sent| {
        if next.spec != sent.spec {
            next.spec = sent.spec.clone();
            next.metadata.generation = Some(next.metadata.generation.unwrap_or(0) + 1);
        }
        next.metadata.labels = sent.metadata.labels.clone();
        next.metadata.annotations = sent.metadata.annotations.clone();
        next.metadata.owner_references = sent.metadata.owner_references.clone();
        next.metadata.finalizers = sent.metadata.finalizers.clone();
    })
    .await
}

/// `PUT` on `.../status`: replaces status only.
pub async fn replace_status<S: ResourceSpec>(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Extension(ids): Extension<RequestIds>,
    Path(path): Path<HashMap<String, String>>,
    Query(params): Query<Params>,
    body: Bytes,
) -> Result<Response, ApiError> {
    update::<S>(&state, &caller, &ids, &path, &params, &body, "update-status", |next, sent| {
        next.status = sent.status.clone()
    })
    .await
}

/// `DELETE` on an object: removes it at once when it has no finalizers,
/// otherwise sets `deletionTimestamp` and leaves removal to whoever owns
/// the finalizers.
pub async fn delete<S: ResourceSpec>(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Extension(ids): Extension<RequestIds>,
    Path(path): Path<HashMap<String, String>>,
    Query(params): Query<Params>,
) -> Result<Response, ApiError> {
    let t = target::<S>(&path)?;
    let name = t.name.clone().unwrap_or_default();
    let dry_run = params.dry_run()?;
    crate::admission::in_use::<S>(&state, &t.project, &name).await?;
    let missing = not_found::<S>(&t);
    let result = state
        .store
        .mutate(S::KIND, &t.project, &name, &audit(&caller, &ids, "delete", 200), move |current, rv| {
            let current = from_value::<S>(current.ok_or(missing)?)?;
            let mut next = current.clone();
            if next.metadata.deletion_timestamp.is_none() {
                next.metadata.deletion_timestamp = Some(Utc::now());
            }
            if next.metadata.finalizers.is_empty() {
                next.metadata.resource_version = Some(rv.to_string());
                let v = to_value(&next)?;
                return Ok(if dry_run { Write::Unchanged(v) } else { Write::Delete(v) });
            }
            finish_write(current, next, rv, dry_run)
        })
        .await?;
    Ok(answer::<S>(&state, StatusCode::OK, result))
}

fn check_url_name<S: ResourceSpec>(sent: &Object<S>, name: &str) -> Result<(), ApiError> {
    if sent.name() != name {
        let mut errors = FieldErrors::default();
        errors.add("metadata.name", sent.name(), &format!("must match the name in the URL ({name:?})"));
        return Err(ApiError::Invalid { kind: S::KIND.to_string(), errors });
    }
    Ok(())
}

/// Decides the write for an update: nothing when nothing changed, removal
/// when a deleting object lost its last finalizer, the new object otherwise.
fn finish_write<S: ResourceSpec>(
    current: Object<S>,
    mut next: Object<S>,
    rv: i64,
    dry_run: bool,
) -> Result<Write, ApiError> {
    if next == current {
        return Ok(Write::Unchanged(to_value(&current)?));
    }
    if next.metadata.deletion_timestamp.is_some() && next.metadata.finalizers.is_empty() {
        next.metadata.resource_version = Some(rv.to_string());
        let v = to_value(&next)?;
        return Ok(if dry_run { Write::Unchanged(v) } else { Write::Delete(v) });
    }
    next.metadata.resource_version = Some(rv.to_string());
    let v = to_value(&next)?;
    Ok(if dry_run { Write::Unchanged(v) } else { Write::Put(v) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_garbage_is_refused() {
        let token = encode_continue("default", "vm-7");
        assert_eq!(decode_continue(&token).unwrap(), ("default".to_string(), "vm-7".to_string()));
        for bad in ["zz", "abc", "6465", &"00".repeat(300), "a\u{e9}b", "0000", "00ff00", "\u{e9}\u{e9}"] {
            assert!(decode_continue(bad).is_err(), "{bad}");
        }
    }
}
