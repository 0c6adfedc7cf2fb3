//! Fork: N running copies of a running VM in one request. The apiserver
//! takes one Snapshot of the source and makes N VMs restored from it; this
//! module holds the request, the answer, the bound on N and the names and
//! labels the copies get, with no I/O.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::FieldErrors;

/// Most copies one fork makes. A fork's copies restore on the snapshot's
/// node at first, so the bound is about what one node starts at once.
pub const MAX_COPIES: u32 = 100;
/// Label on every copy (and on the fork's Snapshot): the source VM's name.
pub const FORKED_FROM_LABEL: &str = "nexus.dev/forked-from";
/// Label on every copy (and on the fork's Snapshot): the fork's id, so
/// that `-l nexus.dev/fork=ID` selects one fork's copies.
pub const FORK_LABEL: &str = "nexus.dev/fork";

/// The body of `POST /v1/projects/{project}/vms/{name}/fork`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForkRequest {
    /// How many copies, 1 to [`MAX_COPIES`].
    pub copies: u32,
}

impl ForkRequest {
    /// Field errors of this request, if any.
    pub fn validate(&self) -> FieldErrors {
        let mut errors = FieldErrors::default();
        if self.copies == 0 || self.copies > MAX_COPIES {
            errors.add(
                "copies",
                self.copies,
                &format!("must be from 1 to {MAX_COPIES}; fork again for more, or use a VMPool with restoreFrom"),
            );
        }
        errors
    }
}

/// What a fork made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForkResult {
    /// The fork's id (the value of its [`FORK_LABEL`]).
    pub id: String,
    /// The Snapshot of the source the copies restore from.
    pub snapshot: String,
    /// The copies' names, in order.
    pub vms: Vec<String>,
    /// A label selector for the copies (`nexus.dev/fork=ID`).
    pub selector: String,
}

/// The names of fork `id` of VM `source`: its snapshot's and its `copies`
/// VMs'. Each stays a DNS label (63 characters): a long source name is cut.
pub fn names(source: &str, id: &str, copies: u32) -> (String, Vec<String>) {
    let width = copies.to_string().len();
    // "-" id "-" index, and "-fork-" id for the snapshot.
    let room = 63 - (id.len() + 6).max(id.len() + 2 + width);
    let stem = source[..source.len().min(room)].trim_end_matches('-');
    let snapshot = format!("{stem}-fork-{id}");
    let vms = (1..=copies).map(|i| format!("{stem}-{id}-{i:0width$}")).collect();
    (snapshot, vms)
}

/// The labels of fork `id` of `source`'s objects: the source's own labels
/// (so its selectors find the copies too), with the fork's two over them.
pub fn labels(source_labels: &BTreeMap<String, String>, source: &str, id: &str) -> BTreeMap<String, String> {
    let mut labels = source_labels.clone();
    labels.insert(FORKED_FROM_LABEL.into(), source.into());
    labels.insert(FORK_LABEL.into(), id.into());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_bounded_and_the_error_names_the_field() {
        assert!(ForkRequest { copies: 1 }.validate().is_empty());
        assert!(ForkRequest { copies: MAX_COPIES }.validate().is_empty());
        let e = ForkRequest { copies: MAX_COPIES + 1 }.validate().to_string();
        assert!(e.contains("copies") && e.contains("from 1 to 100"), "{e}");
        assert!(!ForkRequest { copies: 0 }.validate().is_empty());
    }

    #[test]
    fn names_sort_in_order_and_stay_dns_labels() {
        let (snap, vms) = names("web", "k3x9q", 12);
        assert_eq!(snap, "web-fork-k3x9q");
        assert_eq!(vms.first().unwrap(), "web-k3x9q-01");
        assert_eq!(vms.last().unwrap(), "web-k3x9q-12");
        let long = "a".repeat(63);
        let (snap, vms) = names(&long, "k3x9q", 100);
        assert!(snap.len() <= 63 && vms.iter().all(|v| v.len() <= 63), "{snap} {vms:?}");
        let mut errors = FieldErrors::default();
        crate::validation::validate_dns_label(&mut errors, "name", &vms[99]);
        crate::validation::validate_dns_label(&mut errors, "name", &snap);
        assert!(errors.is_empty(), "{errors}");
    }

    #[test]
    fn copies_keep_the_sources_labels_under_the_forks() {
        let mut own = BTreeMap::new();
        own.insert("app".to_string(), "web".to_string());
        own.insert(FORK_LABEL.to_string(), "old".to_string());
        let l = labels(&own, "web", "k3x9q");
        assert_eq!(l["app"], "web");
        assert_eq!(l[FORK_LABEL], "k3x9q");
        assert_eq!(l[FORKED_FROM_LABEL], "web");
    }
}
