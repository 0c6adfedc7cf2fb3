//! The kinds nexusctl knows, by every name a user may type.

/// One kind's names and scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    aliases: &'static [&'static str],
}

pub const KINDS: &[KindInfo] = &[
    KindInfo { kind: "VM", plural: "vms", namespaced: true, aliases: &["vm", "vms"] },
    KindInfo { kind: "Node", plural: "nodes", namespaced: false, aliases: &["node", "nodes", "no"] },
];

/// Finds a kind by `kind`, plural or alias, case-insensitively.
pub fn lookup(name: &str) -> Option<&'static KindInfo> {
    let lower = name.to_lowercase();
    KINDS.iter().find(|k| k.kind.to_lowercase() == lower || k.plural == lower || k.aliases.contains(&lower.as_str()))
}

/// The error text for an unknown kind name.
pub fn unknown(name: &str) -> String {
    let known: Vec<&str> = KINDS.iter().map(|k| k.plural).collect();
    format!("unknown kind {name:?}; known kinds: {}", known.join(", "))
}

impl KindInfo {
    /// Path of the collection in `project`.
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
}
