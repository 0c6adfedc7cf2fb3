//! The `Lease` kind: who holds a named role (such as the active controller)
//! and until when.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Readers, Writers};
use crate::registry::{Column, Format, NAME};

use crate::meta::{Object, ResourceSpec};
use crate::validation::FieldErrors;

/// A time-bound claim on a role.
pub type Lease = Object<LeaseSpec>;

/// The current claim.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseSpec {
    /// Identity of the holder; absent when released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,
    /// How long a claim lasts without renewal.
    pub lease_duration_seconds: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<DateTime<Utc>>,
    /// How many times the holder changed.
    #[serde(default)]
    pub lease_transitions: u32,
}

/// Leases carry no observed state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseStatus {}

impl ResourceSpec for LeaseSpec {
    type Status = LeaseStatus;
    const KIND: &'static str = "Lease";
    const PLURAL: &'static str = "leases";
    const NAMESPACED: bool = false;
    const POLICY: Policy = Policy::cluster(Readers::ClusterRoles, Writers::ClusterAdmins).written_by_the_controller();
    const ALIASES: &'static [&'static str] = &["lease"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("HOLDER", &["spec.holderIdentity"], Format::Text),
        Column::new("RENEWED", &["spec.renewTime"], Format::Age),
        Column::new("TRANSITIONS", &["spec.leaseTransitions"], Format::Text),
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        if self.lease_duration_seconds == 0 || self.lease_duration_seconds > 3600 {
            errors.add("spec.leaseDurationSeconds", self.lease_duration_seconds, "must be 1 to 3600 seconds");
        }
    }
}

impl LeaseSpec {
    /// Whether the claim has run out at `now`.
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        match (&self.holder_identity, self.renew_time) {
            (Some(_), Some(renewed)) => {
                now - renewed > chrono::Duration::seconds(i64::from(self.lease_duration_seconds))
            }
            _ => true,
        }
    }
}

/// Header a lease holder sends with its writes so that the apiserver can
/// refuse them once the lease has passed to another (see [`Fence`]).
pub const FENCE_HEADER: &str = "nexus-fence";

/// A holder's claim to act under a lease, as sent with each of its writes:
/// the lease's name, the holder's identity and the lease's transition count
/// when it was acquired. The apiserver checks it against the stored lease in
/// the write's own transaction, so a holder that was paused or cut off while
/// another took over cannot write once it resumes: its term has ended even
/// if it does not know yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease: String,
    pub holder: String,
    pub transitions: u32,
}

impl Fence {
    /// The header's value: `lease holder transitions`, space-separated.
    pub fn header_value(&self) -> String {
        format!("{} {} {}", self.lease, self.holder, self.transitions)
    }

    /// Reads a header value written by [`Fence::header_value`]; `None` when it
    /// is not one.
    pub fn parse(value: &str) -> Option<Fence> {
        let mut parts = value.split(' ');
        let (lease, holder, transitions) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
        let sane = |s: &str| !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_graphic());
        (parts.next().is_none() && sane(lease) && sane(holder)).then(|| Fence {
            lease: lease.to_string(),
            holder: holder.to_string(),
            transitions,
        })
    }

    /// Whether `lease` (the stored one, `None` when absent) still names this
    /// holder in the same term.
    pub fn admits(&self, lease: Option<&LeaseSpec>) -> bool {
        lease.is_some_and(|l| {
            l.holder_identity.as_deref() == Some(self.holder.as_str()) && l.lease_transitions == self.transitions
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: Option<&str>, transitions: u32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: by.map(str::to_string),
            lease_duration_seconds: 2,
            lease_transitions: transitions,
            ..Default::default()
        }
    }

    #[test]
    fn a_fence_round_trips_through_its_header_and_rejects_junk() {
        let fence = Fence { lease: "nexus-controller".into(), holder: "host-42".into(), transitions: 3 };
        assert_eq!(Fence::parse(&fence.header_value()), Some(fence));
        for junk in ["", "a b", "a b c", "a b 1 d", "a  1", "a b -1", "a\tb 1"] {
            assert_eq!(Fence::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_fence_admits_only_its_own_term() {
        let fence = Fence { lease: "l".into(), holder: "a".into(), transitions: 2 };
        assert!(fence.admits(Some(&held(Some("a"), 2))));
        assert!(!fence.admits(Some(&held(Some("b"), 3))), "taken over");
        assert!(!fence.admits(Some(&held(Some("a"), 4))), "lost and won again: a new term");
        assert!(!fence.admits(Some(&held(None, 2))), "released");
        assert!(!fence.admits(None), "deleted");
    }
}
