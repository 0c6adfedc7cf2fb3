//! Quota admission: a create or spec update of a VM or Snapshot is refused
//! when it would take its project past a ResourceQuota. It runs inside the
//! write's transaction (see `Store::mutate_seeing`), so two writes racing
//! for the last slot cannot both get it, on SQLite or on PostgreSQL.

use nexus_api::quota::{admit as within, usage};
use nexus_api::{ResourceQuota, Snapshot, SnapshotSpec, Template, Vm, VmSpec};
use serde_json::Value;

use crate::error::ApiError;
use crate::store::{Reads, Seen};

/// Whether writes of `kind` in `project` count against quotas.
pub fn reads_for(kind: &str, project: &str) -> Reads {
    if kind == <VmSpec as nexus_api::ResourceSpec>::KIND || kind == <SnapshotSpec as nexus_api::ResourceSpec>::KIND {
        Reads::QuotaOf(project.to_string())
    } else {
        Reads::Nothing
    }
}

fn parse<T: serde::de::DeserializeOwned>(values: &[Value]) -> Result<Vec<T>, ApiError> {
    values.iter().map(|v| serde_json::from_value(v.clone()).map_err(ApiError::from)).collect()
}

/// Checks that storing `new` (an object of `kind` named `name`) keeps the
/// project within every quota `seen` holds.
pub fn admit(kind: &str, name: &str, new: &Value, seen: &Seen) -> Result<(), ApiError> {
    if seen.quotas.is_empty() {
        return Ok(());
    }
    let quotas: Vec<ResourceQuota> = parse(&seen.quotas)?;
    let vms: Vec<Vm> = parse(&seen.vms)?;
    let templates: Vec<Template> = parse(&seen.templates)?;
    let snapshots: Vec<Snapshot> = parse(&seen.snapshots)?;
    let t: Vec<&Template> = templates.iter().collect();
    let before = usage(&vms.iter().collect::<Vec<_>>(), &t, &snapshots.iter().collect::<Vec<_>>());
    let after = match kind {
        "VM" => {
            let new_vm: Vm = serde_json::from_value(new.clone())?;
            let mut v: Vec<&Vm> = vms.iter().filter(|v| v.name() != name).collect();
            v.push(&new_vm);
            usage(&v, &t, &snapshots.iter().collect::<Vec<_>>())
        }
        "Snapshot" => {
            let new_snap: Snapshot = serde_json::from_value(new.clone())?;
            let mut s: Vec<&Snapshot> = snapshots.iter().filter(|s| s.name() != name).collect();
            s.push(&new_snap);
            usage(&vms.iter().collect::<Vec<_>>(), &t, &s)
        }
        _ => return Ok(()),
    };
    for q in &quotas {
        within(q.name(), &q.spec, &before, &after).map_err(|message| ApiError::QuotaExceeded { message })?;
    }
    Ok(())
}
