//! The JSON shape a kind's schema asks for, checked before serde reads a
//! body: serde's derived structs also accept a JSON array of the fields in
//! order, which the API must not (an array where an object belongs is a
//! mistake, never a second spelling).

use serde_json::Value;

/// The first place in `value` where `schema` (a kind's JSON Schema, whose
/// `$ref`s point into its own `$defs`) wants an object or an array and the
/// value is something else, as (path, what was expected, what was found).
pub fn mismatch(value: &Value, schema: &Value) -> Option<(String, &'static str, &'static str)> {
    walk(value, schema, schema, String::new(), 0)
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

fn types(schema: &Value) -> Vec<&str> {
    match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn resolve<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => &root["$defs"][name],
        None => schema,
    }
}

fn walk(
    value: &Value,
    schema: &Value,
    root: &Value,
    path: String,
    depth: usize,
) -> Option<(String, &'static str, &'static str)> {
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
            let non_null: Vec<&Value> = branches.iter().filter(|b| types(b) != ["null"]).collect();
            return match non_null.as_slice() {
                [only] => walk(value, only, root, path, depth + 1),
                _ => None,
            };
        }
    }
    if let Some(all) = schema["allOf"].as_array() {
        return all.iter().find_map(|b| walk(value, b, root, path.clone(), depth + 1));
    }
    let here = if path.is_empty() { "the body".to_string() } else { path.clone() };
    let ts = types(schema);
    if ts.contains(&"object") && !value.is_object() && !(ts.contains(&"null") && value.is_null()) {
        return Some((here, "an object", kind_of(value)));
    }
    if ts.contains(&"array") && !value.is_array() && !(ts.contains(&"null") && value.is_null()) {
        return Some((here, "an array", kind_of(value)));
    }
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let sub = match schema["properties"].get(k) {
                    Some(s) => s,
                    None => match &schema["additionalProperties"] {
                        s @ Value::Object(_) => s,
                        _ => continue,
                    },
                };
                if let Some(m) = walk(v, sub, root, join(k), depth + 1) {
                    return Some(m);
                }
            }
            None
        }
        Value::Array(items) => {
            let item = &schema["items"];
            if item.is_null() {
                return None;
            }
            items.iter().enumerate().find_map(|(i, v)| walk(v, item, root, format!("{path}[{i}]"), depth + 1))
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
}
