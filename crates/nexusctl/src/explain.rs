//! `explain KIND[.field]`: documentation from the kinds' JSON Schemas.

use serde_json::Value;

use crate::kinds::KindInfo;

/// Describes `kind` or one of its fields (`spec.network.mac`).
pub fn explain(kind: &KindInfo, path: &[&str]) -> Result<String, String> {
    let stem = kind.kind.to_lowercase();
    let (_, root) = nexus_api::schema::all()
        .into_iter()
        .find(|(s, _)| *s == stem)
        .ok_or_else(|| format!("no schema for {}", kind.kind))?;
    let defs = root["$defs"].clone();
    let resolve = |s: &Value| -> Value {
        let mut s = s.clone();
        // Follow `$ref`, also when wrapped in allOf/anyOf (Option<T>).
        for _ in 0..8 {
            if let Some(r) = s["$ref"].as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
                let desc = s.get("description").cloned();
                s = defs[r].clone();
                if let (Some(d), Some(o)) = (desc, s.as_object_mut()) {
                    o.insert("description".into(), d);
                }
                continue;
            }
            if let Some(inner) = s["anyOf"].as_array().and_then(|a| a.iter().find(|x| x["type"] != "null")).cloned() {
                s = inner;
                continue;
            }
            break;
        }
        s
    };
    let mut schema = resolve(&root);
    let mut walked = vec![kind.kind.to_string()];
    for field in path {
        let next = schema["properties"].get(*field).ok_or_else(|| {
            let known: Vec<&String> = schema["properties"].as_object().map(|o| o.keys().collect()).unwrap_or_default();
            format!(
                "field {field:?} does not exist in {}; fields: {}",
                walked.join("."),
                known.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            )
        })?;
        schema = resolve(next);
        walked.push(field.to_string());
    }
    let mut out = String::new();
    out.push_str(&format!("KIND:     {}\nVERSION:  {}\n", kind.kind, nexus_api::API_VERSION));
    if !path.is_empty() {
        out.push_str(&format!("FIELD:    {} <{}>\n", path.join("."), type_name(&schema)));
    }
    out.push_str(&format!(
        "\nDESCRIPTION:\n    {}\n",
        schema["description"].as_str().unwrap_or("<none>").replace('\n', "\n    ")
    ));
    if let Some(props) = schema["properties"].as_object() {
        let required: Vec<&str> =
            schema["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        out.push_str("\nFIELDS:\n");
        for (name, prop) in props {
            let p = resolve(prop);
            let req = if required.contains(&name.as_str()) { " -required-" } else { "" };
            out.push_str(&format!("  {name}\t<{}>{req}\n", type_name(&p)));
            if let Some(d) = p["description"].as_str().or(prop["description"].as_str()) {
                out.push_str(&format!("    {}\n", d.lines().next().unwrap_or("")));
            }
        }
    }
    if let Some(values) = schema["enum"].as_array().or_else(|| schema["oneOf"].as_array()) {
        let names: Vec<String> = values
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .or_else(|| v["const"].as_str().map(str::to_string))
                    .unwrap_or_else(|| v.to_string())
            })
            .collect();
        out.push_str(&format!("\nVALUES:   {}\n", names.join(", ")));
    }
    Ok(out)
}

fn type_name(s: &Value) -> String {
    match &s["type"] {
        Value::String(t) if t == "array" => format!("[]{}", type_name(&s["items"])),
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect::<Vec<_>>().join("|"),
        _ if s.get("enum").is_some() || s.get("oneOf").is_some() => "string".into(),
        _ => "object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_walks_into_nested_fields_and_names_the_known_ones_on_a_typo() {
        let vm = crate::kinds::lookup("vm").unwrap();
        let top = explain(vm, &[]).unwrap();
        assert!(top.contains("spec"), "{top}");
        let vcpu = explain(vm, &["spec", "vcpu"]).unwrap();
        assert!(vcpu.contains("FIELD:    spec.vcpu <integer>"), "{vcpu}");
        assert!(vcpu.contains("even number"), "{vcpu}");
        let state = explain(vm, &["spec", "state"]).unwrap();
        assert!(state.contains("Running") && state.contains("Paused"), "{state}");
        let err = explain(vm, &["spec", "cpus"]).unwrap_err();
        assert!(err.contains("vcpu"), "{err}");
    }
}
