//! The kinds nexusctl knows: the registry of `nexus_api`, by every name a
//! user may type, and the typed operations nexusctl runs on any of them.

use nexus_api::ResourceSpec;
use nexus_api::registry::{KindFn, with_kind};
use serde_json::Value;

pub use nexus_api::registry::{KindInfo, kinds, lookup};

/// Like `lookup`, with an error that lists the known kinds.
pub fn resolve(name: &str) -> Result<&'static KindInfo, String> {
    lookup(name).ok_or_else(|| unknown(name))
}

/// The error text for an unknown kind name.
pub fn unknown(name: &str) -> String {
    let known: Vec<&str> = kinds().iter().map(|k| k.plural).collect();
    format!("unknown kind {name:?}; known kinds: {}", known.join(", "))
}

/// Deserializes `value` as an object of `kind` and serializes it back, so
/// defaults and field order compare equal; errors name the bad field.
pub fn normalize(kind: &KindInfo, value: &Value) -> Result<Value, String> {
    struct Normalize<'a>(&'a Value);
    impl KindFn for Normalize<'_> {
        type Output = Result<Value, String>;
        fn call<S: ResourceSpec>(self) -> Self::Output {
            let typed: nexus_api::Object<S> = serde_path_to_error::deserialize(self.0.clone())
                .map_err(|e| format!("field {}: {}", e.path(), e.inner()))?;
            serde_json::to_value(typed).map_err(|e| e.to_string())
        }
    }
    with_kind(kind.kind, Normalize(value)).unwrap_or_else(|| Err(unknown(kind.kind)))
}

/// Checks YAML `text` against the type of `kind` with the parser's own
/// error (line and column); `Ok` for an unknown kind.
pub fn check_yaml(kind: &KindInfo, text: &str, options: serde_saphyr::Options) -> Result<(), String> {
    struct Check<'a>(&'a str, serde_saphyr::Options);
    impl KindFn for Check<'_> {
        type Output = Result<(), String>;
        fn call<S: ResourceSpec>(self) -> Self::Output {
            serde_saphyr::from_str_with_options::<nexus_api::Object<S>>(self.0, self.1)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
    with_kind(kind.kind, Check(text, options)).unwrap_or(Ok(()))
}

/// The path of the first field the kind's type rejects in `value`, such as
/// `spec.memory`.
pub fn rejected_field(kind: &KindInfo, value: &Value) -> Option<String> {
    struct Path<'a>(&'a Value);
    impl KindFn for Path<'_> {
        type Output = Option<String>;
        fn call<S: ResourceSpec>(self) -> Self::Output {
            match serde_path_to_error::deserialize::<_, nexus_api::Object<S>>(self.0.clone()) {
                Ok(_) => None,
                Err(e) => Some(e.path().to_string()).filter(|p| p != "."),
            }
        }
    }
    with_kind(kind.kind, Path(value)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_the_registry_is_typed_here() {
        for k in kinds() {
            let v = serde_json::json!({"apiVersion": "nexus/v1", "kind": k.kind, "metadata": {"name": "x"}, "spec": {"bogus": 1}});
            let err = normalize(k, &v).unwrap_err();
            assert!(err.contains("spec"), "{}: {err}", k.kind);
        }
        assert!(unknown("pods").contains("leases"), "{}", unknown("pods"));
    }
}
