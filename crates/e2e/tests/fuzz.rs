//! A fixed-seed fuzz run against a real apiserver, on SQLite and on
//! PostgreSQL: malformed and boundary requests over every route and every
//! schema field, sent byte for byte over TCP (nothing normalised by a
//! client library). Every answer must be below 500, in the error contract
//! when not 2xx, and on a connection that was answered (never dropped);
//! the server must be ready afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::collections::BTreeMap;
use std::time::Duration;

use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// xorshift64*: the same requests every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One request, as bytes on the wire.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// What came back.
#[derive(Debug)]
enum Answer {
    Status(u16, Vec<u8>, bool),
    Dropped(String),
}

async fn send(server: &ApiServer, token: &str, r: &Req) -> Answer {
    let mut s = match server.connect_raw().await {
        Ok(s) => s,
        Err(e) => return Answer::Dropped(format!("connect: {e}")),
    };
    let mut head = format!("{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n", r.method, r.path);
    if !r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", r.body.len()));
    if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&r.body).await.is_err() {
        // A server may answer (413) and close before reading a huge body.
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            Ok(Err(e)) if buf.is_empty() => return Answer::Dropped(format!("read: {e}")),
            Ok(Err(_)) => break,
            Err(_) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        // A watch that was accepted streams on: its head is the answer.
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            if head.contains("stream=watch") {
                return Answer::Status(status_of(&buf), Vec::new(), true);
            }
        }
    }
    if buf.is_empty() {
        return Answer::Dropped("no answer".into());
    }
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Answer::Dropped(format!("a partial answer: {:?}", String::from_utf8_lossy(&buf)));
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let mut body = buf[end + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Answer::Status(status_of(&buf), body, false)
}

fn status_of(buf: &[u8]) -> u16 {
    String::from_utf8_lossy(buf).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[(i + 2 + n + 2).min(b.len())..];
    }
    out
}

/// Values at the edges of what each JSON type can hold, and beyond.
fn nasty() -> Vec<Value> {
    vec![
        json!(""),
        json!("x".repeat(70_000)),
        json!("\u{0}"),
        json!("é✓𝄞\u{202e}"),
        json!("../../etc/passwd"),
        json!("%00%2e%2e"),
        json!(-1),
        json!(0),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(1.5e308),
        json!(-0.5),
        json!(true),
        Value::Null,
        json!([]),
        json!({}),
        json!([1, "a", null]),
        json!({"a": {"b": {"c": [1]}}}),
        json!("/etc/shadow"),
        json!("A".repeat(64)),
    ]
}

/// Every dotted path the schema names under `spec` and `metadata`.
fn field_paths(schema: &Value) -> Vec<Vec<String>> {
    fn walk(s: &Value, root: &Value, path: Vec<String>, out: &mut Vec<Vec<String>>, depth: usize) {
        if depth > 6 {
            return;
        }
        let s = match s["$ref"].as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
            Some(n) => &root["$defs"][n],
            None => s,
        };
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(bs) = s[key].as_array() {
                for b in bs {
                    walk(b, root, path.clone(), out, depth + 1);
                }
            }
        }
        if let Some(props) = s["properties"].as_object() {
            for (k, v) in props {
                let mut p = path.clone();
                p.push(k.clone());
                out.push(p.clone());
                walk(v, root, p, out, depth + 1);
            }
        }
    }
    let mut out = Vec::new();
    walk(schema, schema, Vec::new(), &mut out, 0);
    out.sort();
    out.dedup();
    out
}

fn set(v: &mut Value, path: &[String], to: Value) {
    let mut cur = v;
    for (i, part) in path.iter().enumerate() {
        if i + 1 == path.len() {
            if let Some(o) = cur.as_object_mut() {
                o.insert(part.clone(), to);
            }
            return;
        }
        if !cur[part.as_str()].is_object() {
            cur[part.as_str()] = json!({});
        }
        cur = &mut cur[part.as_str()];
    }
}

fn base(kind: &str, name: &str) -> Value {
    let spec = match kind {
        "VM" => json!({"vcpu": 1, "memMib": 64, "kernel": "vmlinux", "rootfs": "rootfs"}),
        "Template" => json!({"vcpu": 1, "memMib": 64, "kernel": "vmlinux", "rootfs": "rootfs"}),
        "Image" => json!({"type": "Kernel", "path": "/var/lib/nexus/images/vmlinux"}),
        "Snapshot" => json!({"vmName": "x"}),
        "Event" => {
            json!({"involvedObject": {"kind": "VM", "name": "x"}, "type": "Normal", "reason": "R", "message": "m"})
        }
        "Lease" => json!({"leaseDurationSeconds": 10}),
        "RoleBinding" | "ClusterRoleBinding" => json!({"role": "viewer", "subjects": ["user:zed"]}),
        "ResourceQuota" => json!({"vms": 100}),
        _ => json!({}),
    };
    json!({"apiVersion": "nexus/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})
}

fn json_req(method: &str, path: String, body: &Value) -> Req {
    Req {
        method: method.into(),
        path,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: serde_json::to_vec(body).unwrap(),
    }
}

/// The whole run's requests, from the seed.
fn requests(seed: u64) -> Vec<Req> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let kinds = nexus_api::registry::kinds();
    let schemas: BTreeMap<String, Value> = nexus_api::schema::all().into_iter().collect();
    for k in kinds {
        let coll = k.collection("fuzz");
        let schema = &schemas[&k.kind.to_lowercase()];
        // Every field of the kind, set to each edge value, created and updated.
        for path in field_paths(schema) {
            if path.first().is_some_and(|p| p == "status") {
                continue;
            }
            for v in nasty() {
                let mut body = base(k.kind, "target");
                set(&mut body, &path, v);
                if rng.next() % 2 == 0 {
                    out.push(json_req("POST", coll.clone(), &body));
                } else {
                    out.push(json_req("PUT", format!("{coll}/target"), &body));
                }
            }
        }
        // Status writes with edge values.
        for v in nasty().into_iter().take(8) {
            let mut body = base(k.kind, "target");
            body["status"] = v;
            out.push(json_req("PUT", format!("{coll}/target/status"), &body));
        }
        // Lists and watches with odd parameters.
        let params = [
            "limit=-1",
            "limit=0",
            "limit=99999999999999999999",
            "limit=abc",
            "continue=a%C3%A9b",
            "continue=0000",
            "continue=zz",
            "continue=%00",
            "labelSelector=%3D%3D",
            "labelSelector=a%20b",
            "labelSelector=!",
            "fieldSelector=spec.vcpu%3D2",
            "fieldSelector=metadata.name",
            "fieldSelector=%E2%9C%93%3Dx",
            "watch=true&resourceVersion=9223372036854775807",
            "watch=true&resourceVersion=-5",
            "watch=true&resourceVersion=abc",
            "watch=true&resourceVersion=1e30",
            "watch=maybe",
            "dryRun=Bogus",
            "watch=true&limit=5",
            "resourceVersion=%FF",
        ];
        for p in params {
            out.push(Req { method: "GET".into(), path: format!("{coll}?{p}"), headers: vec![], body: vec![] });
        }
    }
    // Malformed bodies on a few routes.
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("application/json", b"{".to_vec()),
        ("application/json", b"{\"apiVersion\": \"nexus/v1\", \"kind\": \"VM\"".to_vec()),
        ("application/json", vec![0xff, 0xfe, 0x00, 0x7b]),
        ("application/json", b"[\"nexus/v1\", \"VM\", {\"name\": \"a\"}, {}]".to_vec()),
        ("application/json", format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes()),
        ("application/json", b"{} trailing".to_vec()),
        ("application/json", b"null".to_vec()),
        ("application/json", b"\"a string\"".to_vec()),
        ("text/plain", serde_json::to_vec(&base("VM", "plain")).unwrap()),
        ("application/x-www-form-urlencoded", b"a=b".to_vec()),
        ("application/json; charset=utf-16", serde_json::to_vec(&base("VM", "u16")).unwrap()),
        ("", serde_json::to_vec(&base("VM", "none")).unwrap()),
    ];
    for k in kinds {
        for (ct, b) in &bodies {
            let mut headers = vec![];
            if !ct.is_empty() {
                headers.push(("Content-Type".to_string(), ct.to_string()));
            }
            out.push(Req { method: "POST".into(), path: k.collection("fuzz"), headers, body: b.clone() });
        }
    }
    // Paths and methods.
    let paths = [
        "/v1/projects/fuzz/pods",
        "/v1/projects/FUZZ/vms",
        "/v1/projects/f%C3%A9/vms",
        "/v1/projects/fuzz/vms/..%2f..%2fetc",
        "/v1/projects/fuzz/vms/a/b/c/d",
        "/v1/projects//vms",
        "/v1/projects/fuzz/vms/%00",
        "/v1//vms",
        "/v1/nodes/../../etc",
        "/v1/projects/fuzz/nodes/n",
        "/v1/projects/fuzz/vms/a/status/x",
        "/v1/tokens/../audit",
        "/v1/audit?since=yesterday",
        "/v1/audit?limit=-3",
        "/v1/audit?continue=x",
        "/v1/audit?project=%00",
        "/v1/tokens?subject=%FF",
        "/v1/nodes/N1/join",
        "/v1/nodes/n1/credential",
        "/v1/whoami?x=%FF",
        "/nothing",
        "/v1/",
        "/",
        "/v1/projects/fuzz/vms/x/proxy/%2e%2e",
    ];
    let long_name = format!("/v1/projects/fuzz/vms/{}", "a".repeat(5000));
    for p in paths.iter().map(|p| p.to_string()).chain([long_name]) {
        for m in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"] {
            let body = if m == "POST" || m == "PUT" { serde_json::to_vec(&base("VM", "p")).unwrap() } else { vec![] };
            let headers = vec![("Content-Type".to_string(), "application/json".to_string())];
            out.push(Req { method: m.into(), path: p.clone(), headers, body });
        }
    }
    // Authorization headers that are not tokens.
    for a in [
        "Bearer",
        "Bearer ",
        "Basic YTpi",
        "Bearer nexus_",
        "Bearer nexus_zzzzzzzzzzzzzzzz_zz",
        &format!("Bearer {}", "x".repeat(8000)),
    ] {
        out.push(Req {
            method: "GET".into(),
            path: "/v1/vms".into(),
            headers: vec![("Authorization".into(), a.into())],
            body: vec![],
        });
    }
    out
}

async fn fuzz(backend: Backend, dir: &std::path::Path) {
    // Ready means storage answers here: no node runs in this test.
    let server = ApiServer::start(&backend, dir, &["--ready-without-nodes"]).await;
    let token = server.admin_token.clone().unwrap();
    // Something to update in every kind.
    for k in nexus_api::registry::kinds() {
        let r = json_req("POST", k.collection("fuzz"), &base(k.kind, "target"));
        let _ = send(&server, &token, &r).await;
    }
    let reqs = requests(0x6e65_7875_7321);
    let mut classes: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for r in &reqs {
        match send(&server, &token, r).await {
            Answer::Dropped(why) => {
                bad.push(format!("dropped: {} {}: {why}", r.method, r.path.chars().take(120).collect::<String>()))
            }
            Answer::Status(status, body, streaming) => {
                *classes.entry(format!("{}xx", status / 100)).or_default() += 1;
                if !(100..500).contains(&status) {
                    bad.push(format!(
                        "{status}: {} {}: {}",
                        r.method,
                        r.path.chars().take(120).collect::<String>(),
                        String::from_utf8_lossy(&body).chars().take(300).collect::<String>()
                    ));
                } else if status >= 300 && !streaming && r.method != "HEAD" {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let ok = v["status"] == status
                        && v["error"].as_str().is_some_and(|s| !s.is_empty())
                        && v["message"].as_str().is_some_and(|s| !s.is_empty())
                        && v["requestId"].as_str().is_some_and(|s| !s.is_empty());
                    if !ok {
                        bad.push(format!(
                            "not the error contract: {status} {} {}: {}",
                            r.method,
                            r.path.chars().take(120).collect::<String>(),
                            String::from_utf8_lossy(&body).chars().take(300).collect::<String>()
                        ));
                    }
                    if body.len() > 16 * 1024 {
                        bad.push(format!(
                            "an error of {} bytes: {} {}",
                            body.len(),
                            r.method,
                            r.path.chars().take(80).collect::<String>()
                        ));
                    }
                }
            }
        }
    }
    let ready =
        server.http().get(format!("{}/readyz", server.url)).send().await.map(|r| r.status().as_u16()).unwrap_or(0);
    println!(
        "{} backend: {} requests; by status class {classes:?}; {} problems; /readyz {ready} afterwards",
        backend.name(),
        reqs.len(),
        bad.len()
    );
    assert!(reqs.len() >= 2000, "{} requests", reqs.len());
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(ready, 200);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn fuzzed_requests_never_get_a_5xx_or_a_dropped_connection_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(fuzz(Backend::Sqlite(dir.path().join("data")), dir.path()));
}

#[test]
fn fuzzed_requests_never_get_a_5xx_or_a_dropped_connection_on_postgres() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(fuzz(Backend::Postgres(pg.fresh_database()), dir.path()));
}
