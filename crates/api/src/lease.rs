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
