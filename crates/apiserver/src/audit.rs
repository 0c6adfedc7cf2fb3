//! The audit log: one record for every mutating request, allowed or
//! denied. A change commits its record in its own transaction (see
//! `Store::mutate`); everything else — refusals, failures, answers without
//! a change — is recorded by [`layer`] after the handler ran.

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use chrono::Utc;
use nexus_api::auth::{AuditRecord, AuditResult};
use serde_json::Value;

use crate::auth::{Caller, target};
use crate::error::AuditMessage;
use crate::request_id::RequestIds;
use crate::state::SharedState;

/// Most field changes one record lists.
const MAX_CHANGES: usize = 12;
/// Longest value shown in a change.
const MAX_VALUE: usize = 60;

/// Marks a response whose change was recorded with its transaction.
#[derive(Debug, Clone, Copy)]
pub struct Recorded;

fn short(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() > MAX_VALUE {
        format!("{}…", text.chars().take(MAX_VALUE).collect::<String>())
    } else {
        text
    }
}

/// Adds to `out` each field that differs between `before` and `after`
/// under `path` (`Null` standing for absent), skipping equal subtrees
/// without a look inside and building a field's path only once it moved.
fn walk(path: &mut String, before: &Value, after: &Value, out: &mut Vec<String>) {
    if out.len() > MAX_CHANGES || before == after {
        return;
    }
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                if path == "metadata" && BOOKKEEPING.contains(&k.as_str()) {
                    continue;
                }
                let (bv, av) = (b.get(k).unwrap_or(&Value::Null), a.get(k).unwrap_or(&Value::Null));
                let at = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                if REDACTED.contains(&k.as_str()) {
                    walk(path, &redacted(bv), &redacted(av), out);
                } else {
                    walk(path, bv, av, out);
                }
                path.truncate(at);
            }
        }
        (Value::Array(b), Value::Array(a)) if b.len() == a.len() => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                let at = path.len();
                path.push_str(&format!("[{i}]"));
                walk(path, bv, av, out);
                path.truncate(at);
            }
        }
        (Value::Null, a) => out.push(format!("{path}: set to {}", short(&redact_all(a)))),
        (b, Value::Null) => out.push(format!("{path}: removed (was {})", short(&redact_all(b)))),
        (b, a) => out.push(format!("{path}: {} -> {}", short(&redact_all(b)), short(&redact_all(a)))),
    }
}

/// Bookkeeping of the system under `metadata`, left out of the changes.
const BOOKKEEPING: &[&str] = &["resourceVersion", "generation", "uid", "creationTimestamp"];

/// Fields whose values the audit log never holds (a guest's user data may
/// carry what only the VM's readers should see): a change shows only their
/// size.
const REDACTED: &[&str] = &["userData", "user-data"];

/// A redacted field's value as the audit log shows it: its size.
fn redacted(v: &Value) -> Value {
    match v {
        Value::Null => Value::Null,
        Value::String(s) => Value::String(format!("<{} bytes>", s.len())),
        other => Value::String(format!("<{} bytes>", other.to_string().len())),
    }
}

/// `v` with every redacted field inside it replaced by its size (a value
/// about to be shown whole); `v` itself when it holds none.
fn redact_all(v: &Value) -> Cow<'_, Value> {
    fn holds_redacted(v: &Value) -> bool {
        match v {
            Value::Object(m) => m.iter().any(|(k, c)| REDACTED.contains(&k.as_str()) || holds_redacted(c)),
            Value::Array(items) => items.iter().any(holds_redacted),
            _ => false,
        }
    }
    fn redact(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, child) in m.iter_mut() {
                    if REDACTED.contains(&k.as_str()) {
                        *child = redacted(child);
                    } else {
                        redact(child);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(redact),
            _ => {}
        }
    }
    if !holds_redacted(v) {
        return Cow::Borrowed(v);
    }
    let mut v = v.clone();
    redact(&mut v);
    Cow::Owned(v)
}

/// What a change did, field by field, leaving out bookkeeping
/// (`resourceVersion`, `generation`, timestamps of the system) and the
/// values of redacted fields (user data: only their sizes).
pub fn changes(before: Option<&Value>, after: Option<&Value>) -> Vec<String> {
    match (before, after) {
        (None, Some(_)) => vec!["created".into()],
        (Some(_), None) => vec!["deleted".into()],
        (before, after) => {
            let mut out = Vec::new();
            let null = Value::Null;
            walk(&mut String::new(), before.unwrap_or(&null), after.unwrap_or(&null), &mut out);
            if out.len() > MAX_CHANGES {
                out.truncate(MAX_CHANGES);
                out.push("…".into());
            }
            out
        }
    }
}

/// Records of refused anonymous requests are rate-limited: a flood of them
/// must not fill the disk.
#[derive(Debug)]
pub struct AnonymousBudget {
    state: Mutex<(f64, Instant, u64)>,
    per_second: f64,
    burst: f64,
}

impl AnonymousBudget {
    pub fn new(per_second: f64, burst: f64) -> Self {
        AnonymousBudget { state: Mutex::new((burst, Instant::now(), 0)), per_second, burst }
    }

    /// Whether one more record may be written now; when not, counts it.
    /// Returns the records suppressed since the last one written.
    fn take(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_second).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}

impl Default for AnonymousBudget {
    fn default() -> Self {
        AnonymousBudget::new(5.0, 50.0)
    }
}

fn mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Middleware: after a mutating request, writes its record unless its
/// change already did.
pub async fn layer(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    if !mutating(req.method()) || !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let ids = req.extensions().get::<RequestIds>().cloned().unwrap_or_default();
    let resp = next.run(req).await;
    if resp.extensions().get::<Recorded>().is_some() {
        return resp;
    }
    let caller = resp.extensions().get::<Caller>().cloned();
    let status = resp.status().as_u16();
    let result = match status {
        401 | 403 => AuditResult::Denied,
        s if s < 300 => AuditResult::Allowed,
        _ => AuditResult::Failed,
    };
    let mut message = resp.extensions().get::<AuditMessage>().map(|m| m.0.clone()).unwrap_or_default();
    if caller.is_none() {
        match state.anonymous_budget.take() {
            None => return resp,
            Some(0) => {}
            Some(n) => message.push_str(&format!(" ({n} more anonymous refusals were not recorded)")),
        }
    }
    let t = target(&method, &path);
    let record = AuditRecord {
        id: 0,
        at: Utc::now(),
        request_id: ids.id,
        correlation_id: ids.correlation,
        actor: caller.as_ref().map(|c| c.subject.to_string()).unwrap_or_else(|| "anonymous".into()),
        token_id: caller.and_then(|c| c.token_id),
        verb: t.as_ref().map(|t| t.verb.as_str().to_string()).unwrap_or_else(|| method.to_string().to_lowercase()),
        kind: t.as_ref().map(|t| t.kind.clone()).unwrap_or_default(),
        project: t.as_ref().map(|t| t.project.clone()).unwrap_or_default(),
        name: t.as_ref().map(|t| t.name.clone()).unwrap_or_default(),
        resource_version: 0,
        result,
        status_code: status,
        changes: Vec::new(),
        message: message.trim().to_string(),
    };
    if let Err(e) = state.store.insert_audit(&record).await {
        tracing::error!(error = %e, request_id = %record.request_id, "writing an audit record failed");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_is_on_record_by_size_only() {
        let before = serde_json::json!({"spec": {"userData": "#!/bin/sh\necho secret-a\n", "vcpu": 1}});
        let after = serde_json::json!({"spec": {"userData": "#!/bin/sh\necho secret-bb\n", "vcpu": 1}});
        let out = changes(Some(&before), Some(&after));
        assert_eq!(out, ["spec.userData: <24 bytes> -> <25 bytes>"]);
        assert!(!out.concat().contains("secret"));
    }

    #[test]
    fn user_data_inside_a_value_shown_whole_is_on_record_by_size_only() {
        let before = serde_json::json!({"spec": {"vcpu": 1}});
        let after = serde_json::json!({"spec": {"vcpu": 1, "guest": {"userData": "secret", "hostname": "h"}}});
        let out = changes(Some(&before), Some(&after));
        assert_eq!(out, ["spec.guest: set to {\"hostname\":\"h\",\"userData\":\"<6 bytes>\"}"]);
        let out = changes(Some(&after), Some(&before));
        assert_eq!(out, ["spec.guest: removed (was {\"hostname\":\"h\",\"userData\":\"<6 bytes>\"})"]);
    }

    #[test]
    fn only_bookkeeping_moved_is_no_change_and_bookkeeping_names_elsewhere_are_fields() {
        let before = serde_json::json!({"metadata": {"name": "a", "resourceVersion": "5", "generation": 1},
                                         "status": {"observedGeneration": 1, "generation": 1}});
        let mut after = before.clone();
        after["metadata"]["resourceVersion"] = "6".into();
        after["metadata"]["generation"] = 2.into();
        assert!(changes(Some(&before), Some(&after)).is_empty());
        after["status"]["generation"] = 2.into();
        assert_eq!(changes(Some(&before), Some(&after)), ["status.generation: 1 -> 2"]);
    }

    #[test]
    fn changes_name_the_fields_that_moved_and_skip_bookkeeping() {
        let before = serde_json::json!({"metadata": {"name": "a", "resourceVersion": "5", "labels": {"x": "1"}},
                                         "spec": {"state": "Running", "vcpu": 1}});
        let after = serde_json::json!({"metadata": {"name": "a", "resourceVersion": "6"},
                                        "spec": {"state": "Stopped", "vcpu": 1, "memMib": 256}});
        assert_eq!(
            changes(Some(&before), Some(&after)),
            [
                "metadata.labels: removed (was {\"x\":\"1\"})",
                "spec.memMib: set to 256",
                "spec.state: Running -> Stopped"
            ]
        );
        assert_eq!(changes(None, Some(&after)), ["created"]);
        let c = |s: &str| serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": s}]}});
        assert_eq!(changes(Some(&c("False")), Some(&c("True"))), ["status.conditions[0].status: False -> True"]);
        assert_eq!(changes(Some(&before), None), ["deleted"]);
    }

    #[test]
    fn the_anonymous_budget_lets_a_burst_through_then_counts_what_it_drops() {
        let b = AnonymousBudget::new(0.0, 2.0);
        assert_eq!(b.take(), Some(0));
        assert_eq!(b.take(), Some(0));
        assert_eq!(b.take(), None);
        assert_eq!(b.take(), None);
    }
}
