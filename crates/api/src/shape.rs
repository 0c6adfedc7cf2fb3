//! The JSON shape a kind's schema asks for, checked before serde reads a
//! body: serde's derived structs also accept a JSON array of the fields in
//! order, which the API must not (an array where an object belongs is a
//! mistake, never a second spelling).

use serde_json::Value;

/// The first place in `value` where `schema` (a kind's JSON Schema, whose
/// `$ref`s point into its own `$defs`) wants an object or an array and the
/// value is something else, as (path, what was expected, what was found).
pub fn mismatch(value: &Value, schema: &Value) -> Option<(String, &'static str, &'static str)> {
    let found = walk(value, schema, schema, 0)?;
    // The walk names the steps on its way back out: innermost first.
    let mut path = String::new();
    for step in found.steps.iter().rev() {
        match step {
            Step::Key(k) if path.is_empty() => path.push_str(k),
            Step::Key(k) => {
                path.push('.');
                path.push_str(k);
            }
            Step::Index(i) => path.push_str(&format!("[{i}]")),
        }
    }
    if path.is_empty() {
        path.push_str("the body");
    }
    Some((path, found.want, found.got))
}

/// One step from a value into one of its parts.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// A mismatch, with the steps to it from the value walked (innermost first).
struct Found<'a> {
    steps: Vec<Step<'a>>,
    want: &'static str,
    got: &'static str,
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether `schema`'s `type` (one name or a list) names `t`.
fn allows(schema: &Value, t: &str) -> bool {
    match &schema["type"] {
        Value::String(s) => s == t,
        Value::Array(ts) => ts.iter().any(|x| x.as_str() == Some(t)),
        _ => false,
    }
}

/// Whether `schema` is `{"type": "null"}` (or a list of only that).
fn only_null(schema: &Value) -> bool {
    match &schema["type"] {
        Value::String(s) => s == "null",
        Value::Array(ts) => ts.len() == 1 && ts[0].as_str() == Some("null"),
        _ => false,
    }
}

fn resolve<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => &root["$defs"][name],
        None => schema,
    }
}

fn walk<'a>(value: &'a Value, schema: &Value, root: &Value, depth: usize) -> Option<Found<'a>> {
    if depth > 64 {
        return None;
    }
    let schema = resolve(schema, root);
    // Option<T>: anyOf [T, null]; enums: oneOf of constants.
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = schema[key].as_array() {
            if value.is_null() {
                return None;
            }
            let mut non_null = branches.iter().filter(|b| !only_null(b));
            return match (non_null.next(), non_null.next()) {
                (Some(only), None) => walk(value, only, root, depth + 1),
                _ => None,
            };
        }
    }
    if let Some(all) = schema["allOf"].as_array() {
        return all.iter().find_map(|b| walk(value, b, root, depth + 1));
    }
    let null_ok = allows(schema, "null") && value.is_null();
    for (t, want, fits) in [("object", "an object", value.is_object()), ("array", "an array", value.is_array())] {
        if allows(schema, t) && !fits && !null_ok {
            return Some(Found { steps: Vec::new(), want, got: kind_of(value) });
        }
    }
    match value {
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let sub = match schema["properties"].get(k) {
                Some(s) => s,
                None => match &schema["additionalProperties"] {
                    s @ Value::Object(_) => s,
                    _ => return None,
                },
            };
            let mut found = walk(v, sub, root, depth + 1)?;
            found.steps.push(Step::Key(k));
            Some(found)
        }),
        Value::Array(items) => {
            let item = &schema["items"];
            if item.is_null() {
                return None;
            }
            items.iter().enumerate().find_map(|(i, v)| {
                let mut found = walk(v, item, root, depth + 1)?;
                found.steps.push(Step::Index(i));
                Some(found)
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ResourceSpec;

    fn vm_schema() -> Value {
        crate::schema::of::<crate::VmSpec>()
    }

    #[test]
    fn arrays_for_objects_are_found_anywhere() {
        let s = vm_schema();
        let good = serde_json::json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "a", "labels": {"x": "y"}},
                                      "spec": {"vcpu": 1, "network": {"mac": "06:00:00:00:00:01"}}});
        assert_eq!(mismatch(&good, &s), None);
        let top = serde_json::json!(["nexus/v1", "VM", {"name": "a"}, {}]);
        assert_eq!(mismatch(&top, &s), Some(("the body".into(), "an object", "an array")));
        let spec =
            serde_json::json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "a"}, "spec": [1, 128]});
        assert_eq!(mismatch(&spec, &s), Some(("spec".into(), "an object", "an array")));
        let nested = serde_json::json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "a"}, "spec": {"network": ["m"]}});
        assert_eq!(mismatch(&nested, &s), Some(("spec.network".into(), "an object", "an array")));
        let labels = serde_json::json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "a", "labels": []}, "spec": {}});
        assert_eq!(mismatch(&labels, &s), Some(("metadata.labels".into(), "an object", "an array")));
        assert_eq!(crate::VmSpec::KIND, "VM");
    }

    #[test]
    fn the_path_names_keys_and_indexes_down_to_the_mismatch() {
        let s = serde_json::json!({"type": "object", "properties": {"xs": {"type": "array", "items": {"$ref": "#/$defs/X"}}},
                                   "$defs": {"X": {"type": "object", "properties": {"y": {"type": ["object", "null"]}}}}});
        let v = serde_json::json!({"xs": [{"y": null}, {"y": {}}, {"y": 3}]});
        assert_eq!(mismatch(&v, &s), Some(("xs[2].y".into(), "an object", "a number")));
        let v = serde_json::json!({"xs": [{}, "x"]});
        assert_eq!(mismatch(&v, &s), Some(("xs[1]".into(), "an object", "a string")));
    }
}
