//! Who may do what, against real apiservers on both backends: the whole
//! authorization matrix, what anonymous callers get, raw host paths, and a
//! token's life (create, use, rotate, revoke) on two apiservers sharing one
//! PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nexus_api::auth::{RotateRequest, TokenRequest};
use nexus_client::Client;
use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend};
use serde_json::{Value, json};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Raw HTTP as one caller (or nobody).
#[derive(Clone)]
struct As {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl As {
    /// Raw access to `server` presenting `token`.
    fn at(server: &ApiServer, token: Option<&str>) -> Self {
        As::new(server.http(), &server.url, token)
    }

    fn new(http: reqwest::Client, base: &str, token: Option<&str>) -> Self {
        As { base: base.to_string(), token: token.map(str::to_string), http }
    }

    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        if path.contains("watch=true") && status == 200 {
            // A stream that stays open: the status is the answer.
            return (status, Value::Null);
        }
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// A kind as the matrix exercises it.
struct Kind {
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    spec: Value,
}

fn kinds() -> Vec<Kind> {
    let k = |kind, plural, namespaced, spec| Kind { kind, plural, namespaced, spec };
    vec![
        k("VM", "vms", true, json!({"vcpu": 1, "memMib": 64, "kernel": "vmlinux", "rootfs": "rootfs"})),
        k("Snapshot", "snapshots", true, json!({"vmName": "x"})),
        k(
            "VMPool",
            "vmpools",
            true,
            json!({"replicas": 0, "selector": {"app": "x"},
            "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"template": "t"}}}),
        ),
        k("Template", "templates", true, json!({"vcpu": 1, "memMib": 64, "kernel": "vmlinux", "rootfs": "rootfs"})),
        k("Image", "images", true, json!({"type": "Kernel", "path": "/var/lib/nexus/images/vmlinux"})),
        k("RoleBinding", "rolebindings", true, json!({"role": "viewer", "subjects": ["user:zed"]})),
        k("Node", "nodes", false, json!({})),
        k(
            "Event",
            "events",
            false,
            json!({"involvedObject": {"kind": "VM", "name": "x", "project": "p1"},
            "type": "Normal", "reason": "Test", "message": "m"}),
        ),
        k("Lease", "leases", false, json!({"leaseDurationSeconds": 10})),
        k("ClusterRoleBinding", "clusterrolebindings", false, json!({"role": "viewer", "subjects": ["user:zed"]})),
    ]
}

const VERBS: [&str; 7] = ["get", "list", "watch", "create", "update", "update-status", "delete"];

/// The roles as the issue specifies them, written out independently of the
/// server's code: may `who` do `verb` on `kind` in its own project (or, for
/// a node, on its own Node) or another one?
fn expected(who: &str, verb: &str, kind: &str, own: bool) -> bool {
    let reads = matches!(verb, "get" | "list" | "watch");
    let project_kind = matches!(kind, "VM" | "VMPool" | "Snapshot" | "Template" | "Image" | "RoleBinding");
    match who {
        "cluster-admin" => true,
        "controller" => {
            reads || verb == "update-status" || matches!(kind, "VM" | "VMPool" | "Snapshot" | "Event" | "Lease")
        }
        // A node also reads Images (it downloads their files).
        "node" => {
            (kind == "Node" && (reads || (own && matches!(verb, "create" | "update-status"))))
                || (kind == "Image" && verb == "get")
        }
        _ => {
            if kind == "Node" {
                return reads;
            }
            if kind == "Event" {
                return reads;
            }
            if !project_kind || !own || verb == "update-status" {
                return false;
            }
            match who {
                "viewer" => reads && kind != "RoleBinding",
                "operator" => (reads && kind != "RoleBinding") || matches!(kind, "VM" | "VMPool" | "Snapshot"),
                "admin" => true,
                _ => false,
            }
        }
    }
}

fn object(kind: &Kind, name: &str, project: Option<&str>) -> Value {
    let mut meta = json!({"name": name});
    if let Some(p) = project {
        meta["project"] = json!(p);
    }
    json!({"apiVersion": "nexus/v1", "kind": kind.kind, "metadata": meta, "spec": kind.spec})
}

fn collection(kind: &Kind, project: &str) -> String {
    if kind.namespaced { format!("/v1/projects/{project}/{}", kind.plural) } else { format!("/v1/{}", kind.plural) }
}

async fn issue(admin: &Client, subject: &str) -> String {
    nexus_e2e::issue_token(admin, subject).await
}

async fn matrix(backend: Backend, dir: &std::path::Path) {
    let server = ApiServer::start(&backend, dir, &[]).await;
    let admin_token = server.admin_token.clone().unwrap();
    let admin = As::at(&server, Some(&admin_token));
    let client = server.client();
    // Subjects and what they hold (project p1 is "their own").
    let bind = |name: &str, role: &str, subject: &str| {
        json!({"apiVersion": "nexus/v1", "kind": "RoleBinding", "metadata": {"name": name},
               "spec": {"role": role, "subjects": [subject]}})
    };
    for (name, role, subject) in
        [("v", "viewer", "user:viv"), ("o", "operator", "user:otto"), ("a", "admin", "user:ada")]
    {
        let (s, b) = admin.call("POST", "/v1/projects/p1/rolebindings", Some(&bind(name, role, subject))).await;
        assert_eq!(s, 201, "{b}");
    }
    let crb = json!({"apiVersion": "nexus/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "ops"},
                     "spec": {"role": "cluster-admin", "subjects": ["user:carl"]}});
    assert_eq!(admin.call("POST", "/v1/clusterrolebindings", Some(&crb)).await.0, 201);
    let who: Vec<(&str, String)> = vec![
        ("viewer", issue(&client, "user:viv").await),
        ("operator", issue(&client, "user:otto").await),
        ("admin", issue(&client, "user:ada").await),
        ("cluster-admin", issue(&client, "user:carl").await),
        ("controller", issue(&client, "system:controller").await),
        ("node", issue(&client, "node:n1").await),
    ];
    let mut cells = 0;
    let mut wrong = Vec::new();
    let mut table: BTreeMap<(String, &str), Vec<String>> = BTreeMap::new();
    for (role, token) in &who {
        let caller = As::at(&server, Some(token));
        for kind in kinds() {
            let mut row = Vec::new();
            for verb in VERBS {
                let mut marks = String::new();
                for own in [true, false] {
                    let project = if own { "p1" } else { "p2" };
                    // The node's own Node is n1; for everyone else the
                    // project decides, and cluster kinds have none.
                    let target_name = if kind.kind == "Node" && *role == "node" && own {
                        "n1".to_string()
                    } else {
                        format!("t-{role}-{verb}")
                    };
                    let proj = kind.namespaced.then_some(project);
                    let coll = collection(&kind, project);
                    let path = format!("{coll}/{target_name}");
                    // Each write cell works on an object of its own, made by the admin.
                    if matches!(verb, "get" | "update" | "update-status" | "delete") {
                        let (s, b) = admin.call("POST", &coll, Some(&object(&kind, &target_name, proj))).await;
                        assert!(s == 201 || s == 409, "preparing {path}: {s} {b}");
                    }
                    let (status, body) = match verb {
                        "get" => caller.call("GET", &path, None).await,
                        "list" => caller.call("GET", &coll, None).await,
                        "watch" => caller.call("GET", &format!("{coll}?watch=true"), None).await,
                        "create" => {
                            let fresh = if kind.kind == "Node" && *role == "node" && own {
                                "n1".to_string()
                            } else {
                                format!("c-{role}-{}", if own { "own" } else { "other" })
                            };
                            let _ = admin.call("DELETE", &format!("{coll}/{fresh}"), None).await;
                            caller.call("POST", &coll, Some(&object(&kind, &fresh, proj))).await
                        }
                        "update" => {
                            let (_, mut current) = admin.call("GET", &path, None).await;
                            current["metadata"]["labels"] = json!({"touched": "yes"});
                            caller.call("PUT", &path, Some(&current)).await
                        }
                        "update-status" => {
                            let (_, current) = admin.call("GET", &path, None).await;
                            caller.call("PUT", &format!("{path}/status"), Some(&current)).await
                        }
                        _ => caller.call("DELETE", &path, None).await,
                    };
                    let allowed = (200..300).contains(&status);
                    let want = expected(role, verb, kind.kind, own || !kind.namespaced && *role != "node");
                    cells += 1;
                    if allowed != want || (!allowed && status != 403) {
                        wrong.push(format!(
                            "{role} {verb} {} ({}): got {status} {body}",
                            kind.kind,
                            if own { "own" } else { "other" }
                        ));
                    }
                    if !allowed {
                        assert_eq!(body["status"], status, "error contract: {body}");
                        assert!(body["requestId"].as_str().is_some_and(|s| !s.is_empty()));
                    }
                    // A refused write left the object as it was.
                    if !allowed && matches!(verb, "update" | "delete") {
                        let (s, after) = admin.call("GET", &path, None).await;
                        assert_eq!(s, 200, "{role} {verb} {path} was refused yet the object is gone");
                        assert!(after["metadata"]["labels"]["touched"].is_null(), "refused update applied: {after}");
                    }
                    marks.push(if allowed { 'Y' } else { '.' });
                }
                row.push(marks);
            }
            table.insert((role.to_string(), kind.kind), row);
        }
    }
    println!("{:<14}{:<20}{}", "ROLE", "KIND", VERBS.map(|v| format!("{v:<14}")).concat());
    for ((role, kind), row) in &table {
        println!("{role:<14}{kind:<20}{}", row.iter().map(|m| format!("{m:<14}")).collect::<String>());
    }
    println!(
        "{} backend: {cells} cells checked (Y allowed, . refused; own project / other project), {} wrong",
        backend.name(),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_authorization_matrix_holds_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(matrix(Backend::Sqlite(dir.path().join("data")), dir.path()));
}

#[test]
fn the_authorization_matrix_holds_on_postgres() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(matrix(Backend::Postgres(pg.fresh_database()), dir.path()));
}

#[test]
fn anonymous_requests_get_401_change_nothing_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let server = ApiServer::start(&Backend::Sqlite(dir.path().join("data")), dir.path(), &[]).await;
        let admin = As::at(&server, server.admin_token.as_deref());
        let vm = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "victim"},
                        "spec": {"vcpu": 1, "memMib": 64, "kernel": "k", "rootfs": "r"}});
        assert_eq!(admin.call("POST", "/v1/projects/default/vms", Some(&vm)).await.0, 201);
        let node = json!({"apiVersion": "nexus/v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": {}});
        assert_eq!(admin.call("POST", "/v1/nodes", Some(&node)).await.0, 201);
        let (_, before) = admin.call("GET", "/v1/vms", None).await;
        let nobody = As::at(&server, None);
        let lease = json!({"apiVersion": "nexus/v1", "kind": "Lease", "metadata": {"name": "nexus-controller"},
                           "spec": {"holderIdentity": "evil", "leaseDurationSeconds": 3600,
                                    "renewTime": "2099-01-01T00:00:00Z"}});
        let mut status = node.clone();
        status["status"] = json!({"address": "http://attacker.example:7444"});
        let attempts = [
            ("create a VM", nobody.call("POST", "/v1/projects/default/vms", Some(&vm)).await),
            ("delete a VM", nobody.call("DELETE", "/v1/projects/default/vms/victim", None).await),
            ("list every project", nobody.call("GET", "/v1/vms", None).await),
            ("write a Node's status", nobody.call("PUT", "/v1/nodes/n1/status", Some(&status)).await),
            ("write the controller Lease", nobody.call("POST", "/v1/leases", Some(&lease)).await),
        ];
        for (what, (s, body)) in &attempts {
            println!("anonymous {what}: {s} {}", body["message"]);
            assert_eq!(*s, 401, "{what}: {body}");
            assert_eq!(body["error"], "Unauthorized");
        }
        let bad = As::at(
            &server,
            Some("nexus_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000"),
        );
        assert_eq!(bad.call("GET", "/v1/vms", None).await.0, 401, "an unknown token");
        assert_eq!(admin.call("GET", "/v1/vms", None).await.1["items"], before["items"], "nothing changed");
        let (_, n1) = admin.call("GET", "/v1/nodes/n1", None).await;
        assert!(n1["status"].is_null(), "{n1}");
        assert_eq!(admin.call("GET", "/v1/leases/nexus-controller", None).await.0, 404);
        let (_, denied) = admin.call("GET", "/v1/audit?result=denied&actor=anonymous", None).await;
        let verbs: Vec<&str> =
            denied["items"].as_array().unwrap().iter().map(|r| r["verb"].as_str().unwrap()).collect();
        println!("audit records of the anonymous writes: {verbs:?}");
        assert_eq!(
            verbs,
            ["create", "delete", "update-status", "create"],
            "each write denied is on record (reads are not audited)"
        );
    });
}

#[test]
fn raw_host_paths_need_dev_mode_and_an_admin() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let strict = ApiServer::start(&Backend::Sqlite(dir.path().join("strict")), dir.path(), &[]).await;
        // ApiServer::start turns dev mode on; restart this one without it.
        let admin_token = strict.admin_token.clone().unwrap();
        let port = strict.url.rsplit(':').next().unwrap().to_string();
        let http = strict.http();
        let pki = dir.path().join("pki");
        let (cert, key) = (pki.join(format!("apiserver-{port}.crt")), pki.join(format!("apiserver-{port}.key")));
        drop(strict);
        let log = std::fs::File::create(dir.path().join("strict.log")).unwrap();
        let mut proc = std::process::Command::new(nexus_e2e::bin("nexus-apiserver"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
                &dir.path().join("strict").display().to_string(),
                "--tls-cert",
                &cert.display().to_string(),
                "--tls-key",
                &key.display().to_string(),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = format!("https://127.0.0.1:{port}");
        let admin = As::new(http.clone(), &url, Some(&admin_token));
        nexus_e2e::wait_until(Duration::from_secs(10), "the apiserver", || async {
            http.get(format!("{url}/healthz")).send().await.is_ok_and(|r| r.status().is_success())
        })
        .await;
        let shadow = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "thief"},
                            "spec": {"vcpu": 1, "memMib": 64, "kernel": "/etc/shadow", "rootfs": "/dev/sda"}});
        let (s, body) = admin.call("POST", "/v1/projects/default/vms", Some(&shadow)).await;
        println!(
            "kernel /etc/shadow without dev mode, as cluster admin: {s} {} / {}",
            body["message"], body["suggestion"]
        );
        assert_eq!(s, 403);
        assert!(body["message"].as_str().unwrap().contains("spec.kernel names the host path /etc/shadow"), "{body}");
        assert!(body["suggestion"].as_str().unwrap().contains("image root"), "{body}");
        assert_eq!(admin.call("GET", "/v1/projects/default/vms/thief", None).await.0, 404, "nothing stored");
        let _ = proc.kill();
        let _ = proc.wait();

        // Dev mode: admins may, operators may not.
        let dev = ApiServer::start(&Backend::Sqlite(dir.path().join("dev")), dir.path(), &[]).await;
        let client = dev.client();
        let bind = json!({"apiVersion": "nexus/v1", "kind": "RoleBinding", "metadata": {"name": "ops"},
                          "spec": {"role": "operator", "subjects": ["user:otto"]}});
        let admin = As::at(&dev, dev.admin_token.as_deref());
        assert_eq!(admin.call("POST", "/v1/projects/default/rolebindings", Some(&bind)).await.0, 201);
        let otto = As::at(&dev, Some(&issue(&client, "user:otto").await));
        let (s, body) = otto.call("POST", "/v1/projects/default/vms", Some(&shadow)).await;
        println!("kernel /etc/shadow in dev mode, as operator: {s} {}", body["message"]);
        assert_eq!(s, 403);
        assert!(body["message"].as_str().unwrap().contains("need the admin role"), "{body}");
        let (s, _) = admin.call("POST", "/v1/projects/default/vms", Some(&shadow)).await;
        assert_eq!(s, 201, "an admin in dev mode may name a path (the agent still confines it to its image roots)");
        // An update may keep the paths the object has, not bring new ones.
        let (_, mut stored) = otto.call("GET", "/v1/projects/default/vms/thief", None).await;
        stored["metadata"]["labels"] = json!({"seen": "yes"});
        let (s, kept) = otto.call("PUT", "/v1/projects/default/vms/thief", Some(&stored)).await;
        assert_eq!(s, 200, "the paths it had may stay: {kept}");
        let mut moved = kept.clone();
        moved["spec"]["kernel"] = json!("/etc/passwd");
        let (s, body) = otto.call("PUT", "/v1/projects/default/vms/thief", Some(&moved)).await;
        println!("kernel moved to /etc/passwd in dev mode, as operator: {s} {}", body["message"]);
        assert_eq!(s, 403);
        assert!(body["message"].as_str().unwrap().contains("spec.kernel names the host path /etc/passwd"), "{body}");
        assert!(body["suggestion"].as_str().unwrap().contains("image root"), "{body}");
        let (_, after) = otto.call("GET", "/v1/projects/default/vms/thief", None).await;
        assert_eq!(after["spec"]["kernel"], "/etc/shadow", "nothing stored");
        assert_eq!(after["metadata"]["resourceVersion"], kept["metadata"]["resourceVersion"]);
    });
}

#[test]
fn a_token_is_used_rotated_and_revoked_on_two_apiservers_of_one_postgres() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let backend = Backend::Postgres(pg.fresh_database());
        let a = ApiServer::start(&backend, dir.path(), &[]).await;
        let b = ApiServer::start(&backend, dir.path(), &[]).await;
        let admin_token = a.admin_token.clone().unwrap();
        let admin = a.client();
        let bind = json!({"apiVersion": "nexus/v1", "kind": "RoleBinding", "metadata": {"name": "alice"},
                          "spec": {"role": "viewer", "subjects": ["user:alice"]}});
        assert_eq!(
            As::at(&a, Some(&admin_token)).call("POST", "/v1/projects/p/rolebindings", Some(&bind)).await.0,
            201
        );
        let issued = admin
            .create_token(&TokenRequest {
                subject: Some("user:alice".into()),
                description: "laptop".into(),
                ttl_seconds: None,
            })
            .await
            .unwrap();
        // a and b share a CA (one test directory): one client trusts both.
        let http = a.http();
        let works = |url: &str, token: &str| {
            let c = As::new(http.clone(), url, Some(token));
            async move { c.call("GET", "/v1/projects/p/vms", None).await.0 }
        };
        assert_eq!((works(&a.url, &issued.token).await, works(&b.url, &issued.token).await), (200, 200));
        let listed = admin.list_tokens(Some("user:alice")).await.unwrap().items;
        assert!(listed[0].last_used_at.is_some(), "last use is recorded");
        assert!(serde_json::to_string(&listed).unwrap().find(&issued.token[23..]).is_none(), "never the secret");

        // Rotation: both work during the grace, only the new one after.
        let alice = b.client_with(&issued.token);
        let rotated = alice.rotate_token(&issued.info.id, &RotateRequest { grace_seconds: Some(2) }).await.unwrap();
        for url in [&a.url, &b.url] {
            assert_eq!(works(url, &issued.token).await, 200, "old token in its grace on {url}");
            assert_eq!(works(url, &rotated.token).await, 200, "new token on {url}");
        }
        tokio::time::sleep(Duration::from_millis(2600)).await;
        for url in [&a.url, &b.url] {
            assert_eq!(works(url, &issued.token).await, 401, "old token after its grace on {url}");
            assert_eq!(works(url, &rotated.token).await, 200);
        }
        println!("rotation: both tokens worked on both apiservers for the 2 s grace, then only the new one");

        // Revocation through A: both refuse it within a second.
        admin.revoke_token(&rotated.info.id).await.unwrap();
        let revoked = Instant::now();
        let mut took = BTreeMap::new();
        while took.len() < 2 {
            for (name, url) in [("A", &a.url), ("B", &b.url)] {
                if !took.contains_key(name) && works(url, &rotated.token).await == 401 {
                    took.insert(name, revoked.elapsed());
                }
            }
            assert!(revoked.elapsed() < Duration::from_secs(5), "{took:?}");
        }
        println!("revoked on A: refused by A after {:?}, by B after {:?}", took["A"], took["B"]);
        assert!(took.values().all(|d| *d <= Duration::from_secs(1)), "{took:?}");
    });
}

fn sha256_of(path: &std::path::Path) -> String {
    let out = nexus_e2e::run_ok(std::process::Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_string()
}

async fn vm_status(client: &Client, name: &str) -> nexus_api::VmStatus {
    client.get::<nexus_api::VmSpec>("default", name).await.map(|v| v.status_or_default()).unwrap_or_default()
}

#[test]
fn an_image_whose_checksum_differs_fails_its_vms_and_the_right_one_runs() {
    nexus_e2e::in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = nexus_e2e::Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        // A small disk of its own under the node's image root.
        let disk = std::path::PathBuf::from(format!("/var/lib/nexus/images/checked-{}.ext4", std::process::id()));
        std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
        let right = sha256_of(&disk);
        let image = |name: &str, kind: &str, path: &str, sum: Option<&str>| {
            let mut spec = json!({"type": kind, "path": path});
            if let Some(s) = sum {
                spec["sha256"] = json!(s);
            }
            format!(
                "{}\n---\n",
                json!({"apiVersion": "nexus/v1", "kind": "Image", "metadata": {"name": name}, "spec": spec})
            )
        };
        let vm = |name: &str, rootfs: &str| {
            format!(
                "{}\n---\n",
                json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": name},
                "spec": {"vcpu": 1, "memMib": 64, "kernel": "kernel", "rootfs": rootfs}})
            )
        };
        let file = dir.path().join("images.yaml");
        std::fs::write(
            &file,
            [
                image("kernel", "Kernel", "/var/lib/nexus/images/vmlinux", None),
                image("good-root", "Rootfs", &disk.display().to_string(), Some(&right)),
                image("bad-root", "Rootfs", &disk.display().to_string(), Some(&"0".repeat(64))),
                vm("good", "good-root"),
                vm("bad", "bad-root"),
            ]
            .concat(),
        )
        .unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        nexus_e2e::wait_until(Duration::from_secs(30), "good Running, bad Failed", || async {
            vm_status(&client, "good").await.phase == nexus_api::VmPhase::Running
                && vm_status(&client, "bad").await.phase == nexus_api::VmPhase::Failed
        })
        .await;
        let bad = vm_status(&client, "bad").await;
        let ready = nexus_api::meta::find_condition(&bad.conditions, "Ready").cloned().unwrap();
        println!("bad: {:?} {}: {}", bad.phase, ready.reason, bad.last_error.as_ref().unwrap().message);
        assert_eq!(ready.reason, "ImageInvalid");
        assert!(bad.last_error.unwrap().message.contains(&format!("its sha256 is {right}")));
        // The controller marks the Image right after it fails the VM.
        nexus_e2e::wait_until(Duration::from_secs(10), "the Image marked Invalid", || async {
            client
                .get::<nexus_api::ImageSpec>("default", "bad-root")
                .await
                .is_ok_and(|i| i.status_or_default().phase == nexus_api::image::ImagePhase::Invalid)
        })
        .await;
        let img = client.get::<nexus_api::ImageSpec>("default", "bad-root").await.unwrap().status_or_default();
        println!("image bad-root: {:?} {}", img.phase, img.message.clone().unwrap_or_default());
        let (ok, described, _) = cluster.nexusctl(&["describe", "vm", "bad"]);
        assert!(ok && described.contains("ImageInvalid"), "{described}");

        // The Image is fixed: its VM runs.
        let fixed = [image("bad-root", "Rootfs", &disk.display().to_string(), Some(&right))].concat();
        std::fs::write(&file, fixed).unwrap();
        let (ok, out, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        assert!(out.contains("image/bad-root configured"), "{out}");
        nexus_e2e::wait_until(Duration::from_secs(30), "bad Running once its Image is right", || async {
            vm_status(&client, "bad").await.phase == nexus_api::VmPhase::Running
        })
        .await;
        println!("after the Image's sha256 was corrected, VM bad is Running");

        // A path outside the node's image roots is refused by the node itself.
        let thief = json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "thief"},
                           "spec": {"vcpu": 1, "memMib": 64, "kernel": "/etc/shadow", "rootfs": "/dev/sda"}});
        std::fs::write(&file, thief.to_string()).unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "an admin in dev mode may name it: {err}");
        nexus_e2e::wait_until(Duration::from_secs(30), "thief Failed", || async {
            vm_status(&client, "thief").await.phase == nexus_api::VmPhase::Failed
        })
        .await;
        let thief = vm_status(&client, "thief").await.last_error.unwrap();
        println!("thief: {}", thief.message);
        assert!(thief.message.contains("images must be regular files under /var/lib/nexus/images"), "{thief:?}");
        for name in ["good", "bad", "thief"] {
            let (ok, _, err) = cluster.nexusctl(&["delete", "vm", name, "--wait"]);
            assert!(ok, "{err}");
        }
        let _ = std::fs::remove_file(&disk);
        cluster.stop();
    });
}

#[test]
fn a_vms_history_by_two_users_is_on_record_with_the_viewers_refusal() {
    nexus_e2e::in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = nexus_e2e::Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        let bindings = dir.path().join("bindings.yaml");
        std::fs::write(
            &bindings,
            "apiVersion: nexus/v1\nkind: RoleBinding\nmetadata: {name: ops}\nspec: {role: operator, subjects: [user:alice]}\n---\n\
             apiVersion: nexus/v1\nkind: RoleBinding\nmetadata: {name: watchers}\nspec: {role: viewer, subjects: [user:bob]}\n",
        )
        .unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &bindings.display().to_string()]);
        assert!(ok, "{err}");
        let alice = nexus_e2e::issue_token(&client, "user:alice").await;
        let bob = nexus_e2e::issue_token(&client, "user:bob").await;
        let ctl = |token: &str, args: &[&str]| nexus_e2e::nexusctl(&cluster.server, &cluster.ca, token, args);
        // Alice's VM names Images (raw paths need an admin in dev mode).
        let vm = dir.path().join("vm.yaml");
        std::fs::write(
            &vm,
            "apiVersion: nexus/v1\nkind: Image\nmetadata: {name: kernel}\nspec: {type: Kernel, path: /var/lib/nexus/images/vmlinux}\n---\n\
             apiVersion: nexus/v1\nkind: Image\nmetadata: {name: root}\nspec: {type: Rootfs, path: /var/lib/nexus/images/rootfs.ext4}\n",
        )
        .unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &vm.display().to_string()]);
        assert!(ok, "{err}");
        std::fs::write(&vm, "apiVersion: nexus/v1\nkind: VM\nmetadata: {name: job}\nspec: {vcpu: 1, memMib: 64, kernel: kernel, rootfs: root}\n").unwrap();
        let (ok, out, err) = ctl(&alice, &["apply", "-f", &vm.display().to_string()]);
        assert!(ok, "{err}");
        assert_eq!(out, "vm/job created\n");
        let (ok, _, err) =
            ctl(&alice, &["wait", "vm", "job", "--for=jsonpath={.status.phase}=Running", "--timeout", "30"]);
        assert!(ok, "{err}");
        for (verb, phase) in [("pause", "Paused"), ("resume", "Running"), ("stop", "Stopped")] {
            let (ok, _, err) = ctl(&alice, &[verb, "vm", "job"]);
            assert!(ok, "{verb}: {err}");
            let (ok, _, err) = ctl(
                &alice,
                &["wait", "vm", "job", &format!("--for=jsonpath={{.status.phase}}={phase}"), "--timeout", "30"],
            );
            assert!(ok, "{verb}: {err}");
        }
        let (ok, _, err) = ctl(&bob, &["delete", "vm", "job"]);
        assert!(!ok, "a viewer may not delete");
        assert!(err.contains("Forbidden (403): user:bob may not delete VM job in project default"), "{err}");
        let (ok, _, err) = ctl(&alice, &["delete", "vm", "job", "--wait"]);
        assert!(ok, "{err}");
        let (ok, history, err) = cluster.nexusctl(&["audit", "vm", "job"]);
        assert!(ok, "{err}");
        println!("nexusctl audit vm job:\n{history}");
        let people: Vec<&str> = history.lines().filter(|l| l.contains("user:")).collect();
        let expect = [
            ("user:alice", "create", "allowed 201"),
            ("user:alice", "update", "spec.state: Running -> Paused"),
            ("user:alice", "update", "spec.state: Paused -> Running"),
            ("user:alice", "update", "spec.state: Running -> Stopped"),
            ("user:bob", "delete", "denied 403"),
            ("user:alice", "delete", "allowed 200"),
        ];
        assert_eq!(people.len(), expect.len(), "{people:#?}");
        for (line, (actor, verb, what)) in people.iter().zip(expect) {
            assert!(
                line.contains(actor) && line.contains(verb) && line.contains(what),
                "{line} lacks {actor} {verb} {what}"
            );
        }
        assert!(history.contains("system:controller"), "the controller's steps are there too");
        let (ok, csv, _) = cluster.nexusctl(&["audit", "vm", "job", "-o", "csv"]);
        assert!(ok && csv.starts_with("at,actor,verb,kind,project,name,result,status"), "{csv}");
        cluster.stop();
    });
}

#[test]
fn node_credentials_rotate_without_a_restart_and_calls_keep_working() {
    nexus_e2e::in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster =
            nexus_e2e::Cluster::start_with(dir.path(), "node-a", &["--credential-rotation-secs", "2"]).await;
        let client = cluster.client();
        let (ok, _, err) =
            cluster.nexusctl(&["apply", "-f", &nexus_e2e::repo_root().join("examples/vm.yaml").display().to_string()]);
        assert!(ok, "{err}");
        nexus_e2e::wait_until(Duration::from_secs(30), "hello Running", || async {
            vm_status(&client, "hello").await.phase == nexus_api::VmPhase::Running
        })
        .await;
        let agent_pid = cluster.agent.pid();
        let log = dir.path().join("agent.log");
        nexus_e2e::wait_until(Duration::from_secs(20), "two rotations", || async {
            std::fs::read_to_string(&log).unwrap_or_default().matches("rotated the node token").count() >= 2
        })
        .await;
        // The controller's cached credential is stale now: it reads it again.
        for (state, phase) in [
            (nexus_api::PowerState::Paused, nexus_api::VmPhase::Paused),
            (nexus_api::PowerState::Running, nexus_api::VmPhase::Running),
        ] {
            let mut vm = client.get::<nexus_api::VmSpec>("default", "hello").await.unwrap();
            vm.spec.state = state;
            client.replace(&vm).await.unwrap();
            nexus_e2e::wait_until(Duration::from_secs(20), "the power change", || async {
                vm_status(&client, "hello").await.phase == phase
            })
            .await;
        }
        assert_eq!(cluster.agent.pid(), agent_pid, "the same agent process");
        let node = client.get::<nexus_api::NodeSpec>("", "node-a").await.unwrap().status_or_default();
        assert!(node.is_ready(chrono::Utc::now(), chrono::Duration::seconds(4)), "still heartbeating");
        let tokens = client.list_tokens(Some("node:node-a")).await.unwrap().items;
        let rotated = tokens.iter().filter(|t| t.replaced_by.is_some()).count();
        println!(
            "node-a's tokens: {} issued, {rotated} rotated away; the VM paused and resumed across rotations",
            tokens.len()
        );
        assert!(rotated >= 2);
        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "hello", "--wait"]);
        assert!(ok, "{err}");
        cluster.stop();
    });
}

/// Each first use of a token costs the apiserver a 19 MiB Argon2 block on a
/// thread of its own. A burst of them (new tokens, each used by several
/// requests at once) must not leave that memory with the process.
#[test]
fn a_burst_of_first_token_checks_leaves_the_apiserver_small() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let server = ApiServer::start(&Backend::Sqlite(dir.path().join("data")), dir.path(), &[]).await;
        let admin = server.client();
        let mut tokens = Vec::new();
        for i in 0..12 {
            tokens.push(issue(&admin, &format!("user:burst-{i}")).await);
        }
        let callers: Vec<As> = tokens.iter().flat_map(|t| (0..4).map(|_| As::at(&server, Some(t)))).collect();
        let answers = futures::future::join_all(
            callers.iter().map(|who| async move { who.call("GET", "/v1/whoami", None).await.0 }),
        )
        .await;
        assert!(answers.iter().all(|code| *code == 200), "{answers:?}");
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.proc.pid())).unwrap();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        // 60 checks of 19 MiB: about 1.1 GiB if the blocks stayed.
        assert!(rss_kib < 150 * 1024, "the apiserver holds {rss_kib} KiB after the checks");
    });
}
