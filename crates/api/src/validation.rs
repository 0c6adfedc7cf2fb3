//! Field-level validation shared by every kind.

use serde::{Deserialize, Serialize};

use crate::meta::{Object, ObjectMeta, ResourceSpec};

/// One rejected field: where, what was sent, and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Path from the object root, such as `spec.vcpu`.
    pub field: String,
    /// The rejected value as sent.
    pub value: String,
    /// What would be accepted.
    pub expected: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: invalid value {:?}: {}", self.field, self.value, self.expected)
    }
}

/// Every field error found in one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    /// Records that `field` holds `value`, which is not what `expected` describes.
    pub fn add(&mut self, field: &str, value: impl std::fmt::Display, expected: &str) {
        self.0.push(FieldError { field: field.to_string(), value: value.to_string(), expected: expected.to_string() });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

/// Checks that `value` is a DNS label: 1-63 of `[a-z0-9-]`, starting and
/// ending with a letter or digit.
pub fn validate_dns_label(errors: &mut FieldErrors, field: &str, value: &str) {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if !ok {
        errors.add(
            field,
            value,
            "must be 1-63 lower-case letters, digits or '-', starting and ending with a letter or digit (for example \"web-1\")",
        );
    }
}

/// Checks an absolute host path without `..` components or NUL bytes.
pub fn validate_host_path(errors: &mut FieldErrors, field: &str, path: &str) {
    if !path.starts_with('/') || path.contains('\0') || path.split('/').any(|c| c == "..") || path.len() > 4096 {
        errors.add(
            field,
            path,
            "must be an absolute host path without '..' components, such as /var/lib/nexus/images/vmlinux",
        );
    }
}

/// Checks a MAC written as six colon-separated hex pairs, unicast.
pub fn validate_mac(errors: &mut FieldErrors, field: &str, value: &str) {
    let parts: Vec<&str> = value.split(':').collect();
    let hex_ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    let unicast = hex_ok && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0);
    if !unicast {
        errors.add(
            field,
            value,
            "must be a unicast MAC as six hex pairs, such as 06:00:ac:10:00:02 (or omit it to derive one)",
        );
    }
}

/// Checks the user-settable metadata of an object of kind `S`.
pub fn validate_meta<S: ResourceSpec>(meta: &ObjectMeta, errors: &mut FieldErrors) {
    validate_dns_label(errors, "metadata.name", &meta.name);
    match (&meta.project, S::NAMESPACED) {
        (Some(project), true) => validate_dns_label(errors, "metadata.project", project),
        (Some(project), false) => {
            errors.add("metadata.project", project, &format!("must be absent: {} is cluster-scoped", S::KIND))
        }
        (None, _) => {}
    }
    for key in meta.labels.keys() {
        let ok = !key.is_empty()
            && key.len() <= 63
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !ok {
            errors.add(
                &format!("metadata.labels.{key}"),
                key,
                "label keys must be 1-63 of letters, digits, '-', '_', '.' or '/'",
            );
        }
    }
}

/// Validates the envelope of an object sent for kind `S` (apiVersion, kind,
/// metadata). Spec checks are the kind's own.
pub fn validate_envelope<S: ResourceSpec>(obj: &Object<S>, errors: &mut FieldErrors) {
    if obj.api_version != crate::API_VERSION {
        errors.add("apiVersion", &obj.api_version, "must be nexus/v1");
    }
    if obj.kind != S::KIND {
        errors.add("kind", &obj.kind, &format!("must be {} at this endpoint", S::KIND));
    }
    validate_meta::<S>(&obj.metadata, errors);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_accept_lowercase_and_reject_the_rest() {
        for good in ["a", "web-1", "0abc"] {
            let mut e = FieldErrors::default();
            validate_dns_label(&mut e, "n", good);
            assert!(e.is_empty(), "{good}");
        }
        for bad in ["", "Web", "-a", "a-", "a_b", "../x", &"a".repeat(64)] {
            let mut e = FieldErrors::default();
            validate_dns_label(&mut e, "n", bad);
            assert_eq!(e.0.len(), 1, "{bad}");
        }
    }

    #[test]
    fn multicast_macs_are_rejected() {
        let mut e = FieldErrors::default();
        validate_mac(&mut e, "m", "01:00:5e:00:00:01");
        assert_eq!(e.0.len(), 1);
    }
}
