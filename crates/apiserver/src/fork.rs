//! `POST /v1/projects/{project}/vms/{name}/fork`: N running copies of a
//! running VM in one request. It stores one Snapshot of the source and N
//! VMs restored from it (the controllers do the rest: the snapshot pauses
//! the source only while Firecracker writes it, and each copy starts once
//! the snapshot is Ready). Every refusal (the source not Running, a bad
//! count, quota, rights) comes before anything is stored.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use nexus_api::fork::{FORK_LABEL, ForkRequest, ForkResult};
use nexus_api::rbac::{Request, Verb, decide};
use nexus_api::vm::RestoreSource;
use nexus_api::{Object, PowerState, ResourceSpec, Snapshot, SnapshotSpec, Vm, VmPhase, VmSpec};
use serde_json::Value;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::request_id::RequestIds;
use crate::resources::{audit, stamp_new, store_new};
use crate::state::SharedState;

/// The fork route.
pub fn routes() -> Router<SharedState> {
    Router::new().route("/v1/projects/{project}/vms/{name}/fork", post(fork))
}

/// A fork's id: five lowercase letters and digits (as Kubernetes'
/// generateName suffixes).
fn fork_id() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4().as_bytes()[..5].iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

/// Why `vm` cannot be forked now, if it cannot.
fn not_forkable(vm: &Vm) -> Option<ApiError> {
    let name = vm.name();
    let status = vm.status_or_default();
    if vm.metadata.deletion_timestamp.is_some() {
        return Some(ApiError::NotRunning {
            message: format!("VM {name} is being deleted"),
            suggestion: "fork a VM that is Running".into(),
        });
    }
    if status.phase != VmPhase::Running {
        return Some(ApiError::NotRunning {
            message: format!("VM {name} is {:?}; a fork copies a Running VM", status.phase),
            suggestion: format!("start it (nexusctl start vm {name}), wait for Running, and fork again"),
        });
    }
    if status.config.as_ref().is_some_and(|c| !c.drives.is_empty()) {
        return Some(ApiError::NotRunning {
            message: format!(
                "VM {name} has extra drives or volumes; snapshots, and so forks, of such VMs are not supported yet"
            ),
            suggestion: "fork a VM with its root drive only (see docs/storage.md)".into(),
        });
    }
    None
}

async fn fork(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Extension(ids): Extension<RequestIds>,
    Path(path): Path<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (project, name) =
        (path.get("project").cloned().unwrap_or_default(), path.get("name").cloned().unwrap_or_default());
    let req: ForkRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Malformed { kind: "ForkRequest".into(), message: e.to_string() })?;
    let errors = req.validate();
    if !errors.is_empty() {
        return Err(ApiError::Invalid { kind: "ForkRequest".into(), errors });
    }
    // Creating VMs here was allowed at the door; a fork makes a Snapshot too.
    let snapshot_rights = Request { verb: Verb::Create, kind: SnapshotSpec::KIND, project: &project, name: "" };
    decide(&caller.subject, &caller.grants, &snapshot_rights)?;
    let source: Vm = match state.store.get(VmSpec::KIND, &project, &name).await? {
        Some(v) => serde_json::from_value(v)?,
        None => return Err(ApiError::NotFound { kind: VmSpec::KIND.into(), project, name }),
    };
    if let Some(refusal) = not_forkable(&source) {
        return Err(refusal);
    }

    let id = fork_id();
    let (snapshot_name, vm_names) = nexus_api::fork::names(&name, &id, req.copies);
    let labels = nexus_api::fork::labels(&source.metadata.labels, &name, &id);
    let mut snapshot =
        Snapshot::new(&snapshot_name, Some(&project), SnapshotSpec { vm_name: name.clone(), resume_after: true });
    snapshot.metadata.labels = labels.clone();
    stamp_new(&mut snapshot);
    let mut copies = Vec::new();
    for vm_name in &vm_names {
        let spec = VmSpec {
            restore_from: Some(RestoreSource { snapshot: snapshot_name.clone() }),
            state: PowerState::Running,
            restart_policy: source.spec.restart_policy,
            ..Default::default()
        };
        let mut vm = Object::new(vm_name, Some(&project), spec);
        vm.metadata.labels = labels.clone();
        crate::admission::create(&state, &caller, &project, &vm).await?;
        stamp_new(&mut vm);
        copies.push(vm);
    }

    // The snapshot first, admitted with every copy counted: a quota the
    // copies would exceed refuses it, and nothing is stored.
    let counted: Vec<(&'static str, String, Value)> = copies
        .iter()
        .map(|vm| Ok((VmSpec::KIND, vm.name().to_string(), serde_json::to_value(vm)?)))
        .collect::<Result<_, ApiError>>()?;
    let record = audit(&caller, &ids, "create", 201);
    store_new(&state, &record, &project, snapshot, counted).await?;
    // The copies together (their writes share commits).
    let writes = copies.into_iter().map(|vm| store_new(&state, &record, &project, vm, Vec::new()));
    for written in futures::future::join_all(writes).await {
        written?;
    }
    tracing::info!(vm = %name, %project, fork = %id, copies = req.copies, "forked");
    let result = ForkResult { selector: format!("{FORK_LABEL}={id}"), id, snapshot: snapshot_name, vms: vm_names };
    let mut resp = (StatusCode::CREATED, Json(result)).into_response();
    resp.extensions_mut().insert(crate::audit::Recorded);
    Ok(resp)
}
