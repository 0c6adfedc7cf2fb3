//! The whole authorization matrix: every role, every verb, every kind, on
//! the caller's own project and another.

use super::*;

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
