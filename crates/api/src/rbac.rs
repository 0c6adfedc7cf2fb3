//! Who may do what: subjects, roles, and the `RoleBinding` and
//! `ClusterRoleBinding` kinds that grant roles to subjects. The apiserver
//! decides with [`decide`], a pure function of a request and the roles the
//! caller holds, so the whole matrix is testable without a server.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Object, ResourceSpec};
use crate::registry::{AGE, Column, Format, NAME};
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

/// The kinds a request may be about besides the registered ones.
pub mod special {
    /// API tokens (`/v1/tokens`).
    pub const TOKENS: &str = "Token";
    /// The audit log (`/v1/audit`).
    pub const AUDIT: &str = "Audit";
    /// A node's agent credential (`/v1/nodes/{name}/credential`).
    pub const NODE_CREDENTIAL: &str = "NodeCredential";
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
}

/// Project-scoped kinds users work with, by the weakest role that may
/// write them.
fn writer_role(kind: &str) -> Option<Role> {
    match kind {
        "VM" | "VMPool" | "Snapshot" => Some(Role::Operator),
        "Template" | "Image" | "RoleBinding" | special::TOKENS => Some(Role::Admin),
        _ => None,
    }
}

/// Decides whether `subject`, holding `grants`, may make `req`.
///
/// The rules, as the roles are documented (`docs/security.md`):
/// - `system:controller` reads everything, writes statuses, VMs,
///   VMPools, Snapshots, Events and Leases, and reads node credentials;
/// - `node:N` reads and creates its own Node and writes its status;
/// - `system:join` may do nothing here (it only joins nodes);
/// - everyone authenticated reads Nodes;
/// - project roles: viewer reads the project's VMs, Snapshots, Templates,
///   Images and Events; operator also writes VMs, VMPools and Snapshots; admin
///   writes everything of the project (role bindings and tokens of its
///   service accounts included) and reads its audit log;
/// - status is written by the system (and cluster admins) only;
/// - cluster-wide kinds (Nodes, Leases, Events, ClusterRoleBindings) are
///   written by cluster admins (and the components above).
pub fn decide(subject: &Subject, grants: &Grants, req: &Request<'_>) -> Result<(), Denied> {
    let deny = |why: &str| {
        Err(Denied {
            subject: subject.to_string(),
            verb: req.verb,
            what: if req.name.is_empty() { format!("{}s", req.kind) } else { format!("{} {}", req.kind, req.name) },
            where_: if req.project.is_empty() { String::new() } else { format!(" in project {}", req.project) },
            why: why.to_string(),
        })
    };
    if grants.cluster_admin() {
        return Ok(());
    }
    match subject {
        Subject::Controller => {
            return match (req.kind, req.verb) {
                (_, v) if v.reads() && req.kind != special::TOKENS => Ok(()),
                (_, Verb::UpdateStatus) => Ok(()),
                ("VM" | "VMPool" | "Snapshot" | "Event" | "Lease", _) => Ok(()),
                (special::NODE_CREDENTIAL, Verb::Get) => Ok(()),
                _ => deny("the controller role does not write this"),
            };
        }
        Subject::Node(own) => {
            let mine = req.kind == "Node" && req.name == own;
            return match req.verb {
                Verb::Get | Verb::List | Verb::Watch if req.kind == "Node" => Ok(()),
                // A node downloads the files of the Images its VMs use.
                Verb::Get if req.kind == "Image" => Ok(()),
                Verb::Create | Verb::UpdateStatus if mine => Ok(()),
                Verb::Update if req.kind == special::NODE_CREDENTIAL && req.name == own => Ok(()),
                _ => deny("a node writes its own Node's status and nothing else"),
            };
        }
        Subject::Join => return deny("a join token only joins a node (POST /v1/nodes/{name}/join)"),
        Subject::User(_) | Subject::ServiceAccount { .. } => {}
    }
    // Every authenticated person or service account reads nodes.
    if req.kind == "Node" && req.verb.reads() {
        return Ok(());
    }
    if req.verb == Verb::UpdateStatus {
        return deny("status is written by the system; change the spec instead");
    }
    match req.kind {
        "Node" | "Lease" | "ClusterRoleBinding" => {
            return if req.verb.reads() && grants.reads_everywhere() && req.kind != "ClusterRoleBinding" {
                Ok(())
            } else {
                deny("needs the cluster-admin role")
            };
        }
        "Event" => {
            // Events are cluster-wide objects about objects in projects;
            // reads are filtered by project where they are served.
            return if req.verb.reads() { Ok(()) } else { deny("events are written by the system") };
        }
        special::AUDIT => {
            return if req.verb.reads() && !req.project.is_empty() && grants.has(req.project, Role::Admin) {
                Ok(())
            } else {
                deny("reading the audit log needs the admin role in the project (or cluster-admin for all)")
            };
        }
        _ => {}
    }
    if req.project.is_empty() {
        // A list across projects: served filtered to readable projects.
        return if req.verb.reads() && (grants.reads_everywhere() || !grants.projects.is_empty()) {
            Ok(())
        } else {
            deny("no role in any project")
        };
    }
    if req.verb.reads() {
        let need = if req.kind == "RoleBinding" || req.kind == special::TOKENS { Role::Admin } else { Role::Viewer };
        return if grants.has(req.project, need) {
            Ok(())
        } else {
            deny(&format!("needs the {} role in the project", role_name(need)))
        };
    }
    match writer_role(req.kind) {
        Some(need) if grants.has(req.project, need) => Ok(()),
        Some(need) => deny(&format!("needs the {} role in the project", role_name(need))),
        None => deny("not writable by project roles"),
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

/// A grant of a role to subjects in one project.
pub type RoleBinding = Object<RoleBindingSpec>;

/// The role and who gets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleBindingSpec {
    /// `viewer`, `operator` or `admin`.
    pub role: Role,
    /// Who gets it: `user:NAME` or `sa:PROJECT:NAME`.
    pub subjects: Vec<String>,
}

/// Bindings carry no observed state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BindingStatus {}

fn validate_subjects(errors: &mut FieldErrors, subjects: &[String]) {
    if subjects.is_empty() {
        errors.add("spec.subjects", "[]", "must name at least one subject, such as user:alice");
    }
    if subjects.len() > 100 {
        errors.add("spec.subjects", format!("{} entries", subjects.len()), "at most 100 subjects per binding");
    }
    for (i, s) in subjects.iter().enumerate() {
        match Subject::parse(s) {
            Ok(Subject::User(_) | Subject::ServiceAccount { .. }) => {}
            Ok(_) => errors.add(&format!("spec.subjects[{i}]"), s, "roles are bound to users and service accounts"),
            Err(e) => errors.add(&format!("spec.subjects[{i}]"), s, &e),
        }
    }
}

impl ResourceSpec for RoleBindingSpec {
    type Status = BindingStatus;
    const KIND: &'static str = "RoleBinding";
    const PLURAL: &'static str = "rolebindings";
    const NAMESPACED: bool = true;
    const ALIASES: &'static [&'static str] = &["rolebinding", "rb"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("ROLE", &["spec.role"], Format::Text),
        Column::new("SUBJECTS", &["spec.subjects"], Format::Text),
        AGE,
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        if self.role == Role::ClusterAdmin {
            errors.add("spec.role", "cluster-admin", "is bound in a ClusterRoleBinding; use viewer, operator or admin");
        }
        validate_subjects(errors, &self.subjects);
    }
}

/// A grant of a role to subjects in every project.
pub type ClusterRoleBinding = Object<ClusterRoleBindingSpec>;

/// The role and who gets it, everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterRoleBindingSpec {
    /// `viewer`, `operator` or `admin` in every project, or `cluster-admin`.
    pub role: Role,
    /// Who gets it: `user:NAME` or `sa:PROJECT:NAME`.
    pub subjects: Vec<String>,
}

impl ResourceSpec for ClusterRoleBindingSpec {
    type Status = BindingStatus;
    const KIND: &'static str = "ClusterRoleBinding";
    const PLURAL: &'static str = "clusterrolebindings";
    const NAMESPACED: bool = false;
    const ALIASES: &'static [&'static str] = &["clusterrolebinding", "crb"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("ROLE", &["spec.role"], Format::Text),
        Column::new("SUBJECTS", &["spec.subjects"], Format::Text),
        AGE,
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        validate_subjects(errors, &self.subjects);
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
        let create = |name| Request { verb: Verb::Create, kind: "Node", project: "", name };
        assert!(decide(&n, &g, &create("n1")).is_ok(), "registers itself");
        assert!(decide(&n, &g, &create("n2")).is_err(), "not another node");
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
}
