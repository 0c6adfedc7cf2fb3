//! OpenTelemetry export, on when an endpoint is configured: a collector
//! (a small OTLP/HTTP receiver here) gets the spans of the apiserver, the
//! controller and the node agent, and one user request's id is on spans of
//! all three.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_api::{VmPhase, VmSpec};
use nexus_e2e::{Cluster, in_private_netns, wait_until};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Accepts OTLP/HTTP posts on `listener` and keeps their bodies.
async fn collect(listener: tokio::net::TcpListener, bodies: Arc<Mutex<Vec<Value>>>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { return };
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                // One request: headers, then Content-Length bytes.
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let mut chunk = [0u8; 8192];
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    let mut chunk = [0u8; 65536];
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    bodies.lock().unwrap().push(v);
                }
                let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                if conn.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// (service, span name, request_id) of every span received.
fn spans(bodies: &[Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    let text = |v: &Value| v["value"]["stringValue"].as_str().unwrap_or_default().to_string();
    for body in bodies {
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .map(text)
                .unwrap_or_default();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    let id = span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "request_id")
                        .map(text)
                        .unwrap_or_default();
                    out.insert((service.clone(), span["name"].as_str().unwrap_or_default().to_string(), id));
                }
            }
        }
    }
    out
}

#[test]
fn spans_of_every_process_reach_the_collector_with_the_request_id() {
    let port = nexus_e2e::free_port();
    // SAFETY: the only test of this binary, before it starts any thread;
    // the processes it starts inherit the variables.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"));
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
    }
    in_private_netns(move || async move {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        tokio::spawn(collect(listener, bodies.clone()));
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path(), "node-1").await;
        let client = cluster.client();
        let file = dir.path().join("vm.yaml");
        std::fs::write(
            &file,
            "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: traced\nspec:\n  vcpu: 1\n  memMib: 128\n  \
             kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n",
        )
        .unwrap();
        let trace = "otel-trace-5c21";
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string(), "--request-id", trace]);
        assert!(ok, "{err}");
        wait_until(Duration::from_secs(30), "the VM to run", || async {
            client
                .get::<VmSpec>("default", "traced")
                .await
                .is_ok_and(|v| v.status_or_default().phase == VmPhase::Running)
        })
        .await;
        let services = ["nexus-apiserver", "nexus-controller", "nexus-nodeagent"];
        wait_until(Duration::from_secs(20), "spans with the request id from all three processes", || {
            let bodies = bodies.clone();
            async move {
                let seen = spans(&bodies.lock().unwrap());
                services.iter().all(|s| seen.iter().any(|(svc, _, id)| svc == s && id == trace))
            }
        })
        .await;
        let seen = spans(&bodies.lock().unwrap());
        let traced: Vec<_> = seen.iter().filter(|(_, _, id)| id == trace).collect();
        println!(
            "{} export posts, {} distinct spans; with request_id {trace}:",
            bodies.lock().unwrap().len(),
            seen.len()
        );
        for (svc, name, _) in &traced {
            println!("  {svc}: {name}");
        }
    });
}
