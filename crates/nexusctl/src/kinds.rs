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
    KindInfo { kind: "VM", plural: "vms", namespaced: true, aliases: &["vm"] },
    KindInfo { kind: "Template", plural: "templates", namespaced: true, aliases: &["template", "tpl"] },
    KindInfo { kind: "Image", plural: "images", namespaced: true, aliases: &["image", "img"] },
    KindInfo { kind: "Snapshot", plural: "snapshots", namespaced: true, aliases: &["snapshot", "snap"] },
    KindInfo { kind: "Node", plural: "nodes", namespaced: false, aliases: &["node", "no"] },
    KindInfo { kind: "Event", plural: "events", namespaced: false, aliases: &["event", "ev"] },
    KindInfo { kind: "Lease", plural: "leases", namespaced: false, aliases: &["lease"] },
];

/// Runs `$body` with `$s` as the spec type of the kind named `$kind`
/// (`VM`, `Node`, ...), or evaluates `$unknown` for any other name.
macro_rules! with_spec {
    ($kind:expr, $s:ident => $body:expr, _ => $unknown:expr) => {
        match $kind {
            "VM" => {
                type $s = nexus_api::VmSpec;
                $body
            }
            "Template" => {
                type $s = nexus_api::TemplateSpec;
                $body
            }
            "Image" => {
                type $s = nexus_api::ImageSpec;
                $body
            }
            "Snapshot" => {
                type $s = nexus_api::SnapshotSpec;
                $body
            }
            "Node" => {
                type $s = nexus_api::NodeSpec;
                $body
            }
            "Event" => {
                type $s = nexus_api::EventSpec;
                $body
            }
            _ => $unknown,
        }
    };
}
pub(crate) use with_spec;

/// Finds a kind by `kind`, plural or alias, case-insensitively.
pub fn lookup(name: &str) -> Option<&'static KindInfo> {
    let lower = name.to_lowercase();
    KINDS.iter().find(|k| k.kind.to_lowercase() == lower || k.plural == lower || k.aliases.contains(&lower.as_str()))
}

/// Like `lookup`, with an error that lists the known kinds.
pub fn resolve(name: &str) -> Result<&'static KindInfo, String> {
    lookup(name).ok_or_else(|| unknown(name))
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

    /// `vm`, `template`, ...: how objects are named in messages (`vm/web-1`).
    pub fn short(&self) -> String {
        self.kind.to_lowercase()
    }
}
