//! The `RoleBinding` and `ClusterRoleBinding` kinds: grants of a role (see
//! `rbac`) to subjects, in one project or everywhere.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Object, ResourceSpec};
use crate::policy::{Policy, Readers, Writers};
use crate::rbac::{Role, Subject};
use crate::registry::{AGE, Column, Format, NAME};
use crate::validation::FieldErrors;

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
    const POLICY: Policy = Policy::project(Role::Admin).read_by(Readers::Project(Role::Admin));
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
    const POLICY: Policy = Policy::cluster(Readers::ClusterAdmins, Writers::ClusterAdmins);
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
