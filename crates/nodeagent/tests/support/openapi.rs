//! Checks HTTP requests against Firecracker's Swagger 2.0 spec: the path
//! and method must exist, and the body must match the body parameter's
//! schema. Properties the schema does not list are errors, because
//! Firecracker rejects unknown fields.

use serde_json::Value;

/// The parsed spec.
pub struct Spec {
    root: Value,
}

impl Spec {
    /// Parses the YAML text of the spec.
    pub fn parse(yaml: &str) -> Self {
        let root: Value = serde_saphyr::from_str(yaml).expect("the Firecracker spec parses as YAML");
        assert_eq!(root["swagger"], "2.0", "expected a Swagger 2.0 document");
        Spec { root }
    }

    /// The spec's path template matching `path` (`/drives/rootfs` matches
    /// `/drives/{drive_id}`).
    pub fn template_for(&self, path: &str) -> Option<String> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        self.root["paths"]
            .as_object()?
            .keys()
            .find(|tpl| {
                let t: Vec<&str> = tpl.trim_start_matches('/').split('/').collect();
                t.len() == segments.len()
                    && t.iter()
                        .zip(&segments)
                        .all(|(a, b)| (a.starts_with('{') && a.ends_with('}') && !b.is_empty()) || a == b)
            })
            .cloned()
    }

    /// Every problem with one request; empty when it conforms.
    pub fn check(&self, method: &str, path: &str, body: &[u8]) -> Vec<String> {
        let Some(tpl) = self.template_for(path) else {
            return vec![format!("{method} {path}: no such path in the spec")];
        };
        let op = &self.root["paths"][&tpl][method.to_lowercase()];
        if op.is_null() {
            return vec![format!("{method} {path}: the spec has no {method} on {tpl}")];
        }
        let body_param = op["parameters"].as_array().and_then(|ps| ps.iter().find(|p| p["in"] == "body"));
        match body_param {
            None if body.is_empty() => vec![],
            None => vec![format!("{method} {path}: sends a body but {tpl} takes none")],
            Some(p) => {
                if body.is_empty() {
                    return if p["required"] == true {
                        vec![format!("{method} {path}: the body is required")]
                    } else {
                        vec![]
                    };
                }
                let value: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return vec![format!("{method} {path}: the body is not JSON: {e}")],
                };
                let mut errors = Vec::new();
                self.validate(&p["schema"], &value, "body", &mut errors);
                errors.into_iter().map(|e| format!("{method} {path}: {e}")).collect()
            }
        }
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/definitions/")) {
            Some(name) => &self.root["definitions"][name],
            None => schema,
        }
    }

    fn validate(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(allowed) = schema["enum"].as_array()
            && !allowed.contains(value)
        {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
        let type_ok = match schema["type"].as_str() {
            Some("object") => value.is_object(),
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some("array") => value.is_array(),
            _ => true,
        };
        if !type_ok {
            errors.push(format!("{at}: {value} is not of type {}", schema["type"]));
            return;
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = schema["minimum"].as_f64()
                && n < min
            {
                errors.push(format!("{at}: {n} is below the minimum {min}"));
            }
            if let Some(max) = schema["maximum"].as_f64()
                && n > max
            {
                errors.push(format!("{at}: {n} is above the maximum {max}"));
            }
        }
        if let Some(obj) = value.as_object() {
            let props = schema["properties"].as_object();
            for req in schema["required"].as_array().into_iter().flatten() {
                if let Some(name) = req.as_str()
                    && !obj.contains_key(name)
                {
                    errors.push(format!("{at}: required property {name} is missing"));
                }
            }
            for (k, v) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(sub) => self.validate(sub, v, &format!("{at}.{k}"), errors),
                    None if props.is_some() => errors.push(format!("{at}: property {k} is not in the spec")),
                    None => {}
                }
            }
        }
        if let Some(items) = value.as_array() {
            for (i, item) in items.iter().enumerate() {
                self.validate(&schema["items"], item, &format!("{at}[{i}]"), errors);
            }
        }
    }
}
