//! JSON Schemas of every kind, generated from the types; `schemas/` holds
//! them and a test fails when they drift.

use crate::meta::{Object, ResourceSpec};
use crate::registry::{KindVisitor, visit_kinds};

/// The JSON Schema of the objects of kind `S`.
pub fn of<S: ResourceSpec>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Object<S>)).unwrap_or_default()
}

/// `(file stem, schema)` for every kind; the stem is the lower-case kind.
pub fn all() -> Vec<(String, serde_json::Value)> {
    struct Collect(Vec<(String, serde_json::Value)>);
    impl KindVisitor for Collect {
        fn visit<S: ResourceSpec>(&mut self) {
            self.0.push((S::KIND.to_lowercase(), of::<S>()));
        }
    }
    let mut all = Collect(Vec::new());
    visit_kinds(&mut all);
    all.0
}
