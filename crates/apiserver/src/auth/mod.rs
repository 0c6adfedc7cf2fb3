//! Authentication and authorization, in one layer for every route and
//! verb, creates included: a bearer token names the caller ([`tokens`]),
//! bindings say what it holds ([`bindings`]), and
//! [`nexus_api::rbac::decide`] says whether this request is allowed, from
//! the policy each kind states in the registry. Handlers find the
//! [`Caller`] in the request's extensions; what they filter afterwards
//! (the projects a list shows, the tokens a caller manages) they ask of it.

pub mod bindings;
pub mod tokens;

use std::collections::BTreeSet;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use nexus_api::rbac::{Grants, Role, Subject, Verb, decide, special};
use nexus_api::{EventSpec, ResourceSpec, registry};

use crate::error::ApiError;
use crate::state::SharedState;

/// Who is calling, and what it holds.
#[derive(Debug, Clone)]
pub struct Caller {
    pub subject: Subject,
    /// The token presented.
    pub token_id: Option<String>,
    pub grants: Grants,
}

impl Caller {
    /// The projects whose objects this caller may read, `None` for all.
    pub fn readable_projects(&self) -> Option<BTreeSet<String>> {
        match &self.subject {
            Subject::Controller => None,
            _ if self.grants.reads_everywhere() => None,
            _ => Some(self.grants.projects.keys().cloned().collect()),
        }
    }

    /// Whether the caller holds `role` (or more) in `project`.
    pub fn holds(&self, project: &str, role: Role) -> bool {
        self.grants.cluster_admin() || self.grants.has(project, role)
    }

    /// Whether the caller may issue, see, revoke or rotate the tokens of
    /// `subject`: its own (a person's or a service account's), its
    /// project's service accounts' as a project admin, anyone's as a
    /// cluster admin.
    pub fn manages_tokens_of(&self, subject: &Subject) -> bool {
        if self.grants.cluster_admin() {
            return true;
        }
        match subject {
            s if *s == self.subject => matches!(s, Subject::User(_) | Subject::ServiceAccount { .. }),
            Subject::ServiceAccount { project, .. } => self.holds(project, Role::Admin),
            _ => false,
        }
    }
}

/// What a request is about, from its method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub verb: Verb,
    /// A registered kind, or one of [`special`].
    pub kind: String,
    pub project: String,
    pub name: String,
}

fn verb_of(method: &Method, has_name: bool, status: bool, watch: bool) -> Option<Verb> {
    Some(match (method.as_str(), has_name, status) {
        ("GET", false, false) if watch => Verb::Watch,
        ("GET", false, false) => Verb::List,
        ("GET", true, false) => Verb::Get,
        ("POST", false, false) => Verb::Create,
        ("PUT", true, false) => Verb::Update,
        ("PUT", true, true) => Verb::UpdateStatus,
        ("DELETE", true, false) => Verb::Delete,
        _ => return None,
    })
}

/// Parses a request on `/v1/...` into what it does to what. `query` is the
/// raw query string (for `watch=true`, and the audit log's `project=`).
pub fn target_with_query(method: &Method, path: &str, query: &str) -> Option<Target> {
    let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    let queried_project = query.split('&').find_map(|kv| kv.strip_prefix("project=")).unwrap_or_default().to_string();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (project, rest) = match parts.as_slice() {
        ["v1", "projects", p, rest @ ..] => (p.to_string(), rest),
        ["v1", rest @ ..] => (String::new(), rest),
        _ => return None,
    };
    let special_target = |kind: &str, verb: Verb, name: &str| {
        Some(Target { verb, kind: kind.to_string(), project: project.clone(), name: name.to_string() })
    };
    match rest {
        ["tokens", ..] => {
            return special_target(special::TOKENS, if method == Method::GET { Verb::Get } else { Verb::Update }, "");
        }
        ["audit"] if project.is_empty() => {
            let verb = Verb::List;
            return Some(Target { verb, kind: special::AUDIT.into(), project: queried_project, name: String::new() });
        }
        ["whoami"] | ["kinds"] => return special_target(special::SELF, Verb::Get, ""),
        ["nodes", name, "join"] => return special_target(special::NODE_JOIN, Verb::Create, name),
        // Events written in one request (whose handler also needs update).
        ["events:record"] if project.is_empty() => return special_target(EventSpec::KIND, Verb::Create, ""),
        ["nodes", name, "credential"] => {
            let verb = if method == Method::GET { Verb::Get } else { Verb::Update };
            return special_target(special::NODE_CREDENTIAL, verb, name);
        }
        _ => {}
    }
    let (plural, name, sub) = match rest {
        [plural] => (*plural, "", None),
        [plural, name] => (*plural, *name, None),
        [plural, name, sub] => (*plural, *name, Some(*sub)),
        _ => return None,
    };
    let kind = registry::kinds().iter().find(|k| k.plural == plural)?;
    let verb = match sub {
        None => verb_of(method, !name.is_empty(), false, watch)?,
        Some("status") => verb_of(method, true, true, false)?,
        // Subresources that read an object (logs, metrics) need its read.
        Some(_) if method == Method::GET => Verb::Get,
        // A fork makes VMs (and a Snapshot, which its handler checks).
        Some("fork") if method == Method::POST && plural == "vms" => Verb::Create,
        // An Image's file is written as the Image is.
        Some("content") if method == Method::PUT && plural == "images" => Verb::Update,
        Some(_) => return None,
    };
    if !kind.namespaced && !project.is_empty() {
        return None;
    }
    Some(Target { verb, kind: kind.kind.to_string(), project, name: name.to_string() })
}

/// [`target_with_query`] without a query.
pub fn target(method: &Method, path: &str) -> Option<Target> {
    target_with_query(method, path, "")
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Middleware: authenticates and authorizes every `/v1/` request; refusals
/// are answered here (401, 403) in the error contract. A path that names no
/// route is let through to be answered 404.
pub async fn layer(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let Some(token) = bearer(&req).map(str::to_string) else {
        return ApiError::Unauthorized("no bearer token: send Authorization: Bearer <token>".into()).into_response();
    };
    let verified = match state.tokens.verify(&state.store, &token).await {
        Ok(Ok(v)) => v,
        Ok(Err(why)) => return ApiError::Unauthorized(why.to_string()).into_response(),
        Err(e) => return e.into_response(),
    };
    let grants = match state.bindings.grants(&state.store, &verified.subject.to_string()).await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let caller = Caller { subject: verified.subject, token_id: Some(verified.id), grants };
    if let Err(e) = state.limits.take(&caller.subject) {
        let mut resp = e.into_response();
        resp.extensions_mut().insert(caller);
        return resp;
    }
    let query = req.uri().query().unwrap_or("").to_string();
    if let Some(t) = target_with_query(req.method(), req.uri().path(), &query) {
        let request = nexus_api::rbac::Request { verb: t.verb, kind: &t.kind, project: &t.project, name: &t.name };
        if let Err(denied) = decide(&caller.subject, &caller.grants, &request) {
            let mut resp = ApiError::Forbidden(denied).into_response();
            resp.extensions_mut().insert(caller);
            return resp;
        }
    }
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(caller);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_verb_kind_project_and_name() {
        let t = |m: Method, p: &str, q: &str| target_with_query(&m, p, q).map(|t| (t.verb, t.kind, t.project, t.name));
        assert_eq!(t(Method::GET, "/v1/projects/p/vms", ""), Some((Verb::List, "VM".into(), "p".into(), "".into())));
        assert_eq!(t(Method::GET, "/v1/projects/p/vms", "watch=true").unwrap().0, Verb::Watch);
        assert_eq!(t(Method::PUT, "/v1/projects/p/vms/a/status", "").unwrap().0, Verb::UpdateStatus);
        assert_eq!(t(Method::DELETE, "/v1/nodes/n1", ""), Some((Verb::Delete, "Node".into(), "".into(), "n1".into())));
        assert_eq!(t(Method::GET, "/v1/vms", "").unwrap().2, "", "all projects");
        assert_eq!(t(Method::GET, "/v1/projects/p/nodes/n1", ""), None, "nodes are cluster-wide");
        assert_eq!(t(Method::GET, "/v1/projects/p/pods", ""), None);
        // A VM's log and metrics are read as the VM is; a node's as the node.
        assert_eq!(
            t(Method::GET, "/v1/projects/p/vms/a/log", "follow=true"),
            Some((Verb::Get, "VM".into(), "p".into(), "a".into()))
        );
        assert_eq!(
            t(Method::GET, "/v1/projects/p/vms/a/metrics", ""),
            Some((Verb::Get, "VM".into(), "p".into(), "a".into()))
        );
        assert_eq!(
            t(Method::GET, "/v1/nodes/n1/metrics", ""),
            Some((Verb::Get, "Node".into(), "".into(), "n1".into()))
        );
        assert_eq!(t(Method::POST, "/v1/projects/p/vms/a/log", ""), None, "only read");
        let record = target(&Method::POST, "/v1/events:record").unwrap();
        assert_eq!((record.verb, record.kind.as_str(), record.project.as_str()), (Verb::Create, "Event", ""));
        assert_eq!(target(&Method::POST, "/v1/projects/p/events:record"), None, "events are cluster-wide");
        let join = target(&Method::POST, "/v1/nodes/n1/join").unwrap();
        assert_eq!((join.kind.as_str(), join.name.as_str()), (special::NODE_JOIN, "n1"));
        let audit = target_with_query(&Method::GET, "/v1/audit", "limit=5&project=p").unwrap();
        assert_eq!((audit.kind.as_str(), audit.project.as_str()), (special::AUDIT, "p"));
        assert_eq!(target(&Method::GET, "/v1/kinds").unwrap().kind, special::SELF);
    }
}
