//! The guarded proxy to each VMM, its logs and metrics, and a corpus of
//! traversal paths that must touch nothing outside the run directory.

use super::*;

#[test]
fn the_proxy_passes_allowed_calls_and_logs_and_metrics_are_served() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        agent.ensure(&request(UID)).await;
        let (s, body) = agent.call("GET", &format!("/v1/vms/{UID}/proxy/"), None).await;
        assert_eq!(s, 200, "{body}");
        assert!(body.contains("\"state\":\"Running\""), "{body}");
        let (s, body) = agent.call("GET", &format!("/v1/vms/{UID}/proxy/vm/config"), None).await;
        assert_eq!(s, 200, "{body}");
        let paused = serde_json::json!({"state": "Paused"});
        assert_eq!(agent.call("PATCH", &format!("/v1/vms/{UID}/proxy/vm"), Some(&paused)).await.0, 204);
        // Firecracker's own refusal comes back as it was.
        let (s, body) = agent
            .call("PATCH", &format!("/v1/vms/{UID}/proxy/vm"), Some(&serde_json::json!({"state": "Sleeping"})))
            .await;
        assert_eq!(s, 400);
        assert!(body.contains("fault_message") && body.contains("Sleeping"), "{body}");
        let (s, body) = agent
            .call(
                "PUT",
                &format!("/v1/vms/{UID}/proxy/machine-config"),
                Some(&serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64})),
            )
            .await;
        assert_eq!(s, 403, "not allow-listed: {body}");

        let (s, console) = agent.call("GET", &format!("/v1/vms/{UID}/logs?file=console&tail=50"), None).await;
        assert_eq!(s, 200);
        assert!(console.contains("Linux version"), "{console}");
        let (s, log) = agent.call("GET", &format!("/v1/vms/{UID}/logs?tail=3"), None).await;
        assert_eq!((s, log.lines().count()), (200, 3), "{log}");
        let (s, m) = agent.call("GET", &format!("/v1/vms/{UID}/metrics?flush=true"), None).await;
        assert_eq!(s, 200, "{m}");
        assert!(m.contains("utc_timestamp_ms"), "{m}");
        // follow: existing lines, then new ones as the guest writes them.
        assert_eq!(
            agent
                .call("PATCH", &format!("/v1/vms/{UID}/proxy/vm"), Some(&serde_json::json!({"state": "Resumed"})))
                .await
                .0,
            204
        );
        let resp = agent
            .http
            .get(format!("https://{ADDR}/v1/vms/{UID}/logs?file=console&tail=1&follow=true"))
            .bearer_auth(&agent.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
        let mut stream = resp.bytes_stream();
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lines().count() < 3 && Instant::now() < deadline {
            use futures::StreamExt;
            if let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(3), stream.next()).await {
                seen.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
        assert!(seen.lines().count() >= 3, "the tail line and two new ones: {seen}");
        assert!(seen.contains("guest alive"), "{seen}");

        // Nothing of the caller's request but method, path and body reaches
        // the VMM: not its Host, not its credential.
        let rec_uid = "00000000-0000-4000-8000-000000000002";
        let rec_dir = agent.run_dir().join("vms").join(rec_uid).join("root/run");
        std::fs::create_dir_all(&rec_dir).unwrap();
        let recorder = tokio::net::UnixListener::bind(rec_dir.join("fc.sock")).unwrap();
        let captured = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut conn, _) = recorder.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap();
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let (s, _) = agent.call("GET", &format!("/v1/vms/{rec_uid}/proxy/version"), None).await;
        assert_eq!(s, 200);
        let seen = captured.await.unwrap();
        assert!(seen.starts_with("GET /version HTTP/1.1\r\n"), "{seen}");
        assert!(seen.to_lowercase().contains("host: localhost\r\n"), "{seen}");
        assert!(
            !seen.contains(ADDR) && !seen.contains(&agent.token) && !seen.to_lowercase().contains("authorization"),
            "{seen}"
        );

        // A VMM that accepts but never answers: 504.
        let mute_uid = "00000000-0000-4000-8000-000000000001";
        let mute_dir = agent.run_dir().join("vms").join(mute_uid).join("root/run");
        std::fs::create_dir_all(&mute_dir).unwrap();
        let _mute = tokio::net::UnixListener::bind(mute_dir.join("fc.sock")).unwrap();
        let t = Instant::now();
        let (s, body) = agent.call("GET", &format!("/v1/vms/{mute_uid}/proxy/"), None).await;
        assert_eq!(s, 504, "{body}");
        assert!(t.elapsed() < Duration::from_secs(10));
    });
}

#[test]
fn a_path_traversal_corpus_is_refused_and_nothing_outside_the_run_dir_is_touched() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &[]).await;
        agent.ensure(&request(UID)).await;
        // Bait outside the run directory: a file and a listening socket.
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "untouched").unwrap();
        let bait = tokio::net::UnixListener::bind(outside.join("fc.sock")).unwrap();
        // A VM directory whose socket is a symlink to the bait (as a
        // VMM could leave in its jail's run/).
        let sym_uid = "00000000-0000-4000-8000-00000000000a";
        let sym_dir = agent.run_dir().join("vms").join(sym_uid).join("root/run");
        std::fs::create_dir_all(&sym_dir).unwrap();
        std::os::unix::fs::symlink(outside.join("fc.sock"), sym_dir.join("fc.sock")).unwrap();
        // A VM directory that is itself a symlink to the outside.
        let dirlink_uid = "00000000-0000-4000-8000-00000000000b";
        std::os::unix::fs::symlink(&outside, agent.run_dir().join("vms").join(dirlink_uid)).unwrap();
        let before: Vec<(PathBuf, std::time::SystemTime)> = walk(dir.path(), &agent.run_dir());

        let long = "a".repeat(5000);
        let uids = [
            "..",
            "..%2F..",
            "%2e%2e",
            "%2e%2e%2fetc",
            "..%252f",
            "%00",
            "abc%00def",
            "/etc/passwd",
            "%2Fetc%2Fpasswd",
            "7F0C9A52-3A43-4D1B-9D44-0C3F0E7D1A11",
            "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11%00",
            &long,
            "~root",
            "*",
        ];
        let mut cases: Vec<(String, String, u16)> = Vec::new();
        for u in uids {
            for (m, p) in [
                ("GET", format!("/v1/vms/{u}")),
                ("PUT", format!("/v1/vms/{u}")),
                ("DELETE", format!("/v1/vms/{u}")),
                ("GET", format!("/v1/vms/{u}/proxy/")),
                ("GET", format!("/v1/vms/{u}/logs")),
                ("GET", format!("/v1/vms/{u}/metrics")),
            ] {
                cases.push((m.to_string(), p, 0));
            }
        }
        for fc in [
            "..",
            "../..",
            "..%2F..%2Fetc%2Fpasswd",
            "%2e%2e/%2e%2e",
            "vm/..",
            "vm/%2e%2e",
            "drives/..%2f..%2fetc",
            "snapshot/create",
            "snapshot/load",
            "vm%2Fconfig",
            "./vm",
            "vm//config",
            "%00",
            &long,
            "boot-source",
            "logger",
        ] {
            cases.push(("GET".into(), format!("/v1/vms/{UID}/proxy/{fc}"), 0));
            cases.push(("PUT".into(), format!("/v1/vms/{UID}/proxy/{fc}"), 0));
        }
        cases.push(("PUT".into(), format!("/v1/vms/{UID}/proxy/machine-config"), 403));
        cases.push(("GET".into(), format!("/v1/vms/{sym_uid}/proxy/"), 403));
        cases.push(("GET".into(), format!("/v1/vms/{dirlink_uid}/proxy/"), 403));
        cases.push(("GET".into(), format!("/v1/vms/{dirlink_uid}"), 403));
        cases.push(("DELETE".into(), format!("/v1/vms/{dirlink_uid}"), 403));
        cases.push(("GET".into(), format!("/v1/vms/{dirlink_uid}/logs?file=console"), 403));
        for name in ["..", "..%2F..%2Fetc", "%2e%2e", "a%00b", "Bad_Name", "x%2Fy", &long] {
            cases.push(("PUT".into(), format!("/v1/snapshots/{name}"), 0));
            cases.push(("DELETE".into(), format!("/v1/snapshots/{name}"), 0));
        }
        for q in [
            "file=..%2F..%2Fetc%2Fpasswd",
            "file=%2Fetc%2Fpasswd",
            "file=console&tail=99999999",
            "tail=-1",
            "file=fc.sock",
            "path=/etc/passwd",
        ] {
            cases.push(("GET".into(), format!("/v1/vms/{UID}/logs?{q}"), 0));
        }
        let mut refused = 0;
        // Names and paths in bodies: restores, and the garbage collector's lists.
        for snap in ["..", "../../outside", "/etc", "a/b", ""] {
            let mut r = request("00000000-0000-4000-8000-0000000000e5");
            r.mac = "06:00:ac:10:00:0e".into();
            r.restore = Some(nexus_api::agent::RestoreFrom { snapshot_uid: snap.into(), origin: None });
            let (status, answer) = agent
                .raw("PUT", "/v1/vms/00000000-0000-4000-8000-0000000000e5", Some(&serde_json::to_value(&r).unwrap()))
                .await;
            assert!((400..500).contains(&status), "restore from {snap:?} was not refused: {status} {answer}");
            refused += 1;
        }
        for vm_uid in ["..", "../../outside", "/etc"] {
            let body = serde_json::json!({"vmUid": vm_uid});
            let (status, answer) =
                agent.raw("PUT", "/v1/snapshots/00000000-0000-4000-8000-0000000000f6", Some(&body)).await;
            assert!((400..500).contains(&status), "a snapshot of VM {vm_uid:?} was not refused: {status} {answer}");
            refused += 1;
        }
        let outside_secret = outside.join("secret").display().to_string();
        let outside_sock = outside.join("fc.sock").display().to_string();
        let via_dotdot = format!("{}/../outside/fc.sock", agent.run_dir().display());
        for body in [
            serde_json::json!({"uids": [".."]}),
            serde_json::json!({"uids": ["../../outside"]}),
            serde_json::json!({"taps": ["eth0"]}),
            serde_json::json!({"taps": ["nxbr0"]}),
            serde_json::json!({"sockets": [outside_secret]}),
            serde_json::json!({"sockets": [outside_sock]}),
            serde_json::json!({"sockets": [via_dotdot]}),
            serde_json::json!({"sockets": ["/etc/passwd"]}),
        ] {
            let (status, answer) = agent.raw("POST", "/v1/gc", Some(&body)).await;
            assert!((400..500).contains(&status), "gc {body} was not refused: {status} {answer}");
            refused += 1;
        }
        assert!(host::links().iter().any(|l| l.name == "nxbr0"), "the bridge survives");
        let drive = serde_json::json!({"drive_id": "rootfs", "path_on_host": outside.join("secret")});
        let start = serde_json::json!({"action_type": "InstanceStart"});
        let snapshot = serde_json::json!({"snapshot_path": outside.join("snap"), "mem_file_path": outside.join("mem")});
        let mut planted = serde_json::to_value(request(dirlink_uid)).unwrap();
        let (status, answer) = agent.raw("PUT", &format!("/v1/vms/{dirlink_uid}"), Some(&planted)).await;
        assert_eq!(status, 403, "ensure through a planted symlink: {answer}");
        planted["uid"] = serde_json::json!(UID);
        let (status, _) = agent.raw("PUT", &format!("/v1/vms/{dirlink_uid}"), Some(&planted)).await;
        assert_eq!(status, 422, "body and path uids differ");
        refused += 3;
        for (method, path, want) in &cases {
            let body = (method == "PUT").then(|| serde_json::json!({}));
            let body = if path.contains("/snapshots/") { Some(serde_json::json!({"resumeAfter": true})) } else { body };
            let (status, answer) = agent.raw(method, path, body.as_ref()).await;
            assert!((400..500).contains(&status), "{method} {path} was not refused: {status} {answer}");
            if *want != 0 {
                assert_eq!(status, *want, "{method} {path}: {answer}");
            }
            refused += 1;
        }
        for (method, path, body) in [
            ("PATCH", format!("/v1/vms/{UID}/proxy/drives/rootfs"), &drive),
            ("PUT", format!("/v1/vms/{UID}/proxy/actions"), &start),
            ("PUT", format!("/v1/vms/{UID}/proxy/snapshot/create"), &snapshot),
        ] {
            let (status, answer) = agent.raw(method, &path, Some(body)).await;
            assert!((400..500).contains(&status), "{method} {path} with {body} was not refused: {status} {answer}");
            refused += 1;
        }
        println!("{refused} requests refused");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), bait.accept()).await.is_err(),
            "nothing connected to a socket outside the run dir"
        );
        assert_eq!(std::fs::read_to_string(outside.join("secret")).unwrap(), "untouched");
        assert!(!outside.join("snap").exists() && !outside.join("mem").exists());
        assert_eq!(walk(dir.path(), &agent.run_dir()), before, "nothing outside the run directory changed");
    });
}

/// Every path under `root` but outside `run`, with its modification time.
fn walk(root: &Path, run: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.starts_with(run) || p.file_name().is_some_and(|n| n == "agent.log") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            out.push((p.clone(), meta.modified().unwrap()));
            if meta.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}
