//! Admission: what a write must pass besides authorization, which has
//! already let its caller make it. The write path ([`crate::resources`])
//! calls these checks; the store only runs them inside its transaction
//! where they must see what else is stored ([`quota`]).
//!
//! - [`nodes`]: a node creates only its own Node (authorization decided
//!   the create before the object's name was read);
//! - [`host_paths`]: raw host paths are for project admins in dev mode;
//! - [`quota`]: what quotas count stays within the project's quotas.

pub mod host_paths;
pub mod quota;

use nexus_api::policy::NodeAccess;
use nexus_api::rbac::{Denied, Subject, Verb};
use nexus_api::{Object, ResourceSpec};

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
    Ok(())
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
