//! The host-path policy: raw host paths as kernels and disks are a dev-mode
//! feature, for project admins only; everyone else names Images, whose
//! paths the nodes confine to their image roots.

use nexus_api::{NodeSpec, Object, ResourceSpec};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// The first raw host path in `obj`'s spec the caller may not name, as
/// (field, path). Raw paths need a server in dev mode and a caller who
/// administers the project. Only paths the request brings count: those
/// `current` (the stored object) already has may stay, so the system's own
/// updates of such an object pass.
pub fn unpermitted<S: ResourceSpec>(
    may_name_raw_paths: bool,
    obj: &Object<S>,
    current: Option<&Object<S>>,
) -> Option<(&'static str, String)> {
    if may_name_raw_paths {
        return None;
    }
    let kept = current.map(|c| c.spec.host_paths()).unwrap_or_default();
    obj.spec.host_paths().into_iter().find(|p| !kept.contains(p))
}

/// Whether `caller` may name raw host paths in `project` on this server.
pub fn may_name_raw_paths(state: &AppState, caller: &Caller, project: &str) -> bool {
    state.allow_raw_paths && caller.holds(project, nexus_api::rbac::Role::Admin)
}

/// The refusal of raw host path `path` in `field`, with the image roots
/// the nodes report as the way out.
pub async fn refused(state: &AppState, field: &str, path: &str) -> ApiError {
    let roots = image_roots(state).await;
    let why = if state.allow_raw_paths {
        "raw host paths need the admin role in the project"
    } else {
        "raw host paths are a dev-mode feature (apiserver --allow-raw-paths), off on this server"
    };
    ApiError::Refused {
        message: format!("{field} names the host path {path}: {why}"),
        suggestion: format!(
            "create an Image whose path lies under a node's image root ({}) and name it in {field}",
            if roots.is_empty() { "the nodes report none yet".to_string() } else { roots.join(", ") }
        ),
    }
}

/// The image roots the nodes report.
async fn image_roots(state: &AppState) -> Vec<String> {
    let Ok((nodes, _)) = state.store.list(NodeSpec::KIND, None).await else { return Vec::new() };
    let mut roots: Vec<String> = nodes
        .iter()
        .flat_map(|n| n["status"]["imageRoots"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    roots.sort();
    roots.dedup();
    roots
}
