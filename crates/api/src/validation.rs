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
    /// Records that `field` holds `value`, which is not what `expected`
    /// describes. A long value is shortened: an error never echoes a
    /// megabyte back.
    pub fn add(&mut self, field: &str, value: impl std::fmt::Display, expected: &str) {
        self.0.push(FieldError {
            field: truncate(field, MAX_ECHO),
            value: truncate(&value.to_string(), MAX_ECHO),
            expected: expected.to_string(),
        });
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

/// Longest part of a sent value an error repeats.
pub const MAX_ECHO: usize = 100;

/// `text`, cut to at most `max` characters (marked with `…` when cut).
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max).collect();
    out.push('…');
    out.push_str(&format!(" ({} bytes)", text.len()));
    out
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
    validate_labels(errors, "metadata.labels", &meta.labels);
    if meta.annotations.len() > MAX_ANNOTATIONS {
        errors.add(
            "metadata.annotations",
            format!("{} entries", meta.annotations.len()),
            &format!("at most {MAX_ANNOTATIONS} annotations"),
        );
    }
    let mut total = 0;
    for (key, value) in &meta.annotations {
        total += key.len() + value.len();
        if !label_key_ok(key, 253) {
            errors.add(
                &format!("metadata.annotations.{key}"),
                key,
                "annotation keys must be 1-253 of letters, digits, '-', '_', '.' or '/'",
            );
        }
    }
    if total > MAX_ANNOTATION_BYTES {
        errors.add(
            "metadata.annotations",
            format!("{total} bytes"),
            &format!("annotations must total at most {MAX_ANNOTATION_BYTES} bytes (keys and values)"),
        );
    }
    if meta.finalizers.len() > MAX_FINALIZERS {
        errors.add(
            "metadata.finalizers",
            format!("{} entries", meta.finalizers.len()),
            &format!("at most {MAX_FINALIZERS} finalizers"),
        );
    }
    for (i, f) in meta.finalizers.iter().enumerate() {
        if !label_key_ok(f, 253) {
            errors.add(
                &format!("metadata.finalizers[{i}]"),
                f,
                "finalizers are 1-253 of letters, digits, '-', '_', '.' or '/'",
            );
        }
    }
    if meta.owner_references.len() > MAX_FINALIZERS {
        errors.add(
            "metadata.ownerReferences",
            format!("{} entries", meta.owner_references.len()),
            &format!("at most {MAX_FINALIZERS} owners"),
        );
    }
}

/// Most labels an object carries.
pub const MAX_LABELS: usize = 64;
/// Most annotations an object carries, and their total size in bytes.
pub const MAX_ANNOTATIONS: usize = 64;
pub const MAX_ANNOTATION_BYTES: usize = 256 * 1024;
/// Most finalizers (and owner references) an object carries.
pub const MAX_FINALIZERS: usize = 32;

fn label_key_ok(key: &str, max: usize) -> bool {
    !key.is_empty() && key.len() <= max && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// Checks a label map at `field`: keys 1-63 of `[A-Za-z0-9-_./]`, values
/// at most 63 of `[A-Za-z0-9-_.]`, at most [`MAX_LABELS`] of them.
pub fn validate_labels(errors: &mut FieldErrors, field: &str, labels: &std::collections::BTreeMap<String, String>) {
    if labels.len() > MAX_LABELS {
        errors.add(field, format!("{} entries", labels.len()), &format!("at most {MAX_LABELS} labels"));
    }
    for (key, value) in labels {
        if !label_key_ok(key, 63) {
            errors.add(
                &format!("{field}.{key}"),
                key,
                "label keys must be 1-63 of letters, digits, '-', '_', '.' or '/'",
            );
        }
        let value_ok = value.len() <= 63 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !value_ok {
            errors.add(
                &format!("{field}.{key}"),
                value,
                "label values must be at most 63 of letters, digits, '-', '_' or '.'",
            );
        }
    }
}

/// Longest kernel command line accepted (x86's COMMAND_LINE_SIZE).
pub const MAX_BOOT_ARGS: usize = 2048;

/// Checks a kernel command line: at most [`MAX_BOOT_ARGS`] bytes of
/// printable characters.
/// `30s`, `5m`, `2h`, `1d`: a whole number and a unit, as a duration.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = digits.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

pub fn validate_boot_args(errors: &mut FieldErrors, field: &str, args: &str) {
    if args.len() > MAX_BOOT_ARGS {
        errors.add(field, args, &format!("must be at most {MAX_BOOT_ARGS} bytes (the kernel's command-line limit)"));
    } else if args.chars().any(char::is_control) {
        errors.add(field, args.escape_debug(), "must be printable characters on one line");
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
