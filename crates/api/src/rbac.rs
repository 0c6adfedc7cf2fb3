//! Who may do what: subjects and roles (granted by the kinds of
//! `binding`), and the decision itself. The apiserver
//! decides with [`decide`], a pure function of a request and the roles the
//! caller holds, so the whole matrix is testable without a server.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{NodeAccess, Readers, Writers};
use crate::validation::{FieldErrors, validate_dns_label};

/// Who makes a request: the identity a token stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// A person: `user:alice`.
    User(String),
    /// A service account of a project: `sa:ci:runner` (project `ci`).
    ServiceAccount { project: String, name: String },
    /// A node agent: `node:node-a`, allowed to write its own Node only.
    Node(String),
    /// The controller: `system:controller`.
    Controller,
    /// A join token: may only register a node (`system:join`).
    Join,
}

impl Subject {
    /// Parses the text form (`user:alice`, `sa:ci:runner`, `node:n1`,
    /// `system:controller`, `system:join`).
    pub fn parse(text: &str) -> Result<Subject, String> {
        let bad = || {
            format!(
                "subject {text:?} is not one of user:NAME, sa:PROJECT:NAME, node:NAME, system:controller, system:join"
            )
        };
        let label_ok = |s: &str| {
            let mut e = FieldErrors::default();
            validate_dns_label(&mut e, "subject", s);
            e.is_empty()
        };
        let subject = match text.split(':').collect::<Vec<_>>().as_slice() {
            ["user", name] if label_ok(name) => Subject::User(name.to_string()),
            ["sa", project, name] if label_ok(project) && label_ok(name) => {
                Subject::ServiceAccount { project: project.to_string(), name: name.to_string() }
            }
            ["node", name] if label_ok(name) => Subject::Node(name.to_string()),
            ["system", "controller"] => Subject::Controller,
            ["system", "join"] => Subject::Join,
            _ => return Err(bad()),
        };
        Ok(subject)
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::User(n) => write!(f, "user:{n}"),
            Subject::ServiceAccount { project, name } => write!(f, "sa:{project}:{name}"),
            Subject::Node(n) => write!(f, "node:{n}"),
            Subject::Controller => f.write_str("system:controller"),
            Subject::Join => f.write_str("system:join"),
        }
    }
}

/// A role a binding grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read everything of the project.
    Viewer,
    /// Read; create, update, delete and power VMs, VMPools and Snapshots.
    Operator,
    /// Everything in the project, role bindings and its service accounts'
    /// tokens included.
    Admin,
    /// Everything everywhere (in a ClusterRoleBinding only).
    ClusterAdmin,
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    UpdateStatus,
    Delete,
}

impl Verb {
    /// Every verb, in display order.
    pub const ALL: [Verb; 7] =
        [Verb::Get, Verb::List, Verb::Watch, Verb::Create, Verb::Update, Verb::UpdateStatus, Verb::Delete];

    /// Whether the verb only reads.
    pub fn reads(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }

    /// The verb as audit records and messages name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::UpdateStatus => "update-status",
            Verb::Delete => "delete",
        }
    }
}

/// What a request may be about besides the registered kinds: the routes
/// that are not about objects. Each has its own rule in [`decide`].
pub mod special {
    /// API tokens (`/v1/tokens`): every caller reaches them; which tokens
    /// each may see and change is filtered by who the tokens are for.
    pub const TOKENS: &str = "Token";
    /// The audit log (`/v1/audit`).
    pub const AUDIT: &str = "Audit";
    /// A node's agent credential (`/v1/nodes/{name}/credential`).
    pub const NODE_CREDENTIAL: &str = "NodeCredential";
    /// A node joining (`/v1/nodes/{name}/join`).
    pub const NODE_JOIN: &str = "NodeJoin";
    /// The caller itself (`/v1/whoami`) and the kinds served (`/v1/kinds`).
    pub const SELF: &str = "Self";
}

/// One request, as authorization sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub verb: Verb,
    /// `VM`, `Node`, ..., or one of [`special`].
    pub kind: &'a str,
    /// The project, empty for cluster-wide kinds and all-projects lists.
    pub project: &'a str,
    /// The object's name, empty for collections.
    pub name: &'a str,
}

/// The roles a subject holds: per project, and cluster-wide.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Roles bound in one project (by RoleBindings).
    pub projects: std::collections::BTreeMap<String, std::collections::BTreeSet<Role>>,
    /// Roles bound everywhere (by ClusterRoleBindings).
    pub cluster: std::collections::BTreeSet<Role>,
}

impl Grants {
    /// Whether `role` (or a stronger project role) holds in `project`.
    pub fn has(&self, project: &str, role: Role) -> bool {
        let strongest = |roles: &std::collections::BTreeSet<Role>| roles.iter().copied().max();
        let level = |r: Option<Role>| r.map(|r| r as u8);
        let here = level(self.projects.get(project).and_then(strongest));
        let everywhere = level(strongest(&self.cluster));
        here.max(everywhere).is_some_and(|l| l >= role as u8)
    }

    /// Whether the subject is a cluster admin.
    pub fn cluster_admin(&self) -> bool {
        self.cluster.contains(&Role::ClusterAdmin)
    }

    /// The projects where the subject may read.
    pub fn readable_projects(&self) -> Vec<String> {
        self.projects.keys().cloned().collect()
    }

    /// Whether the subject may read every project (a cluster-wide role).
    pub fn reads_everywhere(&self) -> bool {
        !self.cluster.is_empty()
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject} may not {verb} {what}{where_}: {why}", verb = .verb.as_str())]
pub struct Denied {
    pub subject: String,
    pub verb: Verb,
    pub what: String,
    pub where_: String,
    pub why: String,
    /// What to do instead, where the rule knows better than "ask for a
    /// role".
    pub suggestion: Option<&'static str>,
}

/// Decides whether `subject`, holding `grants`, may make `req`. Registered
/// kinds are decided by their [`Policy`](crate::policy::Policy), read from
/// the registry; the routes of [`special`] by their own rules. A create is
/// decided without the new object's name (as Kubernetes does): a node
/// naming itself is checked when the object is admitted.
///
/// The rules, as the roles are documented (`docs/security.md`):
/// - cluster admins may do everything;
/// - `system:controller` reads everything but tokens, writes every status,
///   writes the kinds whose policy says the controller writes them, and
///   reads node credentials;
/// - `node:N` reads and creates the kinds it owns an object of (its
///   Node), writes its own object's status, gets the kinds it may get
///   (Images it downloads) and sets its own credential;
/// - `system:join` only joins nodes;
/// - people and service accounts read and write as each kind's readers
///   and writers say; status is written by the system only.
pub fn decide(subject: &Subject, grants: &Grants, req: &Request<'_>) -> Result<(), Denied> {
    let deny = |why: &str| Err(denied(subject, req, why, None));
    if grants.cluster_admin() {
        return Ok(());
    }
    if let Some(answer) = decide_special(subject, grants, req) {
        return answer;
    }
    let Some(kind) = crate::registry::lookup_kind(req.kind) else {
        return deny("no such kind");
    };
    let policy = kind.policy;
    match subject {
        Subject::Controller => {
            return match req.verb {
                v if v.reads() => Ok(()),
                Verb::UpdateStatus => Ok(()),
                _ if policy.controller_writes => Ok(()),
                _ => deny("the controller role does not write this"),
            };
        }
        Subject::Node(own) => {
            let mine = req.name == own;
            return match (policy.node, req.verb) {
                (NodeAccess::Own, v) if v.reads() => Ok(()),
                (NodeAccess::Own, Verb::Create) => Ok(()),
                (NodeAccess::Own, Verb::UpdateStatus) if mine => Ok(()),
                // A node downloads the files of the Images its VMs use.
                (NodeAccess::Get, Verb::Get) => Ok(()),
                _ => deny("a node writes its own Node's status and nothing else"),
            };
        }
        Subject::Join => return deny("a join token only joins a node (POST /v1/nodes/{name}/join)"),
        Subject::User(_) | Subject::ServiceAccount { .. } => {}
    }
    if req.verb.reads() {
        return match policy.read {
            Readers::Everyone | Readers::EveryoneInTheirProjects => Ok(()),
            Readers::ClusterRoles if grants.reads_everywhere() => Ok(()),
            Readers::ClusterRoles | Readers::ClusterAdmins => deny("needs the cluster-admin role"),
            // A list across projects: served filtered to readable projects.
            Readers::Project(_) if req.project.is_empty() => {
                if grants.reads_everywhere() || !grants.projects.is_empty() {
                    Ok(())
                } else {
                    deny("no role in any project")
                }
            }
            Readers::Project(need) if grants.has(req.project, need) => Ok(()),
            Readers::Project(need) => deny(&format!("needs the {} role in the project", role_name(need))),
        };
    }
    if req.verb == Verb::UpdateStatus {
        return deny("status is written by the system; change the spec instead");
    }
    match policy.write {
        Writers::Project(need) if !req.project.is_empty() && grants.has(req.project, need) => Ok(()),
        Writers::Project(need) => deny(&format!("needs the {} role in the project", role_name(need))),
        Writers::ClusterAdmins if kind.namespaced => deny("not writable by project roles"),
        Writers::ClusterAdmins => deny("needs the cluster-admin role"),
        Writers::System => deny(&format!("{} are written by the system", kind.plural)),
    }
}

/// The rules of the routes that are not about registered kinds; `None`
/// for a registered kind.
fn decide_special(subject: &Subject, grants: &Grants, req: &Request<'_>) -> Option<Result<(), Denied>> {
    let deny = |why: &str, suggestion: &'static str| Some(Err(denied(subject, req, why, Some(suggestion))));
    match req.kind {
        special::SELF | special::TOKENS => Some(Ok(())),
        special::NODE_JOIN if *subject == Subject::Join => Some(Ok(())),
        special::NODE_JOIN => deny(
            "only a join token joins nodes",
            "join with a join token: `nexusctl token create --subject system:join`",
        ),
        special::NODE_CREDENTIAL => match (subject, req.verb) {
            (Subject::Controller, Verb::Get) => Some(Ok(())),
            (Subject::Node(own), Verb::Update) if own == req.name => Some(Ok(())),
            (_, Verb::Get) => deny(
                "only the controller reads node credentials",
                "only the controller (and cluster admins) call node agents",
            ),
            _ => deny("only a node sets its credential", "each node agent sets its own credential"),
        },
        special::AUDIT => {
            let person = matches!(subject, Subject::User(_) | Subject::ServiceAccount { .. });
            if person && req.verb.reads() && !req.project.is_empty() && grants.has(req.project, Role::Admin) {
                Some(Ok(()))
            } else {
                deny(
                    "reading the audit log needs the admin role in the project (or cluster-admin for all)",
                    "project admins read their project's records (?project=NAME); cluster admins read all",
                )
            }
        }
        _ => None,
    }
}

fn denied(subject: &Subject, req: &Request<'_>, why: &str, suggestion: Option<&'static str>) -> Denied {
    Denied {
        subject: subject.to_string(),
        verb: req.verb,
        what: if req.name.is_empty() { format!("{}s", req.kind) } else { format!("{} {}", req.kind, req.name) },
        where_: if req.project.is_empty() { String::new() } else { format!(" in project {}", req.project) },
        why: why.to_string(),
        suggestion,
    }
}

/// A role's name as bindings spell it.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Admin => "admin",
        Role::ClusterAdmin => "cluster-admin",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(project: &str, role: Role) -> Grants {
        let mut g = Grants::default();
        g.projects.entry(project.into()).or_default().insert(role);
        g
    }

    fn req<'a>(verb: Verb, kind: &'a str, project: &'a str) -> Request<'a> {
        Request { verb, kind, project, name: "x" }
    }

    #[test]
    fn subjects_round_trip_and_garbage_is_refused() {
        for s in ["user:alice", "sa:ci:runner", "node:n-1", "system:controller", "system:join"] {
            assert_eq!(Subject::parse(s).unwrap().to_string(), s);
        }
        for bad in ["alice", "user:", "user:Alice", "sa:ci", "system:root", "node:a:b"] {
            assert!(Subject::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn project_roles_nest_and_stop_at_their_project() {
        let alice = Subject::User("alice".into());
        let op = grants("p", Role::Operator);
        assert!(decide(&alice, &op, &req(Verb::Delete, "VM", "p")).is_ok());
        assert!(decide(&alice, &op, &req(Verb::Get, "Template", "p")).is_ok());
        let denied = decide(&alice, &op, &req(Verb::Create, "Template", "p")).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "user:alice may not create Template x in project p: needs the admin role in the project"
        );
        assert!(decide(&alice, &op, &req(Verb::Get, "VM", "q")).is_err(), "other project");
        assert!(decide(&alice, &grants("p", Role::Viewer), &req(Verb::Update, "VM", "p")).is_err());
        assert!(decide(&alice, &grants("p", Role::Admin), &req(Verb::Create, "RoleBinding", "p")).is_ok());
        assert!(decide(&alice, &grants("p", Role::Admin), &req(Verb::UpdateStatus, "VM", "p")).is_err());
    }

    #[test]
    fn a_node_writes_only_its_own_status() {
        let n = Subject::Node("n1".into());
        let g = Grants::default();
        let own = Request { verb: Verb::UpdateStatus, kind: "Node", project: "", name: "n1" };
        let other = Request { name: "n2", ..own.clone() };
        assert!(decide(&n, &g, &own).is_ok());
        assert!(decide(&n, &g, &other).is_err());
        assert!(decide(&n, &g, &Request { verb: Verb::Update, ..own.clone() }).is_err(), "not its spec");
        // A create is decided before its name is read: admission checks that
        // a node registers itself only (see the apiserver's `admission`).
        let create = Request { verb: Verb::Create, kind: "Node", project: "", name: "" };
        assert!(decide(&n, &g, &create).is_ok(), "registers itself");
        assert!(decide(&n, &g, &Request { kind: "Lease", ..create }).is_err(), "not another kind");
        assert!(decide(&n, &g, &req(Verb::Get, "VM", "p")).is_err());
    }

    #[test]
    fn leases_and_cluster_bindings_need_cluster_admin_and_the_controller_writes_leases() {
        let alice = Subject::User("alice".into());
        let everywhere = Grants { cluster: [Role::Admin].into(), ..Default::default() };
        let lease = Request { verb: Verb::Update, kind: "Lease", project: "", name: "nexus-controller" };
        assert!(decide(&alice, &everywhere, &lease).is_err());
        assert!(decide(&Subject::Controller, &Grants::default(), &lease).is_ok());
        let admin = Grants { cluster: [Role::ClusterAdmin].into(), ..Default::default() };
        assert!(decide(&alice, &admin, &lease).is_ok());
        assert!(decide(&Subject::Controller, &Grants::default(), &req(Verb::Create, "Template", "p")).is_err());
        assert!(decide(&Subject::Join, &Grants::default(), &req(Verb::Get, "Node", "")).is_err());
    }

    #[test]
    fn the_special_routes_keep_their_own_rules() {
        let g = Grants::default();
        let join = Request { verb: Verb::Create, kind: special::NODE_JOIN, project: "", name: "n1" };
        assert!(decide(&Subject::Join, &g, &join).is_ok());
        let refused = decide(&Subject::User("alice".into()), &g, &join).unwrap_err();
        assert!(refused.suggestion.is_some_and(|s| s.contains("system:join")));
        let cred = Request { verb: Verb::Get, kind: special::NODE_CREDENTIAL, project: "", name: "n1" };
        assert!(decide(&Subject::Controller, &g, &cred).is_ok());
        assert!(decide(&Subject::Node("n1".into()), &g, &cred).is_err(), "a node does not read credentials");
        let set = Request { verb: Verb::Update, ..cred.clone() };
        assert!(decide(&Subject::Node("n1".into()), &g, &set).is_ok());
        assert!(decide(&Subject::Node("n2".into()), &g, &set).is_err(), "only its own");
        let audit = Request { verb: Verb::List, kind: special::AUDIT, project: "p", name: "" };
        assert!(decide(&Subject::User("a".into()), &grants("p", Role::Admin), &audit).is_ok());
        assert!(decide(&Subject::User("a".into()), &grants("p", Role::Operator), &audit).is_err());
        assert!(
            decide(&Subject::User("a".into()), &grants("p", Role::Admin), &Request { project: "", ..audit }).is_err()
        );
        for subject in [Subject::Controller, Subject::Node("n".into()), Subject::User("u".into())] {
            let me = Request { verb: Verb::Get, kind: special::SELF, project: "", name: "" };
            assert!(decide(&subject, &g, &me).is_ok(), "{subject} asks who it is");
        }
    }

    #[test]
    fn events_are_read_by_everyone_and_written_by_the_system() {
        let alice = Subject::User("alice".into());
        let admin = grants("p", Role::Admin);
        assert!(decide(&alice, &Grants::default(), &req(Verb::List, "Event", "")).is_ok());
        let refused = decide(&alice, &admin, &req(Verb::Create, "Event", "")).unwrap_err();
        assert_eq!(refused.why, "events are written by the system");
        assert!(decide(&Subject::Controller, &Grants::default(), &req(Verb::Create, "Event", "")).is_ok());
        let quota = decide(&alice, &admin, &req(Verb::Update, "ResourceQuota", "p")).unwrap_err();
        assert_eq!(quota.why, "not writable by project roles");
        assert!(decide(&alice, &grants("p", Role::Viewer), &req(Verb::Get, "ResourceQuota", "p")).is_ok());
        assert!(decide(&alice, &grants("p", Role::Operator), &req(Verb::Get, "RoleBinding", "p")).is_err());
    }
}
