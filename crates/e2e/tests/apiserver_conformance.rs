//! One conformance suite for the apiserver, run against real processes on
//! both storage backends: SQLite and PostgreSQL (a throwaway cluster, or
//! `$DATABASE_URL`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::time::Duration;

use futures::StreamExt;
use nexus_api::VmSpec;
use nexus_client::{Client, Event, ListParams};
use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend};
use serde_json::{Value, json};

/// Raw HTTP access, for status codes and error bodies.
struct Http {
    base: String,
    http: reqwest::Client,
    token: String,
}

impl Http {
    /// Raw access presenting `token` (a cluster admin's).
    fn new(server: &ApiServer, token: &str) -> Self {
        Http { base: server.url.clone(), http: server.http(), token: token.to_string() }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

fn vm(name: &str) -> Value {
    json!({
        "apiVersion": "nexus/v1", "kind": "VM",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"vcpu": 2, "memMib": 256, "kernel": "/img/vmlinux", "rootfs": "/img/rootfs.ext4"}
    })
}

fn assert_error_contract(body: &Value, status: u16) {
    assert_eq!(body["status"], status, "{body}");
    assert!(body["error"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    assert!(body["message"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    assert!(body["requestId"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
}

async fn crud_and_validation(h: &Http) {
    let base = "/v1/projects/conf/vms";
    let (s, created) = h.call("POST", base, Some(vm("a"))).await;
    assert_eq!(s, 201, "{created}");
    assert_eq!(created["metadata"]["generation"], 1);
    assert_eq!(created["metadata"]["project"], "conf");
    assert!(created["metadata"]["uid"].is_string() && created["metadata"]["resourceVersion"].is_string());
    let (s, got) = h.call("GET", &format!("{base}/a"), None).await;
    assert_eq!((s, &got), (200, &created));
    let (s, dup) = h.call("POST", base, Some(vm("a"))).await;
    assert_eq!(s, 409);
    assert_eq!(dup["error"], "AlreadyExists");
    assert_error_contract(&dup, 409);

    // Unknown fields and bad values: 422 naming the field, nothing stored.
    let mut unknown = vm("b");
    unknown["spec"]["memory"] = json!(5);
    let (s, e) = h.call("POST", base, Some(unknown)).await;
    assert_eq!(s, 422, "{e}");
    assert!(e["message"].as_str().unwrap().contains("spec.memory"), "{e}");
    let mut bad = vm("b");
    bad["spec"]["vcpu"] = json!(3);
    bad["spec"]["kernel"] = json!("images/vmlinux");
    let (s, e) = h.call("POST", base, Some(bad)).await;
    assert_eq!(s, 422);
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("spec.vcpu") && msg.contains("\"3\"") && msg.contains("even number"), "{msg}");
    assert!(msg.contains("spec.kernel"), "{msg}");
    assert!(e["suggestion"].is_string());
    assert_error_contract(&e, 422);
    let (s, _) = h.call("GET", &format!("{base}/b"), None).await;
    assert_eq!(s, 404, "a rejected object must not be stored");
    let (s, e) = h.call("GET", &format!("{base}/nope"), None).await;
    assert_eq!(s, 404);
    assert_error_contract(&e, 404);
    let (s, e) = h
        .call(
            "POST",
            base,
            Some(json!({"apiVersion": "nexus/v1", "kind": "Node", "metadata": {"name": "x"}, "spec": {}})),
        )
        .await;
    assert_eq!(s, 422, "wrong kind for the endpoint: {e}");
    let (s, e) = h.call("GET", "/v1/projects/BAD_NAME/vms", None).await;
    assert_eq!(s, 400, "{e}");
}

async fn concurrency_generation_and_status(h: &Http) {
    let path = "/v1/projects/conf/vms/gen";
    let (_, v1) = h.call("POST", "/v1/projects/conf/vms", Some(vm("gen"))).await;
    // Labels change: no generation bump.
    let mut v = v1.clone();
    v["metadata"]["labels"]["tier"] = json!("x");
    let (s, v2) = h.call("PUT", path, Some(v)).await;
    assert_eq!(s, 200, "{v2}");
    assert_eq!(v2["metadata"]["generation"], 1);
    assert_ne!(v2["metadata"]["resourceVersion"], v1["metadata"]["resourceVersion"]);
    // Stale resourceVersion: 409, nothing changes.
    let mut stale = v1.clone();
    stale["spec"]["memMib"] = json!(512);
    let (s, e) = h.call("PUT", path, Some(stale)).await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"], "Conflict");
    let (_, now) = h.call("GET", path, None).await;
    assert_eq!(now, v2);
    // Spec change: generation bumps.
    let mut v = v2.clone();
    v["spec"]["memMib"] = json!(512);
    let (_, v3) = h.call("PUT", path, Some(v)).await;
    assert_eq!(v3["metadata"]["generation"], 2);
    // Status sent to the main endpoint is ignored...
    let mut v = v3.clone();
    v["status"] = json!({"phase": "Running"});
    let (_, v4) = h.call("PUT", path, Some(v)).await;
    assert!(v4.get("status").is_none(), "status must only change through /status: {v4}");
    // ...and the status endpoint changes only status, without a generation bump.
    let mut v = v4.clone();
    v["status"] = json!({"phase": "Running", "observedGeneration": 2});
    v["spec"]["memMib"] = json!(1024);
    let (s, v5) = h.call("PUT", &format!("{path}/status"), Some(v)).await;
    assert_eq!(s, 200, "{v5}");
    assert_eq!(v5["status"]["phase"], "Running");
    assert_eq!(v5["spec"]["memMib"], 512);
    assert_eq!(v5["metadata"]["generation"], 2);
    let mut stale = v4.clone();
    stale["status"] = json!({"phase": "Failed"});
    let (s, _) = h.call("PUT", &format!("{path}/status"), Some(stale)).await;
    assert_eq!(s, 409);
}

async fn finalizers_and_deletion(h: &Http, c: &Client) {
    let path = "/v1/projects/conf/vms/fin";
    let mut body = vm("fin");
    body["metadata"]["finalizers"] = json!(["test/hold"]);
    let (_, created) = h.call("POST", "/v1/projects/conf/vms", Some(body)).await;
    let list = c.list::<VmSpec>(Some("conf"), &ListParams::default()).await.unwrap();
    let params = ListParams { field_selector: Some("metadata.name=fin".into()), ..Default::default() };
    let watch = c.watch::<VmSpec>(Some("conf"), &params, list.metadata.resource_version.as_deref()).await.unwrap();
    let mut watch = std::pin::pin!(watch);
    let (s, deleting) = h.call("DELETE", path, None).await;
    assert_eq!(s, 200);
    assert!(deleting["metadata"]["deletionTimestamp"].is_string(), "{deleting}");
    let (s, _) = h.call("GET", path, None).await;
    assert_eq!(s, 200, "held by its finalizer");
    let mut release = deleting.clone();
    release["metadata"]["finalizers"] = json!([]);
    let (s, _) = h.call("PUT", path, Some(release)).await;
    assert_eq!(s, 200);
    let (s, _) = h.call("GET", path, None).await;
    assert_eq!(s, 404, "gone once the last finalizer is removed");
    let mut types = Vec::new();
    while types.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap() {
            Event::Modified(o) => types.push(("MODIFIED", o.metadata.deletion_timestamp.is_some())),
            Event::Deleted(o) => types.push(("DELETED", o.uid() == created["metadata"]["uid"])),
            Event::Added(_) => types.push(("ADDED", false)),
            Event::Bookmark(_) => {}
        }
    }
    assert_eq!(types, vec![("MODIFIED", true), ("DELETED", true)]);
    // Without finalizers, delete removes at once.
    h.call("POST", "/v1/projects/conf/vms", Some(vm("quick"))).await;
    let (s, _) = h.call("DELETE", "/v1/projects/conf/vms/quick", None).await;
    assert_eq!(s, 200);
    assert_eq!(h.call("GET", "/v1/projects/conf/vms/quick", None).await.0, 404);
}

async fn selectors_paging_and_dry_run(h: &Http) {
    let base = "/v1/projects/sel/vms";
    for i in 0..25 {
        let mut v = vm(&format!("vm-{i:02}"));
        v["metadata"]["labels"] = json!({"app": if i % 2 == 0 { "even" } else { "odd" }, "n": i.to_string()});
        if i < 5 {
            v["spec"]["nodeName"] = json!("node-a");
        }
        assert_eq!(h.call("POST", base, Some(v)).await.0, 201);
    }
    let (_, v) = h.call("GET", &format!("{base}/vm-03"), None).await;
    let mut st = v.clone();
    st["status"] = json!({"phase": "Running"});
    h.call("PUT", &format!("{base}/vm-03/status"), Some(st)).await;

    let names = |v: &Value| -> Vec<String> {
        v["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()).collect()
    };
    let (_, l) = h.call("GET", &format!("{base}?labelSelector=app%3Deven"), None).await;
    assert_eq!(names(&l).len(), 13);
    let (_, l) = h.call("GET", &format!("{base}?labelSelector=app%3Dodd,n!%3D1"), None).await;
    assert_eq!(names(&l).len(), 11);
    let (_, l) = h.call("GET", &format!("{base}?fieldSelector=spec.nodeName%3Dnode-a"), None).await;
    assert_eq!(names(&l), vec!["vm-00", "vm-01", "vm-02", "vm-03", "vm-04"]);
    let (_, l) = h.call("GET", &format!("{base}?fieldSelector=status.phase%3DRunning"), None).await;
    assert_eq!(names(&l), vec!["vm-03"]);
    let (s, e) = h.call("GET", &format!("{base}?fieldSelector=spec.vcpu%3D2"), None).await;
    assert_eq!(s, 400);
    assert!(e["message"].as_str().unwrap().contains("spec.nodeName"), "{e}");

    // Paging: every object exactly once, in order, 10 at a time.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &token {
            Some(t) => format!("{base}?limit=10&continue={t}"),
            None => format!("{base}?limit=10"),
        };
        let (s, page) = h.call("GET", &q, None).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        seen.extend(names(&page));
        token = page["metadata"]["continue"].as_str().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("vm-{i:02}")).collect();
    assert_eq!(seen, expected);
    // Paging with a selector and across projects.
    let (_, page) = h.call("GET", "/v1/vms?limit=4&labelSelector=app%3Dodd", None).await;
    assert_eq!(names(&page).len(), 4);
    assert!(page["metadata"]["continue"].is_string());
    let (s, _) = h.call("GET", &format!("{base}?continue=nothex"), None).await;
    assert_eq!(s, 400);

    // dryRun=All: validated, answered, not stored.
    let (s, dry) = h.call("POST", &format!("{base}?dryRun=All"), Some(vm("dry"))).await;
    assert_eq!(s, 201, "{dry}");
    assert_eq!(h.call("GET", &format!("{base}/dry"), None).await.0, 404);
    let mut bad = vm("dry");
    bad["spec"]["vcpu"] = json!(0);
    assert_eq!(h.call("POST", &format!("{base}?dryRun=All"), Some(bad)).await.0, 422);
    let (_, v) = h.call("GET", &format!("{base}/vm-00"), None).await;
    let mut changed = v.clone();
    changed["spec"]["memMib"] = json!(2048);
    let (s, answer) = h.call("PUT", &format!("{base}/vm-00?dryRun=All"), Some(changed)).await;
    assert_eq!(s, 200);
    assert_eq!(answer["spec"]["memMib"], 2048);
    assert_eq!(h.call("GET", &format!("{base}/vm-00"), None).await.1, v, "dry-run update stored nothing");
    assert_eq!(h.call("DELETE", &format!("{base}/vm-00?dryRun=All"), None).await.0, 200);
    assert_eq!(h.call("GET", &format!("{base}/vm-00"), None).await.0, 200, "dry-run delete removed nothing");
}

async fn watch_resume_and_bookmarks(h: &Http, c: &Client) {
    let base = "/v1/projects/watch/vms";
    let list = c.list::<VmSpec>(Some("watch"), &ListParams::default()).await.unwrap();
    let start = list.metadata.resource_version.clone().unwrap();
    for i in 0..6 {
        h.call("POST", base, Some(vm(&format!("w{i}")))).await;
    }
    // Resume from the middle: exactly the changes after it, once each.
    let full = c.watch::<VmSpec>(Some("watch"), &ListParams::default(), Some(&start)).await.unwrap();
    let mut full = std::pin::pin!(full);
    let mut rvs = Vec::new();
    while rvs.len() < 6 {
        if let Event::Added(o) =
            tokio::time::timeout(Duration::from_secs(10), full.next()).await.unwrap().unwrap().unwrap()
        {
            rvs.push(o.metadata.resource_version.unwrap());
        }
    }
    let middle = rvs[2].clone();
    let resumed = c.watch::<VmSpec>(Some("watch"), &ListParams::default(), Some(&middle)).await.unwrap();
    let mut resumed = std::pin::pin!(resumed);
    h.call("POST", base, Some(vm("w6"))).await;
    let mut after = Vec::new();
    let mut bookmark = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (after.len() < 4 || bookmark.is_none()) && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), resumed.next()).await {
            Ok(Some(Ok(Event::Added(o)))) => after.push(o.name().to_string()),
            Ok(Some(Ok(Event::Bookmark(rv)))) => bookmark = Some(rv),
            Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
            other => panic!("watch failed: {other:?}"),
        }
    }
    assert_eq!(after, vec!["w3", "w4", "w5", "w6"], "no event lost or repeated across a resume");
    let bookmark = bookmark.expect("a BOOKMARK within the interval");
    assert!(bookmark.parse::<i64>().unwrap() >= rvs[5].parse::<i64>().unwrap());
    // Label-filtered watch sees only matching objects.
    let params = ListParams { label_selector: Some("app=other".into()), ..Default::default() };
    let filtered = c.watch::<VmSpec>(Some("watch"), &params, Some(&start)).await.unwrap();
    let mut filtered = std::pin::pin!(filtered);
    let mut other = vm("w7");
    other["metadata"]["labels"] = json!({"app": "other"});
    h.call("POST", base, Some(other)).await;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), filtered.next()).await.unwrap().unwrap().unwrap() {
            Event::Added(o) => {
                assert_eq!(o.name(), "w7");
                break;
            }
            Event::Bookmark(_) => {}
            e => panic!("unexpected {e:?}"),
        }
    }
}

async fn every_kind_round_trips(h: &Http) {
    let objects = [
        (
            "/v1/projects/kinds/templates",
            json!({"apiVersion": "nexus/v1", "kind": "Template", "metadata": {"name": "py312"},
            "spec": {"vcpu": 2, "memMib": 512, "kernel": "/img/vmlinux", "rootfs": "/img/py312.ext4"}}),
        ),
        (
            "/v1/projects/kinds/images",
            json!({"apiVersion": "nexus/v1", "kind": "Image", "metadata": {"name": "vmlinux-6-1"},
            "spec": {"type": "Kernel", "path": "/var/lib/nexus/images/vmlinux", "sha256": "a".repeat(64)}}),
        ),
        (
            "/v1/projects/kinds/snapshots",
            json!({"apiVersion": "nexus/v1", "kind": "Snapshot", "metadata": {"name": "snap-1"},
            "spec": {"vmName": "web-1"}}),
        ),
        (
            "/v1/nodes",
            json!({"apiVersion": "nexus/v1", "kind": "Node", "metadata": {"name": "host-1", "labels": {"zone": "a"}}, "spec": {}}),
        ),
        (
            "/v1/events",
            json!({"apiVersion": "nexus/v1", "kind": "Event", "metadata": {"name": "web-1-1"},
            "spec": {"involvedObject": {"kind": "VM", "name": "web-1", "project": "kinds"}, "type": "Normal",
                     "reason": "Scheduled", "message": "placed on host-1"}}),
        ),
    ];
    for (collection, obj) in objects {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let (s, created) = h.call("POST", collection, Some(obj.clone())).await;
        assert_eq!(s, 201, "{collection}: {created}");
        let (s, got) = h.call("GET", &format!("{collection}/{name}"), None).await;
        assert_eq!((s, &got), (200, &created), "{collection}");
        let mut unknown = obj.clone();
        unknown["spec"]["bogus"] = json!(true);
        let (s, e) = h.call("POST", collection, Some(unknown)).await;
        assert_eq!(s, 422, "{collection} must reject unknown fields: {e}");
        let (s, _) = h.call("DELETE", &format!("{collection}/{name}"), None).await;
        assert_eq!(s, 200);
    }
    let (s, e) = h
        .call(
            "POST",
            "/v1/projects/kinds/images",
            Some(json!({"apiVersion": "nexus/v1", "kind": "Image",
        "metadata": {"name": "bad"}, "spec": {"type": "Kernel", "path": "/x", "sha256": "XYZ"}})),
        )
        .await;
    assert_eq!(s, 422);
    assert!(e["message"].as_str().unwrap().contains("spec.sha256"), "{e}");
    let (s, e) = h
        .call(
            "POST",
            "/v1/nodes",
            Some(json!({"apiVersion": "nexus/v1", "kind": "Node",
        "metadata": {"name": "n", "project": "p"}, "spec": {}})),
        )
        .await;
    assert_eq!(s, 422, "cluster-scoped kinds have no project: {e}");
}

async fn operations_endpoints(h: &Http) {
    assert_eq!(h.call("GET", "/healthz", None).await.0, 200);
    // Ready means a node can run VMs too; none runs here.
    let (status, body) = h.call("GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("no node is Ready")), "{body}");
    let (s, metrics) = h.call("GET", "/metrics", None).await;
    assert_eq!(s, 200);
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("http_requests_total{route=\"/v1/projects/{project}/vms\",method=\"POST\",code=\"201\"}"),
        "{text}"
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket{route=\"/v1/projects/{project}/vms/{name}\""),
        "{text}"
    );
    let (s, doc) = h.call("GET", "/openapi.json", None).await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/v1/projects/{project}/vms",
        "/v1/projects/{project}/snapshots/{name}/status",
        "/v1/nodes/{name}",
        "/v1/events",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p}");
    }
    let (s, e) = h.call("GET", "/v2/nothing", None).await;
    assert_eq!(s, 404);
    assert_error_contract(&e, 404);
    // Errors raised before a handler runs follow the contract too.
    let (s, e) = h.call("PATCH", "/v1/projects/conf/vms/a", Some(json!({}))).await;
    assert_eq!(s, 405);
    assert_error_contract(&e, 405);
    let (s, e) = h.call("GET", "/v1/projects/conf/vms?limit=many", None).await;
    assert_eq!(s, 400);
    assert_error_contract(&e, 400);
    let (s, e) = h.call("POST", "/v1/projects/conf/vms", Some(json!("not an object"))).await;
    assert_eq!(s, 422);
    assert_error_contract(&e, 422);
}

async fn compacted_versions_get_410(backend: &Backend, dir: &std::path::Path, admin: &str) {
    let server = ApiServer::start(backend, dir, &["--retained-changes", "10"]).await;
    let h = Http::new(&server, admin);
    let c = server.client_with(admin);
    let first =
        c.list::<VmSpec>(Some("gone"), &ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    for i in 0..30 {
        h.call("POST", "/v1/projects/gone/vms", Some(vm(&format!("g{i}")))).await;
    }
    let err = c.watch::<VmSpec>(Some("gone"), &ListParams::default(), Some(&first)).await.err().expect("410");
    assert!(err.is_gone(), "{err}");
    assert!(err.to_string().contains("too old"), "{err}");
    // The relist-and-watch recovery works.
    let list = c.list::<VmSpec>(Some("gone"), &ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 30);
    let _resumed = c
        .watch::<VmSpec>(Some("gone"), &ListParams::default(), list.metadata.resource_version.as_deref())
        .await
        .unwrap();
}

async fn conformance(backend: Backend, dir: &std::path::Path) {
    let server = ApiServer::start(&backend, dir, &["--bookmark-interval-secs", "1"]).await;
    let h = Http::new(&server, server.admin_token.as_deref().unwrap());
    let c = server.client();
    crud_and_validation(&h).await;
    concurrency_generation_and_status(&h).await;
    finalizers_and_deletion(&h, &c).await;
    selectors_paging_and_dry_run(&h).await;
    watch_resume_and_bookmarks(&h, &c).await;
    every_kind_round_trips(&h).await;
    operations_endpoints(&h).await;
    let admin = server.admin_token.clone().unwrap();
    drop(server);
    compacted_versions_get_410(&backend, dir, &admin).await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn sqlite_backend_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    runtime().block_on(conformance(Backend::Sqlite(data), dir.path()));
}

#[test]
fn postgres_backend_passes_the_conformance_suite() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.fresh_database();
    runtime().block_on(conformance(Backend::Postgres(url), dir.path()));
}
