//! The API's edge, one finding per test: inputs that crashed or slipped
//! through before (non-ASCII and NUL continue tokens, an overflowing watch
//! version, non-JSON bodies, foreign Hosts, arrays for objects, unbounded
//! fields), the CORS allow-list, quotas under concurrent creates on SQLite
//! and on two PostgreSQL apiservers, and per-identity rate limits and
//! watch caps.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::time::Duration;

use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Sends one request byte for byte; returns (status, body), status 0 when
/// the connection was dropped without an answer.
async fn raw(server: &ApiServer, head: &str, body: &[u8]) -> (u16, Value) {
    let mut s = server.connect_raw().await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.into())))
}

fn get(path: &str, token: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
}

fn post(path: &str, token: &str, content_type: Option<&str>, len: usize) -> String {
    let ct = content_type.map(|c| format!("Content-Type: {c}\r\n")).unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n{ct}Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

fn vm(name: &str) -> Value {
    json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": name},
           "spec": {"vcpu": 1, "memMib": 64, "kernel": "vmlinux", "rootfs": "rootfs"}})
}

fn contract(body: &Value, status: u16) {
    assert_eq!(body["status"], status, "{body}");
    assert!(body["requestId"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    assert!(body["message"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
}

async fn sqlite() -> (tempfile::TempDir, ApiServer, String) {
    let dir = tempfile::tempdir().unwrap();
    let server = ApiServer::start(&Backend::Sqlite(dir.path().join("data")), dir.path(), &[]).await;
    let token = server.admin_token.clone().unwrap();
    (dir, server, token)
}

#[test]
fn a_non_ascii_continue_token_gets_400_not_a_dropped_connection() {
    runtime().block_on(async {
        let (_d, server, token) = sqlite().await;
        for path in
            ["/v1/vms?continue=a%C3%A9b", "/v1/projects/p/templates?continue=%C3%A9%C3%A9", "/v1/nodes?continue=%FF%FE"]
        {
            let (s, body) = raw(&server, &get(path, &token), b"").await;
            println!("{path}: {s} {}", body["message"]);
            assert_eq!(s, 400, "{body}");
            contract(&body, 400);
        }
    });
}

#[test]
fn a_watch_from_the_largest_resource_version_gets_410() {
    runtime().block_on(async {
        let (_d, server, token) = sqlite().await;
        let c = server.client();
        c.create(&serde_json::from_value::<nexus_api::Vm>(vm("a")).unwrap()).await.unwrap_or_else(|_| panic!());
        let (s, body) = raw(&server, &get("/v1/vms?watch=true&resourceVersion=9223372036854775807", &token), b"").await;
        println!("watch from i64::MAX: {s} {}", body["message"]);
        assert_eq!(s, 410, "{body}");
        contract(&body, 410);
        assert!(body["message"].as_str().unwrap().contains("newer than the newest change"));
    });
}

async fn nul_continue(backend: Backend, dir: &std::path::Path) {
    let server = ApiServer::start(&backend, dir, &[]).await;
    let token = server.admin_token.clone().unwrap();
    for path in ["/v1/templates?continue=0000", "/v1/vms?continue=00ff00", "/v1/audit?project=%00"] {
        let (s, body) = raw(&server, &get(path, &token), b"").await;
        println!("{} {path}: {s} {}", backend.name(), body["message"]);
        assert_eq!(s, 400, "{body}");
        contract(&body, 400);
    }
}

#[test]
fn a_continue_token_holding_a_nul_byte_gets_400_on_postgres_and_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(nul_continue(Backend::Sqlite(dir.path().join("data")), dir.path()));
    let pg = TestPostgres::start();
    runtime().block_on(nul_continue(Backend::Postgres(pg.fresh_database()), dir.path()));
}

#[test]
fn a_body_that_is_not_json_gets_415_and_a_foreign_host_is_refused() {
    runtime().block_on(async {
        let (_d, server, token) = sqlite().await;
        let body = serde_json::to_vec(&vm("plain")).unwrap();
        for ct in [Some("text/plain"), None, Some("application/x-www-form-urlencoded")] {
            let (s, answer) = raw(&server, &post("/v1/projects/p/vms", &token, ct, body.len()), &body).await;
            println!("Content-Type {ct:?}: {s} {}", answer["message"]);
            assert_eq!(s, 415, "{answer}");
            contract(&answer, 415);
        }
        let (s, _) = raw(&server, &get("/v1/projects/p/vms/plain", &token), b"").await;
        assert_eq!(s, 404, "nothing was stored");
        let rebinding = format!("GET /v1/vms HTTP/1.1\r\nHost: evil.example:7443\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
        let (s, answer) = raw(&server, &rebinding, b"").await;
        println!("Host evil.example: {s} {}", answer["message"]);
        assert_eq!(s, 403, "{answer}");
        contract(&answer, 403);
    });
}

#[test]
fn browsers_may_call_only_from_allowed_origins_and_preflights_are_answered() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let console = "https://console.example.com";
        let backend = Backend::Sqlite(dir.path().join("data"));
        let server = ApiServer::start(&backend, dir.path(), &["--cors-origin", console]).await;
        let token = server.admin_token.clone().unwrap();
        let http = server.http();
        let preflight = |origin: &'static str| {
            http.request(reqwest::Method::OPTIONS, format!("{}/v1/projects/p/vms", server.url))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "authorization,content-type")
                .send()
        };
        let allowed = preflight(console).await.unwrap();
        let h = allowed.headers().clone();
        println!("preflight from {console}: {} {h:?}", allowed.status());
        assert!(allowed.status().is_success(), "{}", allowed.status());
        assert_eq!(h["access-control-allow-origin"], console);
        assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
        assert!(h["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
        let evil = preflight("https://evil.example").await.unwrap();
        println!(
            "preflight from https://evil.example: {} allow-origin {:?}",
            evil.status(),
            evil.headers().get("access-control-allow-origin")
        );
        assert!(evil.headers().get("access-control-allow-origin").is_none());
        // The call itself: the allowed origin may read the answer (and its
        // errors), another may not.
        let get = |origin: &'static str| {
            http.get(format!("{}/v1/projects/p/vms/missing", server.url))
                .bearer_auth(&token)
                .header("origin", origin)
                .send()
        };
        let r = get(console).await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["access-control-allow-origin"], console);
        assert!(r.headers()["access-control-expose-headers"].to_str().unwrap().contains("retry-after"));
        let r = get("https://evil.example").await.unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none());

        // No allow-list (the default): no CORS header for anyone.
        let plain = ApiServer::start(&Backend::Sqlite(dir.path().join("data2")), dir.path(), &[]).await;
        let r = plain
            .http()
            .request(reqwest::Method::OPTIONS, format!("{}/v1/projects/p/vms", plain.url))
            .header("origin", console)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        println!("preflight to a server without --cors-origin: {}", r.status());
        assert!(r.headers().get("access-control-allow-origin").is_none());

        // A wildcard or a URL with a path is refused at start, with why.
        for bad in ["*", "https://console.example.com/app"] {
            let out = std::process::Command::new(nexus_e2e::bin("nexus-apiserver"))
                .args(["--plain-http", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.path().join("bad"))
                .args(["--cors-origin", bad])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            println!("--cors-origin {bad}: exit {:?}: {}", out.status.code(), err.lines().next().unwrap_or(""));
            assert!(!out.status.success());
            assert!(err.contains("--cors-origin"), "{err}");
        }
    });
}

#[test]
fn a_json_array_in_field_order_is_not_taken_for_an_object() {
    runtime().block_on(async {
        let (_d, server, token) = sqlite().await;
        let bodies = [
            json!(["nexus/v1", "VM", {"name": "arr"}, [1, 64, "vmlinux", "rootfs"]]),
            json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "arr"}, "spec": [null, 1, 64, "vmlinux", "rootfs"]}),
            json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": ["arr"], "spec": {"vcpu": 1}}),
        ];
        for b in bodies {
            let bytes = serde_json::to_vec(&b).unwrap();
            let (s, answer) = raw(&server, &post("/v1/projects/p/vms", &token, Some("application/json"), bytes.len()), &bytes).await;
            println!("{}: {s} {}", b.to_string().chars().take(60).collect::<String>(), answer["message"]);
            assert_eq!(s, 422, "{answer}");
            assert!(answer["message"].as_str().unwrap().contains("expected an object, got an array"), "{answer}");
        }
    });
}

#[test]
fn oversized_free_form_fields_are_refused_with_short_errors() {
    runtime().block_on(async {
        let (_d, server, token) = sqlite().await;
        let big = "v".repeat(1 << 20);
        let mut label = vm("l");
        label["metadata"]["labels"] = json!({"app": big});
        let mut annotations = vm("a");
        annotations["metadata"]["annotations"] = json!({"a": "x".repeat(200 * 1024), "b": "y".repeat(100 * 1024)});
        let mut boot = vm("b");
        boot["spec"]["bootArgs"] = json!("console=ttyS0 ".repeat(110_000));
        let mut name = vm("n");
        name["metadata"]["name"] = json!("N".repeat(1_500_000));
        for (what, body, field) in [
            ("a 1 MB label value", label, "metadata.labels.app"),
            ("300 KB of annotations", annotations, "metadata.annotations"),
            ("1.5 MB of bootArgs", boot, "spec.bootArgs"),
            ("a 1.5 MB name", name, "metadata.name"),
        ] {
            let bytes = serde_json::to_vec(&body).unwrap();
            let (s, answer) =
                raw(&server, &post("/v1/projects/p/vms", &token, Some("application/json"), bytes.len()), &bytes).await;
            let size = answer.to_string().len();
            println!(
                "{what}: {s}, error of {size} bytes: {}",
                answer["message"].as_str().unwrap_or("").chars().take(120).collect::<String>()
            );
            assert!(s == 422 || s == 413, "{what}: {s}");
            if s == 422 {
                assert!(answer["message"].as_str().unwrap().contains(field), "{answer}");
            }
            assert!(size < 4096, "{what}: the error echoes {size} bytes");
        }
    });
}

async fn quota_race(servers: &[&ApiServer], token: &str, label: &str) {
    let client = servers[0].client_with(token);
    let quota =
        json!({"apiVersion": "nexus/v1", "kind": "ResourceQuota", "metadata": {"name": "team"}, "spec": {"vms": 10}});
    client.raw::<Value>(reqwest::Method::POST, "/v1/projects/q/resourcequotas", Some(&quota)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = servers[i % servers.len()].client_with(token);
        let mut body = vm(&format!("race-{i:02}"));
        body["metadata"]["project"] = json!("q");
        tasks.push(tokio::spawn(async move {
            c.raw::<Value>(reqwest::Method::POST, "/v1/projects/q/vms", Some(&body)).await
        }));
    }
    let (mut ok, mut refused, mut messages) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.status() == Some(403) => {
                refused += 1;
                messages.push(e.to_string());
            }
            Err(e) => panic!("{e}"),
        }
    }
    println!(
        "{label}: 20 parallel creates against a quota of 10 VMs: {ok} created, {refused} refused; e.g. {}",
        messages[0]
    );
    assert_eq!((ok, refused), (10, 10));
    assert!(
        messages.iter().all(|m| m.contains("quota team: VMs 10 of 10 used; this request needs 1 more")),
        "{messages:?}"
    );
    let list: Value = client.raw(reqwest::Method::GET, "/v1/projects/q/vms", None).await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 10);
}

#[test]
fn twenty_parallel_creates_against_a_quota_of_ten_make_exactly_ten_on_sqlite() {
    runtime().block_on(async {
        let (_d, server, token) = sqlite().await;
        quota_race(&[&server], &token, "sqlite").await;
    });
}

#[test]
fn twenty_parallel_creates_against_a_quota_of_ten_make_exactly_ten_on_two_postgres_apiservers() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let backend = Backend::Postgres(pg.fresh_database());
        let a = ApiServer::start(&backend, dir.path(), &[]).await;
        let b = ApiServer::start(&backend, dir.path(), &[]).await;
        let token = a.admin_token.clone().unwrap();
        quota_race(&[&a, &b], &token, "postgres, two apiservers").await;
    });
}

#[test]
fn a_client_over_its_budget_gets_429_with_retry_after_and_watches_are_capped() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let server = ApiServer::start(
            &Backend::Sqlite(dir.path().join("data")),
            dir.path(),
            &["--rate-limit-qps", "5", "--rate-limit-burst", "10", "--max-watches-per-identity", "3"],
        )
        .await;
        let admin = server.client();
        let noisy = nexus_e2e::issue_token(&admin, "user:noisy").await;
        let bind = json!({"apiVersion": "nexus/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "noisy"},
                          "spec": {"role": "viewer", "subjects": ["user:noisy"]}});
        admin.raw::<Value>(reqwest::Method::POST, "/v1/clusterrolebindings", Some(&bind)).await.unwrap();
        let http = server.http();
        let mut retry_after = None;
        for _ in 0..30 {
            let r = http.get(format!("{}/v1/vms", server.url)).bearer_auth(&noisy).send().await.unwrap();
            if r.status().as_u16() == 429 {
                retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                let body: Value = r.json().await.unwrap();
                contract(&body, 429);
            }
        }
        let r429 = {
            let mut n = 0;
            for _ in 0..5 {
                if http.get(format!("{}/v1/vms", server.url)).bearer_auth(&noisy).send().await.unwrap().status() == 429
                {
                    n += 1;
                }
            }
            n
        };
        println!(
            "a user with 5 req/s (burst 10): throttled with Retry-After {retry_after:?}; {r429} of 5 more refused"
        );
        assert!(retry_after.is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
        // Another identity is not held up.
        assert!(admin.list::<nexus_api::VmSpec>(None, &Default::default()).await.is_ok());
        // Watches: 3 may be open, the 4th is refused.
        let watcher = nexus_e2e::issue_token(&admin, "user:watcher").await;
        let bind = json!({"apiVersion": "nexus/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "watcher"},
                          "spec": {"role": "viewer", "subjects": ["user:watcher"]}});
        admin.raw::<Value>(reqwest::Method::POST, "/v1/clusterrolebindings", Some(&bind)).await.unwrap();
        let mut open = Vec::new();
        for _ in 0..3 {
            let r = http.get(format!("{}/v1/vms?watch=true", server.url)).bearer_auth(&watcher).send().await.unwrap();
            assert_eq!(r.status(), 200);
            open.push(r);
        }
        let fourth = http.get(format!("{}/v1/vms?watch=true", server.url)).bearer_auth(&watcher).send().await.unwrap();
        assert_eq!(fourth.status(), 429);
        let body: Value = fourth.json().await.unwrap();
        println!("4th watch: {}", body["message"]);
        assert!(body["message"].as_str().unwrap().contains("already has 3 open watches"));
        drop(open);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = http.get(format!("{}/v1/vms?watch=true", server.url)).bearer_auth(&watcher).send().await.unwrap();
        assert_eq!(again.status(), 200, "closed watches give their places back");
    });
}
