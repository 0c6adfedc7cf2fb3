//! JSON Schemas of every kind, generated from the types; `schemas/` holds
//! them and a test fails when they drift.

use crate::{Event, Image, Lease, Node, Snapshot, Template, Vm};

fn schema<T: schemars::JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default()
}

/// `(file stem, schema)` for every kind.
pub fn all() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("vm", schema::<Vm>()),
        ("template", schema::<Template>()),
        ("image", schema::<Image>()),
        ("snapshot", schema::<Snapshot>()),
        ("node", schema::<Node>()),
        ("event", schema::<Event>()),
        ("lease", schema::<Lease>()),
    ]
}
