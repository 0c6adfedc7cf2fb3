//! Admission: what a write must pass besides authorization, which has
//! already let its caller make it. The write path ([`crate::resources`])
//! calls these checks; the store only runs them inside its transaction
//! where they must see what else is stored ([`quota`]).
//!
//! - [`nodes`]: a node creates only its own Node (authorization decided
//!   the create before the object's name was read);
//! - [`host_paths`]: raw host paths are for project admins in dev mode;
//! - [`drive_images`]: a drive names a `Rootfs` Image (when it exists);
//! - [`quota`]: what quotas count stays within the project's quotas;
//! - [`in_use`]: a Volume a VM uses is not deleted.

pub mod host_paths;
pub mod quota;

use nexus_api::image::ImageType;
use nexus_api::policy::NodeAccess;
use nexus_api::rbac::{Denied, Subject, Verb};
use nexus_api::{ImageSpec, Object, ResourceSpec, VmSpec, VolumeSpec};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Checks the create of `obj` in `project` by `caller` that need no other
/// object: a node names itself, and raw host paths are allowed it.
pub async fn create<S: ResourceSpec>(
    state: &AppState,
    caller: &Caller,
    project: &str,
    obj: &Object<S>,
) -> Result<(), ApiError> {
    nodes(caller, obj)?;
    let may = host_paths::may_name_raw_paths(state, caller, project);
    if let Some((field, path)) = host_paths::unpermitted(may, obj, None) {
        return Err(host_paths::refused(state, field, &path).await);
    }
    drive_images(state, project, obj).await
}

/// Checks a spec update's drives (its host paths and quota are checked in
/// the write itself).
pub async fn update<S: ResourceSpec>(state: &AppState, project: &str, obj: &Object<S>) -> Result<(), ApiError> {
    drive_images(state, project, obj).await
}

/// Refuses a drive that names an Image of another type than `Rootfs`. An
/// Image not created yet is let through (objects may come in any order;
/// the VM waits for it).
async fn drive_images<S: ResourceSpec>(state: &AppState, project: &str, obj: &Object<S>) -> Result<(), ApiError> {
    let mut errors = nexus_api::validation::FieldErrors::default();
    for (field, name) in obj.spec.drive_images() {
        let Some(value) = state.store.get(ImageSpec::KIND, project, &name).await? else { continue };
        let image: nexus_api::Image = serde_json::from_value(value)?;
        if image.spec.type_ != ImageType::Rootfs {
            errors.add(
                &field,
                &name,
                &format!("is a {:?} Image; a drive needs a Rootfs Image (a disk image)", image.spec.type_),
            );
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(ApiError::Invalid { kind: S::KIND.to_string(), errors }) }
}

/// Refuses to delete a Volume a VM of its project holds or names: it is
/// deleted once detached (the VM deleted, or its drive removed).
pub async fn in_use<S: ResourceSpec>(state: &AppState, project: &str, name: &str) -> Result<(), ApiError> {
    if S::KIND != VolumeSpec::KIND {
        return Ok(());
    }
    let Some(value) = state.store.get(S::KIND, project, name).await? else { return Ok(()) };
    let volume: nexus_api::Volume = serde_json::from_value(value)?;
    let holder = volume.status.as_ref().and_then(|s| s.attached_to.clone());
    let (vms, _) = state.store.list(VmSpec::KIND, Some(project)).await?;
    let naming = vms
        .into_iter()
        .filter_map(|v| serde_json::from_value::<nexus_api::Vm>(v).ok())
        .find(|vm| vm.spec.drives.iter().any(|d| d.volume.as_deref() == Some(name)))
        .map(|vm| vm.name().to_string());
    match holder.or(naming) {
        Some(vm) => Err(ApiError::InUse {
            message: format!("volume {name} is used by VM {vm} in project {project}"),
            suggestion: format!("delete VM {vm}, or remove the drive from its spec, then delete the volume"),
        }),
        None => Ok(()),
    }
}

/// A node may create only the object of a kind it owns one of (its Node)
/// that bears its own name.
fn nodes<S: ResourceSpec>(caller: &Caller, obj: &Object<S>) -> Result<(), ApiError> {
    match &caller.subject {
        Subject::Node(own) if S::POLICY.node == NodeAccess::Own && obj.name() != own => {
            Err(ApiError::Forbidden(Denied {
                subject: caller.subject.to_string(),
                verb: Verb::Create,
                what: format!("{} {}", S::KIND, obj.name()),
                where_: String::new(),
                why: "a node registers its own Node and no other".into(),
                suggestion: Some("register the node under the name its token was issued for"),
            }))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::rbac::Grants;
    use nexus_api::{NodeSpec, VmSpec};

    fn caller(subject: Subject) -> Caller {
        Caller { subject, token_id: None, grants: Grants::default() }
    }

    #[test]
    fn a_node_creates_only_its_own_node() {
        let node = |name: &str| Object::<NodeSpec>::new(name, None, NodeSpec::default());
        let n1 = caller(Subject::Node("n1".into()));
        assert!(nodes(&n1, &node("n1")).is_ok());
        let refused = nodes(&n1, &node("n2")).unwrap_err();
        assert_eq!(refused.status_code(), axum::http::StatusCode::FORBIDDEN);
        assert!(refused.to_string().contains("node:n1 may not create Node n2"), "{refused}");
        assert!(nodes(&caller(Subject::User("admin".into())), &node("n2")).is_ok(), "others as RBAC says");
        let vm = Object::<VmSpec>::new("n2", Some("p"), VmSpec::default());
        assert!(nodes(&n1, &vm).is_ok(), "only kinds a node owns an object of");
    }
}
