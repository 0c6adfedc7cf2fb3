//! Rendering objects for people: tables, `describe` pages and errors. Pure
//! functions of their inputs (the time included), so they can be pinned by
//! snapshot tests.

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets};
use nexus_api::ErrorBody;
use nexus_client::ClientError;
use serde_json::Value;

use nexus_api::registry::{Column, Format};

use crate::kinds::KindInfo;

/// An API error as the user sees it: the server's message, then Firecracker's
/// words and the suggestion on their own lines. Never a debug dump.
pub fn error_body(body: &ErrorBody) -> String {
    let mut s = format!("{} ({}): {}", body.error, body.status, body.message);
    if let Some(f) = &body.fault_message {
        s.push_str(&format!("\n  firecracker: {f}"));
    }
    if let Some(h) = &body.suggestion {
        s.push_str(&format!("\n  hint: {h}"));
    }
    s
}

/// Any client failure as the user sees it.
pub fn client_error(e: &ClientError) -> String {
    match e {
        ClientError::Api(body) => error_body(body),
        ClientError::Transport { url, source } => format!(
            "cannot reach the apiserver at {url} ({}); is it running? Set --server, NEXUS_SERVER or a context",
            root_cause(source)
        ),
        ClientError::Tls { url, message } => {
            format!("TLS with the apiserver at {url} failed: {message}\n  hint: {}", tls_hint(message))
        }
        other => other.to_string(),
    }
}

/// What to do about a failed handshake.
fn tls_hint(message: &str) -> &'static str {
    if message.contains("UnknownIssuer") || message.contains("BadSignature") {
        "the server's certificate is not signed by the CA you trust; set --certificate-authority (or the context's certificateAuthority) to the cluster's ca.crt"
    } else if message.contains("NotValidForName") {
        "the server's certificate does not name this address; connect by a name it carries, or issue it again with that --san"
    } else if message.contains("Expired") || message.contains("NotValidYet") {
        "the server's certificate is outside its validity; issue it again (nexus-apiserver init-pki)"
    } else if message.contains("InvalidContentType") || message.contains("corrupt message") {
        "the server does not speak TLS; if it serves plain HTTP, use an http:// URL"
    } else {
        "check --server and --certificate-authority"
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// How long ago `ts` (RFC 3339) was: `45s`, `12m`, `3h`, `5d`.
pub fn age(ts: Option<&str>, now: DateTime<Utc>) -> String {
    let Some(t) = ts.and_then(|t| t.parse::<DateTime<Utc>>().ok()) else {
        return "<unknown>".into();
    };
    let secs = (now - t).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".into(),
        other => other.to_string(),
    }
}

fn condition(conditions: &Value, type_: &str) -> String {
    conditions
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .map(|c| s(&c["status"]))
        .unwrap_or_else(|| "Unknown".into())
}

/// The value at dotted `path` of `obj` (`Null` when absent).
fn at<'a>(obj: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(obj, |v, part| &v[part])
}

/// One cell: the column's first present path, formatted.
fn cell(column: &Column, obj: &Value, now: DateTime<Utc>) -> String {
    let value = column.paths.iter().map(|p| at(obj, p)).find(|v| !v.is_null()).unwrap_or(&Value::Null);
    if value.is_null()
        && let Some(d) = column.default
    {
        return d.to_string();
    }
    match column.format {
        Format::Text => s(value),
        Format::Age => age(value.as_str(), now),
        Format::Mebibytes => format!("{}Mi", s(value)),
        Format::Bytes => value.as_u64().map(bytes).unwrap_or_else(|| s(value)),
        Format::Condition(type_) => condition(value, type_),
        Format::Reference => format!("{}/{}", s(&value["kind"]).to_lowercase(), s(&value["name"])),
    }
}

/// `n` bytes in the largest binary unit that keeps the number at least 1.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 || value.fract() < 0.05 {
        format!("{:.0}{}", value, UNITS[unit])
    } else {
        format!("{:.1}{}", value, UNITS[unit])
    }
}

/// A kubectl-style table of `items` of one kind, with the kind's columns.
pub fn table(kind: &KindInfo, items: &[Value], all_projects: bool, wide: bool, now: DateTime<Utc>) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    let with_project = all_projects && kind.namespaced;
    let columns: Vec<&Column> = kind.columns.iter().filter(|c| wide || !c.wide).collect();
    let mut header: Vec<&str> = Vec::new();
    if with_project {
        header.push("PROJECT");
    }
    header.extend(columns.iter().map(|c| c.name));
    t.set_header(header);
    for o in items {
        let mut row: Vec<String> = Vec::new();
        if with_project {
            row.push(s(&o["metadata"]["project"]));
        }
        row.extend(columns.iter().map(|c| cell(c, o, now)));
        t.add_row(row);
    }
    lines(&t).join("\n")
}

/// Rows (the first is the header) as aligned columns, kubectl's way.
pub fn columns(rows: &[Vec<String>]) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    let mut rows = rows.iter();
    if let Some(header) = rows.next() {
        t.set_header(header.clone());
    }
    for r in rows {
        t.add_row(r.clone());
    }
    let mut text = lines(&t).join("\n");
    text.push('\n');
    text
}

/// The table's lines without comfy-table's one-space left padding.
fn lines(t: &Table) -> Vec<String> {
    t.lines().map(|l| l.strip_prefix(' ').unwrap_or(&l).trim_end().to_string()).collect()
}

fn yaml_block(v: &Value, indent: usize) -> String {
    let text = serde_saphyr::to_string(v).unwrap_or_default();
    let pad = " ".repeat(indent);
    text.lines().map(|l| format!("{pad}{l}")).collect::<Vec<_>>().join("\n")
}

fn map_line(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","),
        _ => "<none>".into(),
    }
}

/// The `describe` page of one object, with its recent events.
pub fn describe(kind: &KindInfo, obj: &Value, events: &[Value], now: DateTime<Utc>) -> String {
    let m = &obj["metadata"];
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<20}{v}\n", format!("{k}:")));
    line("Name", s(&m["name"]));
    if kind.namespaced {
        line("Project", s(&m["project"]));
    }
    line("Kind", kind.kind.to_string());
    line("Labels", map_line(&m["labels"]));
    line("Annotations", map_line(&m["annotations"]));
    line("Created", format!("{} ({} ago)", s(&m["creationTimestamp"]), age(m["creationTimestamp"].as_str(), now)));
    if let Some(d) = m["deletionTimestamp"].as_str() {
        line("Deleting since", d.to_string());
    }
    line(
        "Finalizers",
        m["finalizers"]
            .as_array()
            .map(|f| f.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|| "<none>".into()),
    );
    line("UID", s(&m["uid"]));
    line("Resource Version", s(&m["resourceVersion"]));
    line("Generation", s(&m["generation"]));
    out.push_str("Spec:\n");
    out.push_str(&yaml_block(&obj["spec"], 2));
    out.push('\n');
    let mut status = obj["status"].clone();
    let conditions = status.as_object_mut().and_then(|o| o.remove("conditions"));
    // Shown as tables of their own below.
    let template = status.as_object_mut().and_then(|o| o.remove("template"));
    let mmds = status.get_mut("runtime").and_then(Value::as_object_mut).and_then(|r| r.remove("mmds"));
    // A pool's revisions carry whole templates: one line each is enough here
    // (`nexusctl rollout history` shows them).
    if let Some(revisions) = status.get_mut("revisions").and_then(Value::as_array_mut) {
        for r in revisions.iter_mut() {
            *r = Value::String(format!("{} ({}, {})", s(&r["revision"]), s(&r["hash"]), s(&r["createdAt"])));
        }
    }
    out.push_str("Status:\n");
    if status.as_object().is_some_and(|o| !o.is_empty()) {
        out.push_str(&yaml_block(&status, 2));
        out.push('\n');
    } else {
        out.push_str("  <none>\n");
    }
    if let Some(t) = &template {
        out.push_str(&template_section(t));
    }
    if let Some(drives) = obj["status"]["runtime"]["drives"].as_array().filter(|d| !d.is_empty()) {
        out.push_str(&drives_section(drives, &obj["status"]["runtime"]["limits"]));
    }
    if let Some(doc) = &mmds {
        out.push_str(&guest_section(doc));
    }
    out.push_str("Conditions:\n");
    match conditions.as_ref().and_then(Value::as_array) {
        Some(cs) if !cs.is_empty() => {
            let mut t = Table::new();
            t.load_style(presets::NOTHING);
            t.set_header(vec!["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]);
            for c in cs {
                t.add_row(vec![
                    s(&c["type"]),
                    s(&c["status"]),
                    s(&c["reason"]),
                    age(c["lastTransitionTime"].as_str(), now),
                    s(&c["message"]),
                ]);
            }
            for l in lines(&t) {
                out.push_str(&format!("  {l}\n"));
            }
        }
        _ => out.push_str("  <none>\n"),
    }
    out.push_str("Events:\n");
    if events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut t = Table::new();
        t.load_style(presets::NOTHING);
        t.set_header(vec!["TYPE", "REASON", "AGE", "COUNT", "FROM", "MESSAGE"]);
        for e in events {
            let sp = &e["spec"];
            let last = sp["lastTimestamp"].as_str().or(e["metadata"]["creationTimestamp"].as_str());
            t.add_row(vec![
                s(&sp["type"]),
                s(&sp["reason"]),
                age(last, now),
                s(&sp["count"]),
                s(&sp["reportingComponent"]),
                s(&sp["message"]),
            ]);
        }
        for l in lines(&t) {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out
}

/// A VM's template and what the VM overrides of it, field by field: the
/// template's value beside the VM's.
fn template_section(t: &Value) -> String {
    let mut out = format!("Template:           {} (revision {})\n", s(&t["name"]), s(&t["revision"]));
    let overrides = t["overrides"].as_array().cloned().unwrap_or_default();
    if overrides.is_empty() {
        out.push_str("  no overrides: the VM is its template\n");
        return out;
    }
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(vec!["FIELD", "TEMPLATE (BASE)", "VM (OVERRIDE)"]);
    for o in &overrides {
        let base = if o["template"].is_null() { "<not set>".to_string() } else { compact(&o["template"]) };
        table.add_row(vec![s(&o["field"]), base, compact(&o["vm"])]);
    }
    for l in lines(&table) {
        out.push_str(&format!("  {l}\n"));
    }
    out
}

/// What the guest reads from its metadata service, path by path as it
/// asks for it (a long or multi-line value shows its first line and size).
fn guest_section(doc: &Value) -> String {
    fn walk(path: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    walk(&format!("{path}/{k}"), child, out);
                }
            }
            Value::String(text) if text.contains('\n') || text.len() > 160 => {
                let first: String = text.lines().next().unwrap_or_default().chars().take(60).collect();
                out.push((path.to_string(), format!("{first:?}… ({} bytes)", text.len())));
            }
            Value::String(text) => out.push((path.to_string(), text.clone())),
            other => out.push((path.to_string(), compact(other))),
        }
    }
    let mut rows = Vec::new();
    walk("", doc, &mut rows);
    let mut out = format!("Guest metadata:     http://{}/ (MMDS version 2)\n", nexus_api::guest::MMDS_ADDRESS);
    let width = rows.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
    for (path, value) in rows {
        out.push_str(&format!("  {path:<width$}  {value}\n"));
    }
    out
}

/// A VM's extra drives as its node reports them, with their I/O limits.
fn drives_section(drives: &[Value], limits: &Value) -> String {
    let mut out = String::from("Drives:\n");
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(vec!["NAME", "SOURCE", "MODE", "LIMITS", "PATH"]);
    table.add_row(vec![
        "rootfs".to_string(),
        "root filesystem".into(),
        "rw".into(),
        limits_text(&limits["rootfs"]),
        String::new(),
    ]);
    for d in drives {
        let name = s(&d["name"]);
        table.add_row(vec![
            name.clone(),
            s(&d["source"]),
            if d["readOnly"].as_bool() == Some(true) { "ro".into() } else { "rw".into() },
            limits_text(&limits["drives"][&name]),
            s(&d["path"]),
        ]);
    }
    for l in lines(&table) {
        out.push_str(&format!("  {l}\n"));
    }
    if limits["network"].is_object() {
        let n = &limits["network"];
        out.push_str(&format!("  network: rx {}, tx {}\n", limits_text(&n["rx"]), limits_text(&n["tx"])));
    }
    if let Some(g) = limits["generation"].as_i64() {
        out.push_str(&format!("  limits applied from generation {g}\n"));
    }
    out
}

/// A rate limiter in a few words: `bandwidth 10Mi/100ms, ops 100/1s`.
fn limits_text(l: &Value) -> String {
    let bucket = |b: &Value, bytes: bool| {
        let size = b["size"].as_u64().unwrap_or(0);
        let amount = if bytes { self::bytes(size) } else { size.to_string() };
        format!("{amount}/{}ms", b["refillTimeMs"].as_u64().unwrap_or(0))
    };
    let mut parts = Vec::new();
    if l["bandwidth"].is_object() {
        parts.push(format!("bandwidth {}", bucket(&l["bandwidth"], true)));
    }
    if l["ops"].is_object() {
        parts.push(format!("ops {}", bucket(&l["ops"], false)));
    }
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}

/// `v` as compact JSON, or as text when it is a string.
fn compact(v: &Value) -> String {
    match v {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2026-11-22T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        let cases = [
            (0, "0"),
            (1000, "1000"),
            (1536, "1.5Ki"),
            (512 << 20, "512Mi"),
            (3 << 30 | 1 << 29, "3.5Gi"),
            (12 << 40, "12Ti"),
        ];
        for (n, want) in cases {
            assert_eq!(bytes(n), want, "{n}");
        }
    }

    fn vm(name: &str, phase: &str, node: &str) -> Value {
        json!({
            "apiVersion": "nexus/v1", "kind": "VM",
            "metadata": {"name": name, "project": "default", "uid": "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11",
                         "resourceVersion": "42", "generation": 2, "labels": {"app": "ci"},
                         "creationTimestamp": "2026-11-22T11:58:30Z", "finalizers": ["nexus.dev/vm-teardown"]},
            "spec": {"vcpu": 2, "memMib": 512, "kernel": "/img/vmlinux", "rootfs": "/img/rootfs.ext4", "state": "Running", "nodeName": node},
            "status": {"phase": phase, "observedGeneration": 2, "nodeName": node,
                       "runtime": {"pid": 4242, "tapName": "nxt7f0c9a523a43", "mac": "06:00:ac:10:00:02"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": "the VMM is running the guest",
                                       "lastTransitionTime": "2026-11-22T11:59:00Z"}]}
        })
    }

    #[test]
    fn vm_tables() {
        let vms = crate::kinds::lookup("vm").unwrap();
        let items = [vm("web-1", "Running", "node-a"), vm("web-2", "Pending", "node-b")];
        insta::assert_snapshot!("get_vms", table(vms, &items, false, false, now()));
        insta::assert_snapshot!("get_vms_wide_all_projects", table(vms, &items, true, true, now()));
    }

    #[test]
    fn tables_of_the_other_kinds() {
        let node = json!({"metadata": {"name": "node-a", "creationTimestamp": "2026-11-20T12:00:00Z"}, "spec": {},
            "status": {"address": "http://10.0.0.2:7444", "capacity": {"vcpu": 16, "memMib": 65536, "maxVms": 100},
                       "agentVersion": "0.1.0", "firecrackerVersion": "Firecracker v1.16.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        let image = json!({"metadata": {"name": "vmlinux-6-1", "creationTimestamp": "2026-11-22T10:00:00Z"},
            "spec": {"type": "Kernel", "path": "/var/lib/nexus/images/vmlinux"}, "status": {"phase": "Ready"}});
        let event = json!({"metadata": {"name": "e1", "creationTimestamp": "2026-11-22T11:59:50Z"},
            "spec": {"involvedObject": {"kind": "VM", "name": "web-1"}, "type": "Warning", "reason": "Failed",
                     "message": "Firecracker rejected boot-source", "lastTimestamp": "2026-11-22T11:59:55Z"}});
        let k = |n| crate::kinds::lookup(n).unwrap();
        let out = [
            table(k("nodes"), std::slice::from_ref(&node), false, true, now()),
            table(k("images"), &[image], false, false, now()),
            table(k("events"), &[event], false, false, now()),
        ]
        .join("\n\n");
        insta::assert_snapshot!("get_other_kinds", out);
    }

    #[test]
    fn describe_vm() {
        let event = json!({"metadata": {"name": "e1", "creationTimestamp": "2026-11-22T11:58:31Z"},
            "spec": {"involvedObject": {"kind": "VM", "name": "web-1"}, "type": "Normal", "reason": "Scheduled",
                     "message": "placed on node node-a", "count": 1, "reportingComponent": "nexus-controller",
                     "lastTimestamp": "2026-11-22T11:58:31Z"}});
        let vms = crate::kinds::lookup("vm").unwrap();
        insta::assert_snapshot!("describe_vm", describe(vms, &vm("web-1", "Running", "node-a"), &[event], now()));
    }

    #[test]
    fn describe_vm_from_a_template() {
        let mut vm = vm("runner-1", "Running", "node-a");
        vm["spec"] = json!({"template": "runner", "memMib": 1024, "drives": [{"name": "scratch", "sizeMib": 64}],
            "rootfsRateLimiter": {"bandwidth": {"size": 20971520, "refillTimeMs": 100}}});
        vm["status"]["template"] = json!({"name": "runner", "revision": 3, "overrides": [
            {"field": "spec.memMib", "template": 512, "vm": 1024},
            {"field": "spec.rootfsRateLimiter", "template": {"bandwidth": {"size": 10485760, "refillTimeMs": 100}},
             "vm": {"bandwidth": {"size": 20971520, "refillTimeMs": 100}}},
            {"field": "spec.drives[scratch]", "vm": {"name": "scratch", "sizeMib": 64}}]});
        vm["status"]["runtime"]["drives"] = json!([
            {"name": "tools", "source": "image tools@1", "path": "/var/lib/nexus/images/tools.ext4", "readOnly": true},
            {"name": "scratch", "source": "64 MiB scratch", "path": "/var/lib/nexus/run/vms/7f0c9a52/drives/scratch.img"}]);
        vm["status"]["runtime"]["mmds"] = json!({
            "latest": {"meta-data": {"instance-id": "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11", "local-hostname": "runner-1"},
                       "user-data": "#!/bin/sh\necho hello\n"},
            "nexus": {"labels": {"app": "ci"}, "metadata": {"job": {"id": 7}}}});
        vm["status"]["runtime"]["limits"] = json!({"generation": 2,
            "rootfs": {"bandwidth": {"size": 20971520, "refillTimeMs": 100}},
            "network": {"tx": {"ops": {"size": 1000, "refillTimeMs": 1000}}}});
        let vms = crate::kinds::lookup("vm").unwrap();
        insta::assert_snapshot!("describe_vm_from_a_template", describe(vms, &vm, &[], now()));
    }

    #[test]
    fn errors() {
        let invalid = ErrorBody {
            error: "Invalid".into(),
            message: "VM is invalid: spec.vcpu: invalid value \"3\": must be 1 or an even number from 2 to 32 (Firecracker's limits)".into(),
            status: 422,
            fault_message: None,
            suggestion: Some("spec.vcpu: must be 1 or an even number from 2 to 32 (Firecracker's limits)".into()),
            request_id: "r1".into(),
        };
        let fc = ErrorBody {
            error: "FirecrackerRejected".into(),
            message: "Firecracker step boot-source failed".into(),
            status: 422,
            fault_message: Some("The kernel file cannot be opened: No such file or directory (os error 2)".into()),
            suggestion: Some("fix the VM spec (see faultMessage) and apply it again".into()),
            request_id: "r2".into(),
        };
        insta::assert_snapshot!("errors", format!("{}\n---\n{}", error_body(&invalid), error_body(&fc)));
    }
}
