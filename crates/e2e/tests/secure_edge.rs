//! The API edge as a deployed cluster has it: every hop over HTTPS, plain
//! HTTP and foreign CAs refused, and a noisy user held to its budget
//! without slowing the controller down.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nexus_api::{NodeSpec, VmPhase, VmSpec};
use nexus_client::{Event, ListParams};
use nexus_e2e::{AGENT_ADDR, APISERVER_ADDR, Cluster, in_private_netns};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn vm(name: &str, batch: &str) -> Value {
    json!({"apiVersion": "nexus/v1", "kind": "VM",
           "metadata": {"name": name, "labels": {"batch": batch}},
           "spec": {"vcpu": 1, "memMib": 64, "kernel": "/var/lib/nexus/images/vmlinux",
                    "rootfs": "/var/lib/nexus/images/rootfs.ext4"}})
}

/// Sends a plain-HTTP GET to `addr`; the whole answer.
async fn plain_get(addr: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

#[test]
fn every_hop_is_https_and_plain_http_or_a_foreign_ca_is_refused() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        // nexusctl → apiserver (HTTPS, the cluster CA) → controller →
        // agent (HTTPS, its certificate from the same CA).
        assert!(cluster.server.starts_with("https://"), "{}", cluster.server);
        let node = cluster.client().get::<NodeSpec>("", "node-a").await.unwrap();
        let address = node.status_or_default().address;
        println!("apiserver at {}, the node's agent at {address}", cluster.server);
        assert_eq!(address, format!("https://{AGENT_ADDR}"));
        let file = dir.path().join("vm.yaml");
        std::fs::write(&file, serde_json::to_string(&vm("over-tls", "tls")).unwrap()).unwrap();
        let (ok, out, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        assert_eq!(out.trim(), "vm/over-tls created");
        let (ok, _, err) = cluster.nexusctl(&[
            "wait",
            "vm",
            "over-tls",
            "--for",
            "jsonpath={.status.phase}=Running",
            "--timeout",
            "30",
        ]);
        assert!(ok, "{err}\n{}", cluster.logs());

        // Plain HTTP to either TLS port: a 400 that says to use https.
        for (what, addr) in [("apiserver", APISERVER_ADDR), ("agent", AGENT_ADDR)] {
            let answer = plain_get(addr).await;
            let status_line = answer.lines().next().unwrap_or_default().to_string();
            println!("plain HTTP to the {what}'s port: {status_line}");
            assert_eq!(status_line, "HTTP/1.1 400 Bad Request", "{answer}");
            assert!(answer.contains("this port serves HTTPS"), "{answer}");
        }

        // A client trusting another CA is refused before it sends a token.
        let other_ca = nexus_e2e::init_pki(&dir.path().join("other-pki"));
        let (ok, _, err) = nexus_e2e::nexusctl(&cluster.server, &other_ca, &cluster.admin_token, &["get", "vms"]);
        println!("nexusctl with another cluster's CA: {}", err.trim());
        assert!(!ok);
        assert!(err.contains("UnknownIssuer"), "{err}");
        // So is a controller given the wrong CA: it cannot reach the
        // apiserver, says why, and acts on nothing.
        let token = dir.path().join("controller.token");
        let mut wrong = nexus_e2e::spawn_controller(
            &cluster.server,
            &other_ca,
            &token,
            "127.0.0.1:7446",
            &dir.path().join("wrong-ca.log"),
        );
        nexus_e2e::wait_until(Duration::from_secs(10), "the misconfigured controller to report", || async {
            std::fs::read_to_string(dir.path().join("wrong-ca.log")).unwrap_or_default().contains("UnknownIssuer")
        })
        .await;
        wrong.stop();

        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "over-tls", "--wait"]);
        assert!(ok, "{err}");
        cluster.stop();
    });
}

/// Creates `n` VMs of batch `batch` and returns each one's time from its
/// create to Running, in ms, sorted.
async fn create_and_time(cluster: &Cluster, batch: &str, n: usize) -> Vec<u128> {
    let client = cluster.client();
    let list = client.list::<VmSpec>(Some("default"), &ListParams::default()).await.unwrap();
    let params = ListParams { label_selector: Some(format!("batch={batch}")), ..Default::default() };
    let watch = client.watch::<VmSpec>(Some("default"), &params, list.metadata.resource_version.as_deref()).await;
    let mut watch = std::pin::pin!(watch.unwrap());
    let mut created = BTreeMap::new();
    for i in 0..n {
        let name = format!("{batch}-{i}");
        created.insert(name.clone(), Instant::now());
        let _: Value =
            client.raw(reqwest::Method::POST, "/v1/projects/default/vms", Some(&vm(&name, batch))).await.unwrap();
    }
    let mut took = BTreeMap::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while took.len() < n {
            let Some(Ok(Event::Added(v) | Event::Modified(v))) = watch.next().await else { continue };
            if v.status_or_default().phase == VmPhase::Running && !took.contains_key(v.name()) {
                took.insert(v.name().to_string(), created[v.name()].elapsed().as_millis());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not all of batch {batch} Running in 60 s: {took:?}\n{}", cluster.logs()));
    let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "-l", &format!("batch={batch}"), "--wait"]);
    assert!(ok, "{err}");
    let mut ms: Vec<u128> = took.into_values().collect();
    ms.sort();
    ms
}

/// The VM controller's reconciles so far: (count, total seconds).
async fn reconciles() -> (f64, f64) {
    let text =
        nexus_e2e::http_client().get("http://127.0.0.1:7445/metrics").send().await.unwrap().text().await.unwrap();
    let sum_of = |metric: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains("controller=\"vm\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum_of("nexus_controller_reconcile_duration_seconds_count"),
        sum_of("nexus_controller_reconcile_duration_seconds_sum"),
    )
}

#[test]
fn a_noisy_user_gets_429_while_the_controllers_reconciles_keep_their_pace() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cluster =
            Cluster::start_full(dir.path(), "node-a", &[], &["--rate-limit-qps", "20", "--rate-limit-burst", "40"])
                .await;
        let admin = cluster.client();
        let noisy = nexus_e2e::issue_token(&admin, "user:noisy").await;
        let bind = json!({"apiVersion": "nexus/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "noisy"},
                          "spec": {"role": "viewer", "subjects": ["user:noisy"]}});
        let _: Value = admin.raw(reqwest::Method::POST, "/v1/clusterrolebindings", Some(&bind)).await.unwrap();

        let before = reconciles().await;
        let quiet = create_and_time(&cluster, "quiet", 10).await;
        let mid = reconciles().await;

        // The noisy user: four loops listing every VM as fast as they can,
        // on a thread of their own (the namespace is inherited).
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default()); // 200, 429, other
        let retry_after = Arc::new(std::sync::Mutex::new(None::<String>));
        let noise = {
            let (stop, counts, retry_after) = (stop.clone(), counts.clone(), retry_after.clone());
            let (url, ca) = (cluster.server.clone(), cluster.ca.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let http = nexus_e2e::https_client(&ca);
                    let loops = (0..4).map(|_| {
                        let (http, url, noisy, stop, counts, retry_after) = (
                            http.clone(),
                            url.clone(),
                            noisy.clone(),
                            stop.clone(),
                            counts.clone(),
                            retry_after.clone(),
                        );
                        tokio::spawn(async move {
                            while !stop.load(Ordering::Relaxed) {
                                let Ok(r) = http.get(format!("{url}/v1/vms")).bearer_auth(&noisy).send().await else {
                                    counts[2].fetch_add(1, Ordering::Relaxed);
                                    continue;
                                };
                                match r.status().as_u16() {
                                    200 => counts[0].fetch_add(1, Ordering::Relaxed),
                                    429 => {
                                        let ra =
                                            r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                                        *retry_after.lock().unwrap() = ra;
                                        counts[1].fetch_add(1, Ordering::Relaxed)
                                    }
                                    _ => counts[2].fetch_add(1, Ordering::Relaxed),
                                };
                                let _ = r.bytes().await;
                            }
                        })
                    });
                    futures::future::join_all(loops).await;
                });
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let loud = create_and_time(&cluster, "loud", 10).await;
        let after = reconciles().await;
        stop.store(true, Ordering::Relaxed);
        noise.join().unwrap();

        let [ok, limited, other] = [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed));
        let mean = |(c0, s0): (f64, f64), (c1, s1): (f64, f64)| (s1 - s0) / (c1 - c0).max(1.0) * 1000.0;
        let pct = |v: &[u128], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
        println!(
            "noisy user: {ok} answered, {limited} refused with 429 (Retry-After {:?}), {other} other",
            retry_after.lock().unwrap()
        );
        println!(
            "create→Running of 10 VMs without the noise: p50 {} ms, max {} ms; VM reconciles {} at {:.1} ms mean",
            pct(&quiet, 50),
            quiet[quiet.len() - 1],
            mid.0 - before.0,
            mean(before, mid)
        );
        println!(
            "create→Running of 10 VMs with the noise:    p50 {} ms, max {} ms; VM reconciles {} at {:.1} ms mean",
            pct(&loud, 50),
            loud[loud.len() - 1],
            after.0 - mid.0,
            mean(mid, after)
        );
        // The access log: nobody but the noisy user was ever refused.
        let log = std::fs::read_to_string(dir.path().join("apiserver.log")).unwrap();
        let mut refused: BTreeMap<String, usize> = BTreeMap::new();
        for line in log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
            if line["fields"]["status"] == 429 {
                *refused.entry(line["fields"]["actor"].as_str().unwrap_or("?").to_string()).or_default() += 1;
            }
        }
        println!("429s in the access log by caller: {refused:?}");
        assert!(limited > 0, "the noisy user was held to its budget");
        assert_eq!(retry_after.lock().unwrap().as_deref().map(|s| s.parse::<u64>().is_ok()), Some(true));
        assert_eq!(refused.keys().collect::<Vec<_>>(), ["user:noisy"], "{refused:?}");
        // Not a timing bar (that is for benchmarks): the controller kept
        // working, every VM ran, none of its calls was refused.
        assert_eq!(loud.len(), 10);
    });
}
