//! Observability through the control plane, on the simulated VMM: a VM's
//! console followed with `nexusctl logs -f` across a VMM restart until the
//! VM is deleted; per-VM Prometheus series on the agent and `nexusctl top`;
//! one request id in the logs of all three processes; Events that expire.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nexus_api::{EventSpec, VmPhase, VmSpec};
use nexus_e2e::{ApiServer, Backend, Cluster, ClusterOptions, bin, in_private_netns, wait_until};

fn vm_yaml(name: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  vcpu: 1\n  memMib: 128\n  \
         kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n  network:\n    ip: auto\n"
    )
}

async fn running(client: &nexus_client::Client, name: &str) -> bool {
    client.get::<VmSpec>("default", name).await.is_ok_and(|v| v.status_or_default().phase == VmPhase::Running)
}

/// Waits for a line containing `needle` from `lines`; returns it and when.
fn expect_line(lines: &mpsc::Receiver<(Instant, String)>, needle: &str, within: Duration) -> (Instant, String) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((at, line)) if line.contains(needle) => return (at, line),
            Ok(_) => {}
            Err(e) => panic!("no line with {needle:?} within {within:?}: {e}"),
        }
    }
}

#[test]
fn logs_follow_a_vm_across_a_vmm_restart_and_end_when_it_is_deleted() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path(), "node-1").await;
        let client = cluster.client();
        let file = dir.path().join("chatty.yaml");
        std::fs::write(&file, vm_yaml("chatty")).unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        wait_until(Duration::from_secs(30), "the VM to run", || running(&client, "chatty")).await;

        // A short tail first: small file, first bytes measured.
        let started = Instant::now();
        let (ok, out, err) = cluster.nexusctl(&["logs", "vm", "chatty", "--tail", "3"]);
        assert!(ok, "{err}");
        println!("nexusctl logs --tail 3 ({} ms, process start included):\n{out}", started.elapsed().as_millis());
        assert_eq!(out.lines().count(), 3, "{out}");
        let (ok, vmm_log, err) = cluster.nexusctl(&["logs", "vm", "chatty", "--vmm", "--since", "5m"]);
        assert!(ok && !vmm_log.is_empty(), "{err}");
        let (ok, _, err) = cluster.nexusctl(&["logs", "vm", "chatty", "--since", "5m"]);
        assert!(!ok && err.contains("--vmm"), "--since without --vmm: {err}");

        let mut follow = Command::new(bin("nexusctl"))
            .args(["--server", &cluster.server, "--certificate-authority"])
            .arg(&cluster.ca)
            .args(["logs", "vm", "chatty", "-f", "--tail", "100"])
            .env("NEXUS_TOKEN", &cluster.admin_token)
            .env_remove("NEXUS_CONTEXT")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let spawned = Instant::now();
        let stdout = follow.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("  | {line}");
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let (first, _) = expect_line(&lines, "login: booted", Duration::from_secs(10));
        println!("first line {} ms after nexusctl started", (first - spawned).as_millis());
        assert!(first - spawned < Duration::from_secs(2));
        // New lines as the guest prints them (one a second).
        let (at, _) = expect_line(&lines, "guest alive", Duration::from_secs(5));
        let (next, _) = expect_line(&lines, "guest alive", Duration::from_secs(5));
        println!("new console lines arrived {} ms apart", (next - at).as_millis());

        // SIGKILL the VMM: the restart policy starts another; the stream says so and goes on.
        let vmms = nexus_e2e::host::vmm_processes_under(&cluster.run_dir);
        assert_eq!(vmms.len(), 1, "{vmms:?}");
        let killed = Instant::now();
        nexus_e2e::host::sigkill(vmms[0].0);
        let (marker_at, marker) = expect_line(&lines, "[nexus] the VMM was started again", Duration::from_secs(15));
        println!("{} ms after SIGKILL: {marker}", (marker_at - killed).as_millis());
        expect_line(&lines, "login: booted", Duration::from_secs(10));
        expect_line(&lines, "guest alive", Duration::from_secs(5));

        // Deleting the VM ends the stream, and nexusctl exits 0.
        let deleted = Instant::now();
        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "chatty"]);
        assert!(ok, "{err}");
        expect_line(&lines, "[nexus] the VM was deleted", Duration::from_secs(20));
        let status = loop {
            if let Some(s) = follow.try_wait().unwrap() {
                break s;
            }
            assert!(deleted.elapsed() < Duration::from_secs(20), "nexusctl logs -f did not exit");
            std::thread::sleep(Duration::from_millis(50));
        };
        println!("nexusctl logs -f exited with {status} {} ms after the delete", deleted.elapsed().as_millis());
        assert!(status.success());
    });
}

#[test]
fn per_vm_metrics_reach_prometheus_and_top_and_one_request_id_crosses_every_process() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let opts = ClusterOptions { agent_args: &["--metrics-interval-secs", "1"], ..Default::default() };
        let cluster = Cluster::start_opts(dir.path(), "node-1", &opts).await;
        let client = cluster.client();
        let http = nexus_e2e::https_client(&cluster.ca);

        // The apiserver is ready: storage answers and node-1 is Ready.
        let ready = http.get(format!("{}/readyz", cluster.server)).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        let agent = format!("https://{}", nexus_e2e::AGENT_ADDR);
        let ready = http.get(format!("{agent}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "the agent's bridge and run dir are in order");

        let trace = "obs-trace-7f3a";
        for name in ["m-1", "m-2", "m-3"] {
            let file = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&file, vm_yaml(name)).unwrap();
            let id = if name == "m-1" { trace.to_string() } else { format!("obs-other-{name}") };
            let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string(), "--request-id", &id]);
            assert!(ok, "{err}");
        }
        for name in ["m-1", "m-2", "m-3"] {
            wait_until(Duration::from_secs(30), "the VMs to run", || running(&client, name)).await;
        }

        // The agent's /metrics: every VM's series, labelled.
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        wait_until(Duration::from_secs(15), "three VMs' block reads on the agent's /metrics", || {
            let (http, agent, text) = (http.clone(), agent.clone(), text.clone());
            async move {
                let body = http.get(format!("{agent}/metrics")).send().await.unwrap().text().await.unwrap();
                let all = ["m-1", "m-2", "m-3"].iter().all(|vm| {
                    body.lines().any(|l| {
                        l.starts_with("nexus_vm_block_read_bytes_total{")
                            && l.contains(&format!("vm=\"{vm}\""))
                            && !l.ends_with(" 0")
                    })
                });
                *text.lock().unwrap() = body;
                all
            }
        })
        .await;
        let text = text.lock().unwrap().clone();
        let series: Vec<&str> = text.lines().filter(|l| l.contains("vm=\"m-1\"")).collect();
        println!("the agent's /metrics for m-1 ({} series):\n{}", series.len(), series.join("\n"));
        for family in [
            "nexus_vm_up",
            "nexus_vm_cpu_seconds_total",
            "nexus_vm_memory_rss_bytes",
            "nexus_vm_vcpu_exits_io_in_total",
            "nexus_vm_block_write_bytes_total",
            "nexus_vm_net_rx_bytes_total",
            "nexus_vm_net_tx_throttled_total",
        ] {
            for vm in ["m-1", "m-2", "m-3"] {
                let labels = format!("{{node=\"node-1\",project=\"default\",vm=\"{vm}\",uid=\"");
                assert!(text.contains(&format!("{family}{labels}")), "{family} for {vm} missing:\n{text}");
            }
        }

        // Recent values through the apiserver, as the VM's readers see them.
        // Rates need two samples of each VM.
        for vm in ["m-1", "m-2", "m-3"] {
            wait_until(Duration::from_secs(15), "rates of every VM", || async {
                let path = format!("/v1/projects/default/vms/{vm}/metrics");
                client.raw::<nexus_api::agent::VmStats>(reqwest::Method::GET, &path, None).await.is_ok_and(|s| {
                    s.cpu_percent.is_some() && s.rates_per_second.get("block_read_bytes").is_some_and(|r| *r > 0.0)
                })
            })
            .await;
        }
        let stats: nexus_api::agent::VmStats =
            client.raw(reqwest::Method::GET, "/v1/projects/default/vms/m-2/metrics", None).await.unwrap();
        println!("GET /v1/projects/default/vms/m-2/metrics: {}", serde_json::to_string(&stats).unwrap());
        assert!(stats.rss_bytes > 0 && stats.counters["block_read_bytes"] > 0.0, "{stats:?}");
        let (ok, top, err) = cluster.nexusctl(&["top", "vms"]);
        assert!(ok, "{err}");
        println!("nexusctl top vms:\n{top}");
        assert_eq!(top.lines().count(), 4, "{top}");
        assert!(top.lines().skip(1).all(|l| l.contains("node-1") && l.contains("Mi") && l.contains("Ki/s")), "{top}");
        let (ok, top, err) = cluster.nexusctl(&["top", "nodes"]);
        assert!(ok, "{err}");
        println!("nexusctl top nodes:\n{top}");
        assert!(top.lines().nth(1).is_some_and(|l| l.starts_with("node-1") && l.contains('%')), "{top}");
        // Reading logs and metrics takes reading the VM: someone with no
        // role in the project gets 403, and nothing of the VM.
        let bob = nexus_e2e::issue_token(&client, "user:bob").await;
        let (ok, out, err) = nexus_e2e::nexusctl(&cluster.server, &cluster.ca, &bob, &["logs", "vm", "m-1"]);
        println!("logs as user:bob (no role): {}", err.trim());
        assert!(!ok && out.is_empty() && err.contains("may not get"), "{err}");
        let (ok, _, err) = nexus_e2e::nexusctl(&cluster.server, &cluster.ca, &bob, &["top", "vms"]);
        assert!(!ok && err.contains("may not list"), "{err}");
        let denied = http
            .get(format!("{}/v1/projects/default/vms/m-1/metrics", cluster.server))
            .bearer_auth(&bob)
            .send()
            .await
            .unwrap();
        assert_eq!(denied.status(), 403);
        // A VM that does not exist: the error contract, not an empty table.
        let (ok, _, err) = cluster.nexusctl(&["logs", "vm", "nope"]);
        assert!(!ok && err.contains("not found"), "{err}");

        // One request id, from nexusctl through every process.
        let found: Vec<(&str, String)> = ["apiserver.log", "controller.log", "agent.log"]
            .iter()
            .map(|f| {
                let log = std::fs::read_to_string(dir.path().join(f)).unwrap();
                let line = log.lines().find(|l| l.contains(trace)).map(str::to_string);
                (*f, line.unwrap_or_default())
            })
            .collect();
        for (file, line) in &found {
            println!("{file}: {line}");
        }
        assert!(found.iter().all(|(_, line)| !line.is_empty()), "{}", cluster.logs());
        let agent_log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
        let fc_call = agent_log
            .lines()
            .find(|l| l.contains(trace) && l.contains("firecracker call") && l.contains("InstanceStart"));
        let fc_call = fc_call.or_else(|| {
            agent_log.lines().find(|l| l.contains(trace) && l.contains("firecracker call") && l.contains("/actions"))
        });
        println!("the agent's Firecracker call under it: {}", fc_call.unwrap_or("<none>"));
        assert!(fc_call.is_some_and(|l| l.contains("latency_ms") && l.contains("upstream_status")));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_expire_after_their_ttl_so_churn_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        ApiServer::start(&Backend::Sqlite(dir.path().to_path_buf()), dir.path(), &["--event-ttl", "10s"]).await;
    let client = server.client();

    // No node: not ready (the default), with a reason.
    let ready = server.http().get(format!("{}/readyz", server.url)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    println!("/readyz without a node: {body}");
    assert!(body["message"].as_str().unwrap().contains("no node is Ready"));

    // 10,000 Events at 200 a second, counted every 2 s meanwhile.
    let total = 10_000;
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let counter = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut counts = Vec::new();
            let started = Instant::now();
            loop {
                let n = client.list::<EventSpec>(None, &Default::default()).await.map(|l| l.items.len()).unwrap_or(0);
                counts.push((started.elapsed().as_secs(), n));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => return counts,
                }
            }
        })
    };
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for batch in 0..total / 20 {
        tick.tick().await;
        let creates = (0..20).map(|i| {
            let client = client.clone();
            let n = batch * 20 + i;
            async move {
                let now = chrono::Utc::now();
                let event: nexus_api::Event = serde_json::from_value(serde_json::json!({
                    "apiVersion": "nexus/v1", "kind": "Event",
                    "metadata": {"name": format!("churn-{n}")},
                    "spec": {"involvedObject": {"kind": "VM", "name": format!("vm-{}", n % 50), "project": "default"},
                             "type": "Normal", "reason": "Churn", "message": "one of many", "count": 1,
                             "firstTimestamp": now, "lastTimestamp": now, "reportingComponent": "test"}
                }))
                .unwrap();
                client.create(&event).await.unwrap();
            }
        });
        futures::future::join_all(creates).await;
    }
    println!("created {total} Events in {:.1} s", started.elapsed().as_secs_f64());
    wait_until(Duration::from_secs(90), "every Event to expire", || async {
        client.list::<EventSpec>(None, &Default::default()).await.is_ok_and(|l| l.items.is_empty())
    })
    .await;
    let _ = stop_tx.send(true);
    let counts = counter.await.unwrap();
    let line: Vec<String> = counts.iter().map(|(t, n)| format!("{t}s:{n}")).collect();
    println!("Events stored over time (TTL 10 s): {}", line.join(" "));
    let peak = counts.iter().map(|(_, n)| *n).max().unwrap();
    println!("peak {peak} of {total} created; 0 left {:.1} s after the start", started.elapsed().as_secs_f64());
    assert!(peak < total / 2, "the store kept {peak} Events at once");
}
