//! Quota admission: a create or spec update of a kind that quotas count is
//! refused when it would take its project past a ResourceQuota. It runs
//! inside the write's transaction (the store reads what [`reads`] names
//! there), so two writes racing for the last slot cannot both get it, on
//! SQLite or on PostgreSQL. Which kinds count, and which are read to size
//! them, is each kind's policy in the registry.

use nexus_api::policy::QuotaUse;
use nexus_api::quota::{Holdings, admit as within, usage};
use nexus_api::{
    Image, ImageSpec, ResourceQuota, ResourceQuotaSpec, ResourceSpec, Snapshot, SnapshotSpec, Template, TemplateSpec,
    Vm, VmSpec, Volume, VolumeSpec,
};
use serde_json::Value;

use crate::error::ApiError;
use crate::store::{Reads, Seen};

/// What a write of `kind` in `project` must read for quota admission:
/// the project's quotas and, when it has any, every kind quotas use.
pub fn reads(kind: &str, project: &str) -> Reads {
    let counted = nexus_api::registry::lookup_kind(kind).is_some_and(|k| k.policy.quota == QuotaUse::Counted);
    if !counted {
        return Reads::Nothing;
    }
    Reads::InProject {
        project: project.to_string(),
        gate: ResourceQuotaSpec::KIND,
        then: nexus_api::registry::quota_kinds().map(|k| k.kind).collect(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(values: &[Value]) -> Result<Vec<T>, ApiError> {
    values.iter().map(|v| serde_json::from_value(v.clone()).map_err(ApiError::from)).collect()
}

/// The project's objects as `seen` holds them, typed for [`usage`].
struct Objects {
    vms: Vec<Vm>,
    templates: Vec<Template>,
    snapshots: Vec<Snapshot>,
    volumes: Vec<Volume>,
    images: Vec<Image>,
}

impl Objects {
    fn read(seen: &Seen) -> Result<Objects, ApiError> {
        Ok(Objects {
            vms: parse(seen.of(VmSpec::KIND))?,
            templates: parse(seen.of(TemplateSpec::KIND))?,
            snapshots: parse(seen.of(SnapshotSpec::KIND))?,
            volumes: parse(seen.of(VolumeSpec::KIND))?,
            images: parse(seen.of(ImageSpec::KIND))?,
        })
    }

    fn usage(&self) -> nexus_api::quota::Usage {
        fn refs<T>(v: &[T]) -> Vec<&T> {
            v.iter().collect()
        }
        let (vms, templates, snapshots) = (refs(&self.vms), refs(&self.templates), refs(&self.snapshots));
        let (volumes, images) = (refs(&self.volumes), refs(&self.images));
        usage(&Holdings { vms: &vms, templates: &templates, snapshots: &snapshots, volumes: &volumes, images: &images })
    }
}

/// Checks that storing `new` (an object of `kind` named `name`) keeps the
/// project within every quota `seen` holds.
pub fn admit(kind: &str, name: &str, new: &Value, seen: &Seen) -> Result<(), ApiError> {
    admit_all(&[(kind, name.to_string(), new.clone())], seen)
}

/// [`admit`] for several objects stored at once, each `(kind, name, object)`.
pub fn admit_all<K: AsRef<str>>(new: &[(K, String, Value)], seen: &Seen) -> Result<(), ApiError> {
    let quotas: Vec<ResourceQuota> = parse(seen.of(ResourceQuotaSpec::KIND))?;
    if quotas.is_empty() {
        return Ok(());
    }
    let before = Objects::read(seen)?.usage();
    // The same objects, with each new one in place of the stored one of its name.
    let mut after = seen.clone();
    for (kind, name, value) in new {
        let of_kind = after.objects.entry(registry_kind(kind.as_ref())).or_default();
        of_kind.retain(|o| o["metadata"]["name"].as_str() != Some(name.as_str()));
        of_kind.push(value.clone());
    }
    let after = Objects::read(&after)?.usage();
    for q in &quotas {
        within(q.name(), &q.spec, &before, &after).map_err(|message| ApiError::QuotaExceeded { message })?;
    }
    Ok(())
}

/// The registry's own spelling of `kind` (a `'static` key for [`Seen`]).
fn registry_kind(kind: &str) -> &'static str {
    nexus_api::registry::lookup_kind(kind).map(|k| k.kind).unwrap_or("")
}
