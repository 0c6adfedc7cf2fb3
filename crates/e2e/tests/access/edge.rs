//! Anonymous callers (401, nothing changed, audited) and raw host paths
//! (dev mode and an admin only).

use super::*;

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
