//! Label and field selectors (`a=b,c!=d,e,!f`), evaluated against JSON objects.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A parsed selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector(Vec<Term>);

impl Selector {
    /// Parses a label selector.
    pub fn labels(text: &str) -> Result<Self, ApiError> {
        parse(text, "labelSelector")
    }

    /// Parses a field selector; only the dotted paths in `allowed` are
    /// accepted, and only with `=`, `==` or `!=`.
    pub fn fields(text: &str, allowed: &[&str]) -> Result<Self, ApiError> {
        let sel = parse(text, "fieldSelector")?;
        for term in &sel.0 {
            let key = match term {
                Term::Equals(k, _) | Term::NotEquals(k, _) => k,
                Term::Exists(k) | Term::NotExists(k) => {
                    return Err(ApiError::BadRequest(format!(
                        "fieldSelector {k:?} needs a value: write {k}=VALUE or {k}!=VALUE"
                    )));
                }
            };
            if !allowed.contains(&key.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "fieldSelector field {key:?} is not supported for this kind; use one of {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(sel)
    }

    /// Whether `labels` satisfy every term.
    pub fn matches_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
        })
    }

    /// Whether the object's fields satisfy every term (a missing field is "").
    pub fn matches_fields(&self, obj: &Value) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => field(obj, k) == *v,
            Term::NotEquals(k, v) => field(obj, k) != *v,
            Term::Exists(_) | Term::NotExists(_) => true,
        })
    }

    /// Whether a JSON object's `metadata.labels` satisfy every term.
    pub fn matches_object_labels(&self, obj: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let labels: BTreeMap<String, String> = obj["metadata"]["labels"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
            .unwrap_or_default();
        self.matches_labels(&labels)
    }
}

/// The value at dotted `key` of `obj` as text ("" when absent).
fn field(obj: &Value, key: &str) -> String {
    let mut v = obj;
    for part in key.split('.') {
        v = &v[part];
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn parse(text: &str, param: &str) -> Result<Selector, ApiError> {
    let mut terms = Vec::new();
    for raw in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let term = if let Some((k, v)) = raw.split_once("!=") {
            Term::NotEquals(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
            Term::Equals(k.trim().to_string(), v.trim().to_string())
        } else if let Some(k) = raw.strip_prefix('!') {
            Term::NotExists(k.trim().to_string())
        } else {
            Term::Exists(raw.to_string())
        };
        let key = match &term {
            Term::Equals(k, _) | Term::NotEquals(k, _) | Term::Exists(k) | Term::NotExists(k) => k,
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(ApiError::BadRequest(format!(
                "{param} term {raw:?} is malformed; write key=value, key!=value, key or !key, separated by commas"
            )));
        }
        terms.push(term);
    }
    Ok(Selector(terms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selector_supports_equality_inequality_and_existence() {
        let labels: BTreeMap<String, String> =
            [("app".to_string(), "ci".to_string()), ("tier".to_string(), "x".to_string())].into();
        assert!(Selector::labels("app=ci,tier").unwrap().matches_labels(&labels));
        assert!(Selector::labels("app==ci,!gone").unwrap().matches_labels(&labels));
        assert!(!Selector::labels("app!=ci").unwrap().matches_labels(&labels));
        assert!(Selector::labels("").unwrap().matches_labels(&labels));
    }

    #[test]
    fn field_selector_rejects_unknown_fields_with_the_supported_list() {
        let allowed = ["metadata.name", "spec.nodeName", "status.phase"];
        let err = Selector::fields("spec.vcpu=2", &allowed).unwrap_err().to_string();
        assert!(err.contains("spec.nodeName"), "{err}");
        let sel = Selector::fields("status.phase=Running", &allowed).unwrap();
        assert!(sel.matches_fields(&serde_json::json!({"status": {"phase": "Running"}})));
        assert!(!sel.matches_fields(&serde_json::json!({})));
    }
}
