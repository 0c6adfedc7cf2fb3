//! The one registry of kinds. Everything that lists kinds — the
//! apiserver's routes and OpenAPI document, the JSON Schemas, field
//! selectors, nexusctl's kind table and print columns, the API reference's
//! route table — is derived from [`visit_kinds`], so a kind added here is
//! served, documented and usable everywhere at once.

use std::sync::LazyLock;

use crate::meta::ResourceSpec;

/// How a column's value is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The value as text (`<none>` when absent, unless a default is given).
    Text,
    /// Time since an RFC 3339 timestamp (`45s`, `12m`, `3h`, `5d`).
    Age,
    /// A number of MiB, with the `Mi` suffix.
    Mebibytes,
    /// A number of bytes, in the largest binary unit that keeps it at or
    /// above 1 (`512Mi`, `1.5Gi`).
    Bytes,
    /// The status of the condition of this type (`Unknown` when absent);
    /// the column's path points at the conditions list.
    Condition(&'static str),
    /// An object reference `{kind, name}` as `kind/name`.
    Reference,
}

/// One column of `nexusctl get`: like a CRD's additionalPrinterColumns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// Header, in capitals.
    pub name: &'static str,
    /// Dotted paths tried in order; the first present one is shown.
    pub paths: &'static [&'static str],
    pub format: Format,
    /// Shown with `-o wide` only.
    pub wide: bool,
    /// Shown when no path is present.
    pub default: Option<&'static str>,
}

impl Column {
    /// A plain column (not wide, no default).
    pub const fn new(name: &'static str, paths: &'static [&'static str], format: Format) -> Column {
        Column { name, paths, format, wide: false, default: None }
    }

    /// This column, shown with `-o wide` only.
    pub const fn wide(mut self) -> Column {
        self.wide = true;
        self
    }

    /// This column, showing `value` when no path is present.
    pub const fn or(mut self, value: &'static str) -> Column {
        self.default = Some(value);
        self
    }
}

/// The columns every kind starts with and ends with.
pub const NAME: Column = Column::new("NAME", &["metadata.name"], Format::Text);
pub const AGE: Column = Column::new("AGE", &["metadata.creationTimestamp"], Format::Age);

/// Field selectors every kind supports.
pub const COMMON_FIELD_SELECTORS: &[&str] = &["metadata.name", "metadata.project"];

/// What every component knows about one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindInfo {
    /// `VM`, `Node`, ...
    pub kind: &'static str,
    /// Lower-case plural used in paths (`vms`).
    pub plural: &'static str,
    /// Project-scoped (`true`) or cluster-wide.
    pub namespaced: bool,
    /// Other names nexusctl accepts.
    pub aliases: &'static [&'static str],
    /// Dotted paths a `fieldSelector` may name (the common ones included).
    pub field_selectors: Vec<&'static str>,
    /// Columns of `nexusctl get`.
    pub columns: &'static [Column],
    /// Who may read and write it, and whether quotas count it.
    pub policy: crate::policy::Policy,
}

impl KindInfo {
    /// The registry entry of kind `S`.
    pub fn of<S: ResourceSpec>() -> KindInfo {
        let mut field_selectors = COMMON_FIELD_SELECTORS.to_vec();
        field_selectors.extend_from_slice(S::FIELD_SELECTORS);
        KindInfo {
            kind: S::KIND,
            plural: S::PLURAL,
            namespaced: S::NAMESPACED,
            aliases: S::ALIASES,
            field_selectors,
            columns: S::COLUMNS,
            policy: S::POLICY,
        }
    }

    /// Path of the collection in `project` (ignored for cluster-wide kinds).
    pub fn collection(&self, project: &str) -> String {
        if self.namespaced { format!("/v1/projects/{project}/{}", self.plural) } else { format!("/v1/{}", self.plural) }
    }

    /// Path of the collection across every project.
    pub fn all_projects(&self) -> String {
        format!("/v1/{}", self.plural)
    }

    /// Path of one object.
    pub fn object(&self, project: &str, name: &str) -> String {
        format!("{}/{name}", self.collection(project))
    }

    /// `vm`, `template`, ...: how objects are named in messages (`vm/web-1`).
    pub fn short(&self) -> String {
        self.kind.to_lowercase()
    }

    /// The route templates the apiserver serves for this kind, with verbs.
    pub fn routes(&self) -> Vec<(String, &'static str)> {
        let (collection, object) = if self.namespaced {
            (
                format!("/v1/projects/{{project}}/{}", self.plural),
                format!("/v1/projects/{{project}}/{}/{{name}}", self.plural),
            )
        } else {
            (format!("/v1/{}", self.plural), format!("/v1/{}/{{name}}", self.plural))
        };
        let mut routes = vec![
            (collection, "GET (list, ?watch=true), POST"),
            (object.clone(), "GET, PUT, DELETE"),
            (format!("{object}/status"), "PUT"),
        ];
        if self.namespaced {
            routes.push((format!("/v1/{}", self.plural), "GET across projects (list, ?watch=true)"));
        }
        routes
    }
}

/// Something done once per kind, with the kind's spec type in hand.
pub trait KindVisitor {
    fn visit<S: ResourceSpec>(&mut self);
}

/// Calls `visitor` with every kind the API serves, in display order. This
/// is the only list of kinds in the code.
pub fn visit_kinds(visitor: &mut impl KindVisitor) {
    visitor.visit::<crate::VmSpec>();
    visitor.visit::<crate::VmPoolSpec>();
    visitor.visit::<crate::TemplateSpec>();
    visitor.visit::<crate::ImageSpec>();
    visitor.visit::<crate::SnapshotSpec>();
    visitor.visit::<crate::VolumeSpec>();
    visitor.visit::<crate::NodeSpec>();
    visitor.visit::<crate::EventSpec>();
    visitor.visit::<crate::LeaseSpec>();
    visitor.visit::<crate::RoleBindingSpec>();
    visitor.visit::<crate::ClusterRoleBindingSpec>();
    visitor.visit::<crate::ResourceQuotaSpec>();
}

static KINDS: LazyLock<Vec<KindInfo>> = LazyLock::new(|| {
    struct Collect(Vec<KindInfo>);
    impl KindVisitor for Collect {
        fn visit<S: ResourceSpec>(&mut self) {
            self.0.push(KindInfo::of::<S>());
        }
    }
    let mut all = Collect(Vec::new());
    visit_kinds(&mut all);
    all.0
});

/// Every kind, in display order.
pub fn kinds() -> &'static [KindInfo] {
    &KINDS
}

/// The kind called `name`: its kind, plural or an alias, in any case.
pub fn lookup(name: &str) -> Option<&'static KindInfo> {
    let lower = name.to_lowercase();
    kinds().iter().find(|k| k.kind.to_lowercase() == lower || k.plural == lower || k.aliases.contains(&lower.as_str()))
}

/// The kind whose `kind` is exactly `kind` (`VM`, `Node`).
pub fn lookup_kind(kind: &str) -> Option<&'static KindInfo> {
    kinds().iter().find(|k| k.kind == kind)
}

/// The kinds whose objects quota admission reads: those it counts and
/// those it reads to size them.
pub fn quota_kinds() -> impl Iterator<Item = &'static KindInfo> {
    kinds().iter().filter(|k| k.policy.quota != crate::policy::QuotaUse::None)
}

/// A function generic over the spec type, run for one kind chosen at run
/// time by [`with_kind`].
pub trait KindFn {
    type Output;
    fn call<S: ResourceSpec>(self) -> Self::Output;
}

/// Runs `f` with the spec type of the kind whose `kind` is exactly `kind`
/// (`VM`, `Node`); `None` for an unknown kind.
pub fn with_kind<F: KindFn>(kind: &str, f: F) -> Option<F::Output> {
    struct Dispatch<'a, F: KindFn> {
        kind: &'a str,
        f: Option<F>,
        out: Option<F::Output>,
    }
    impl<F: KindFn> KindVisitor for Dispatch<'_, F> {
        fn visit<S: ResourceSpec>(&mut self) {
            if S::KIND == self.kind
                && let Some(f) = self.f.take()
            {
                self.out = Some(f.call::<S>());
            }
        }
    }
    let mut d = Dispatch { kind, f: Some(f), out: None };
    visit_kinds(&mut d);
    d.out
}

/// One kind as `GET /v1/kinds` describes it to clients (the web console
/// learns the kinds from it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KindDescription {
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    pub aliases: Vec<String>,
    pub field_selectors: Vec<String>,
}

/// The answer of `GET /v1/kinds`: every kind, in display order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KindList {
    pub api_version: String,
    pub kinds: Vec<KindDescription>,
}

impl KindList {
    /// The served kinds, from the registry.
    pub fn served() -> KindList {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        KindList {
            api_version: crate::API_VERSION.into(),
            kinds: kinds()
                .iter()
                .map(|k| KindDescription {
                    kind: k.kind.into(),
                    plural: k.plural.into(),
                    namespaced: k.namespaced,
                    aliases: strings(k.aliases),
                    field_selectors: strings(&k.field_selectors),
                })
                .collect(),
        }
    }
}

/// The API reference's route table (markdown), derived from the registry;
/// `docs/api.md` carries it between markers and a test keeps it current.
pub fn route_table_markdown() -> String {
    let mut out = String::from("| path | verbs |\n|---|---|\n");
    for kind in kinds() {
        for (path, verbs) in kind.routes() {
            out.push_str(&format!("| `{path}` | {verbs} |\n"));
        }
    }
    for (path, what) in crate::OPERATIONS_ROUTES {
        out.push_str(&format!("| `{path}` | {what} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_by_kind_plural_and_alias() {
        for k in kinds() {
            assert_eq!(lookup(k.kind).map(|f| f.kind), Some(k.kind));
            assert_eq!(lookup(k.plural).map(|f| f.kind), Some(k.kind));
            for a in k.aliases {
                assert_eq!(lookup(a).map(|f| f.kind), Some(k.kind), "{a}");
            }
            if k.kind != "Event" {
                assert_eq!(k.columns.first().map(|c| c.name), Some("NAME"), "{}", k.kind);
            }
        }
        assert!(lookup("lease").is_some() && lookup("leases").is_some());
        assert!(lookup("pods").is_none());
    }

    #[test]
    fn with_kind_runs_with_the_named_kinds_type() {
        struct Plural;
        impl KindFn for Plural {
            type Output = &'static str;
            fn call<S: ResourceSpec>(self) -> &'static str {
                S::PLURAL
            }
        }
        for k in kinds() {
            assert_eq!(with_kind(k.kind, Plural), Some(k.plural));
        }
        assert_eq!(with_kind("Pod", Plural), None);
    }
}
