//! JSON Schemas of every kind, generated from the types; `schemas/` holds
//! them and a test fails when they drift.

use crate::{Node, Vm};

/// `(file stem, schema)` for every kind.
pub fn all() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("vm", serde_json::to_value(schemars::schema_for!(Vm)).unwrap_or_default()),
        ("node", serde_json::to_value(schemars::schema_for!(Node)).unwrap_or_default()),
    ]
}
