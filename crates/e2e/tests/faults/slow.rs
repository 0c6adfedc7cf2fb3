//! A slow disk under the apiserver: every fsync of its store delayed by
//! 100 ms. The host has no device-mapper delay target here, so the delay is
//! injected with strace (`-e inject=fsync:delay_exit=…`) around the real
//! apiserver process, which sees its fsync calls take 100 ms longer, as
//! they would on a slow device.

use std::time::{Duration, Instant};

use futures::StreamExt;
use nexus_api::{TemplateSpec, VmPhase, VmSpec};
use nexus_client::{Event, ListParams};
use nexus_e2e::{Cluster, ClusterOptions, in_private_netns, percentile, wait_until};
use serde_json::{Value, json};

use super::vm_yaml;

/// The controller's counter `name` (summed over its labels) from its metrics.
async fn counter(name: &str) -> f64 {
    let text = reqwest::get("http://127.0.0.1:7445/metrics").await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn errors() -> f64 {
    let text = reqwest::get("http://127.0.0.1:7445/metrics").await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("nexus_controller_reconcile_total") && l.contains("result=\"error\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_slow_store_disk_raises_latency_but_nothing_times_out_watches_keep_up_and_nothing_storms() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("fsync.trace");
        let trace_arg = trace.display().to_string();
        let wrapper = [
            "strace",
            "-f",
            "-qq",
            "--seccomp-bpf",
            "-e",
            "trace=fsync,fdatasync",
            "-e",
            "inject=fsync,fdatasync:delay_exit=100000",
            "-o",
            trace_arg.as_str(),
        ];
        let opts = ClusterOptions { apiserver_wrapper: &wrapper, ..Default::default() };
        let mut cluster = Cluster::start_opts(dir.path(), "n1", &opts).await;
        let client = cluster.client();
        let (errors_before, retries_before) = (errors().await, counter("nexus_controller_retries_total").await);
        let fsyncs_before = std::fs::read_to_string(&trace).map(|t| t.lines().count()).unwrap_or(0);

        // A watcher beside the writes: when does it see each one?
        let list = client.list::<TemplateSpec>(Some("default"), &ListParams::default()).await.unwrap();
        let mut watch = Box::pin(
            client
                .watch::<TemplateSpec>(
                    Some("default"),
                    &ListParams::default(),
                    list.metadata.resource_version.as_deref(),
                )
                .await
                .unwrap(),
        );
        let began = Instant::now();
        let mut file = String::new();
        for i in 0..10 {
            file.push_str(&vm_yaml(&format!("slow-{i}"), "/var/lib/nexus/images/rootfs.ext4"));
            file.push_str("---\n");
        }
        let path = dir.path().join("vms.yaml");
        std::fs::write(&path, file).unwrap();
        let (ok, out, err) = cluster.nexusctl(&["apply", "-f", &path.display().to_string()]);
        assert!(ok, "{out}{err}");
        wait_until(Duration::from_secs(60), "10 VMs Running", || async {
            client.list::<VmSpec>(Some("default"), &ListParams::default()).await.is_ok_and(|l| {
                l.items.len() == 10 && l.items.iter().all(|v| v.status_or_default().phase == VmPhase::Running)
            })
        })
        .await;
        let all_running = began.elapsed();

        // Writes one after another (new Templates, which no controller
        // writes back), each timed, and when the watcher saw it.
        let mut latency = Vec::new();
        let mut lag = Vec::new();
        for i in 0..30 {
            let body = json!({"apiVersion": "nexus/v1", "kind": "Template", "metadata": {"name": format!("t-{i}")},
                "spec": {"vcpu": 1, "memMib": 64, "kernel": "/var/lib/nexus/images/vmlinux",
                         "rootfs": "/var/lib/nexus/images/rootfs.ext4"}});
            let sent = Instant::now();
            let written: Value = client
                .raw(reqwest::Method::POST, "/v1/projects/default/templates", Some(&body))
                .await
                .unwrap_or_else(|e| panic!("no write fails or times out: {e}"));
            let answered = sent.elapsed();
            latency.push(answered.as_secs_f64() * 1000.0);
            let want = written["metadata"]["resourceVersion"].as_str().map(str::to_string);
            let seen = tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(event) = watch.next().await {
                    if let Ok(Event::Modified(v) | Event::Added(v)) = event
                        && v.metadata.resource_version == want
                    {
                        return sent.elapsed();
                    }
                }
                panic!("the watch ended");
            })
            .await
            .expect("the watcher sees every write within 30 s");
            lag.push(seen.saturating_sub(answered).as_secs_f64() * 1000.0);
        }
        latency.sort_by(f64::total_cmp);
        lag.sort_by(f64::total_cmp);
        let fsyncs = std::fs::read_to_string(&trace).map(|t| t.lines().count()).unwrap_or(0) - fsyncs_before;
        let errors = errors().await - errors_before;
        let retries = counter("nexus_controller_retries_total").await - retries_before;
        println!(
            "slow store disk (+100 ms per fsync, {fsyncs} fsyncs delayed): 10 VMs Running {} ms after the apply; \
             a write p50 {:.0} ms p99 {:.0} ms max {:.0} ms (the client's limit is 30 s); watch saw each write \
             p50 {:.0} ms p99 {:.0} ms after its answer; controller: {errors} failed reconciles, {retries} retries",
            all_running.as_millis(),
            percentile(&latency, 0.5),
            percentile(&latency, 0.99),
            latency.last().unwrap(),
            percentile(&lag, 0.5),
            percentile(&lag, 0.99),
        );
        assert!(fsyncs > 0, "the delay was injected");
        assert!(*latency.last().unwrap() < 5000.0, "no write came near its limit");
        assert!(errors <= 5.0 && retries <= 5.0, "no retry storm: {errors} errors, {retries} retries");
        cluster.stop();
    });
}
