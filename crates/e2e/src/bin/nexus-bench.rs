//! `nexus-bench`: loads N objects into an apiserver, then measures create,
//! get, list (one page), update-status and watch delivery latency at a
//! fixed concurrency. Prints p50/p95/p99 and throughput as a table and JSON.
//!
//! Without `--server` it starts its own apiserver on the chosen backend
//! (and, for PostgreSQL, a throwaway cluster unless `$DATABASE_URL` is set).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use nexus_api::{Vm, VmPhase, VmSpec, VmStatus};
use nexus_client::{Client, Event, ListParams};
use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend};

const PROJECT: &str = "bench";

struct Args {
    server: Option<String>,
    /// Token for `--server` (default: `$NEXUS_TOKEN`).
    token: Option<String>,
    /// CA file for `--server` (default: `$NEXUS_CA_FILE`).
    ca_file: Option<std::path::PathBuf>,
    /// A JSON line of an earlier run to print differences against.
    compare: Option<std::path::PathBuf>,
    backend: String,
    objects: usize,
    concurrency: usize,
    ops: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        server: None,
        token: std::env::var("NEXUS_TOKEN").ok(),
        ca_file: std::env::var_os("NEXUS_CA_FILE").map(Into::into),
        compare: None,
        backend: "sqlite".into(),
        objects: 10_000,
        concurrency: 16,
        ops: 2_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => args.server = Some(value()?),
            "--token" => args.token = Some(value()?),
            "--ca-file" => args.ca_file = Some(value()?.into()),
            "--compare" => args.compare = Some(value()?.into()),
            "--backend" => args.backend = value()?,
            "--objects" => args.objects = value()?.parse()?,
            "--concurrency" => args.concurrency = value()?.parse()?,
            "--ops" => args.ops = value()?.parse()?,
            "--help" | "-h" => {
                println!(
                    "nexus-bench [--backend sqlite|postgres | --server URL --token T --ca-file CA] [--objects 10000] [--concurrency 16] [--ops 2000] [--compare EARLIER.json]"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}; see --help"),
        }
    }
    anyhow::ensure!(matches!(args.backend.as_str(), "sqlite" | "postgres"), "--backend must be sqlite or postgres");
    anyhow::ensure!(args.concurrency > 0 && args.ops > 0, "--concurrency and --ops must be positive");
    Ok(args)
}

fn vm(name: &str) -> Vm {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "vcpu": 1, "memMib": 128, "kernel": "/img/vmlinux", "rootfs": "/img/rootfs.ext4"
    }))
    .expect("a valid spec");
    let mut v = Vm::new(name, Some(PROJECT), spec);
    v.metadata.labels.insert("bench".into(), "true".into());
    v
}

/// Latency samples of one operation.
struct Stats {
    op: &'static str,
    samples: Vec<Duration>,
    wall: Duration,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort_unstable();
        let i = ((s.len() as f64 - 1.0) * p).round() as usize;
        s.get(i).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
    }
    fn throughput(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64()
    }
}

/// Runs `op(i)` for i in 0..n with `concurrency` in flight; returns the latencies.
async fn run<F, Fut>(name: &'static str, n: usize, concurrency: usize, op: F) -> anyhow::Result<Stats>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = op(i);
            async move {
                let t = Instant::now();
                fut.await?;
                Ok(t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let samples = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Stats { op: name, samples, wall: started.elapsed() })
}

async fn bench(client: Client, args: &Args, backend: &str) -> anyhow::Result<()> {
    let c = args.concurrency;
    eprintln!("loading {} objects ({backend}, concurrency {c})...", args.objects);
    let load = run("load", args.objects, c, |i| {
        let client = client.clone();
        async move { client.create(&vm(&format!("obj-{i}"))).await.map(|_| ()).context("create") }
    })
    .await?;
    let create = run("create", args.ops, c, |i| {
        let client = client.clone();
        async move { client.create(&vm(&format!("new-{i}"))).await.map(|_| ()).context("create") }
    })
    .await?;
    let n = args.objects.max(1);
    let get = run("get", args.ops, c, |i| {
        let client = client.clone();
        async move { client.get::<VmSpec>(PROJECT, &format!("obj-{}", (i * 7919) % n)).await.map(|_| ()).context("get") }
    })
    .await?;
    let list = run("list (page of 100)", (args.ops / 4).max(1), c, |_| {
        let client = client.clone();
        async move {
            let params = ListParams { limit: Some(100), ..Default::default() };
            let page = client.list::<VmSpec>(Some(PROJECT), &params).await.context("list")?;
            anyhow::ensure!(page.items.len() == 100.min(n), "short page");
            Ok(())
        }
    })
    .await?;
    // Fetch the objects first so update-status measures the write alone.
    let targets: Vec<Vm> = futures::stream::iter(0..args.ops.min(n))
        .map(|i| {
            let client = client.clone();
            async move { client.get::<VmSpec>(PROJECT, &format!("obj-{i}")).await }
        })
        .buffer_unordered(c)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let targets = Arc::new(targets);
    let update = run("update-status", targets.len(), c, |i| {
        let client = client.clone();
        let targets = targets.clone();
        async move {
            let mut v = targets[i].clone();
            v.metadata.resource_version = None;
            v.status = Some(VmStatus { phase: VmPhase::Scheduled, ..Default::default() });
            client.replace_status(&v).await.map(|_| ()).context("update status")
        }
    })
    .await?;
    // Watch delivery: from sending a status write to its event arriving.
    let start_rv = client
        .list::<VmSpec>(Some(PROJECT), &ListParams { limit: Some(1), ..Default::default() })
        .await?
        .metadata
        .resource_version;
    let stream = client.watch::<VmSpec>(Some(PROJECT), &ListParams::default(), start_rv.as_deref()).await?;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let expected = targets.len();
    let sent_w = sent.clone();
    let watcher = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut samples = Vec::with_capacity(expected);
        while samples.len() < expected {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(Ok(Event::Modified(o)))) if o.status_or_default().phase == VmPhase::Running => {
                    let now = Instant::now();
                    if let Some(t) = sent_w.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.remove(o.name()) {
                        samples.push(now - t);
                    }
                }
                Ok(Some(Ok(_))) => {}
                other => anyhow::bail!("watch ended early: {other:?}"),
            }
        }
        Ok(samples)
    });
    let watch_started = Instant::now();
    run("watch writes", targets.len(), c, |i| {
        let client = client.clone();
        let targets = targets.clone();
        let sent = sent.clone();
        async move {
            let mut v = targets[i].clone();
            v.metadata.resource_version = None;
            v.status = Some(VmStatus { phase: VmPhase::Running, ..Default::default() });
            sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert(v.name().to_string(), Instant::now());
            client.replace_status(&v).await.map(|_| ()).context("update status")
        }
    })
    .await?;
    let watch = Stats { op: "watch delivery", samples: watcher.await??, wall: watch_started.elapsed() };

    let all = [load, create, get, list, update, watch];
    println!("\nbackend: {backend}  objects: {}  concurrency: {c}", args.objects);
    println!("{:<20} {:>7} {:>9} {:>9} {:>9} {:>11}", "operation", "count", "p50 ms", "p95 ms", "p99 ms", "ops/s");
    for s in &all {
        println!(
            "{:<20} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>11.0}",
            s.op,
            s.samples.len(),
            s.pct(0.50),
            s.pct(0.95),
            s.pct(0.99),
            s.throughput()
        );
    }
    let json: Vec<serde_json::Value> = all
        .iter()
        .map(|s| {
            serde_json::json!({"operation": s.op, "count": s.samples.len(), "p50_ms": s.pct(0.5), "p95_ms": s.pct(0.95),
                               "p99_ms": s.pct(0.99), "ops_per_sec": s.throughput()})
        })
        .collect();
    println!("{}", serde_json::json!({"backend": backend, "objects": args.objects, "concurrency": c, "results": json}));
    if let Some(path) = &args.compare {
        compare(path, &all)?;
    }
    Ok(())
}

/// Prints this run's p50 and p99 beside an earlier run's (its JSON line).
fn compare(path: &std::path::Path, now: &[Stats]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line in the file")?;
    let before: serde_json::Value = serde_json::from_str(line)?;
    println!("\ncompared with {}:", path.display());
    println!(
        "{:<20} {:>10} {:>10} {:>9} {:>10} {:>10} {:>9}",
        "operation", "p50 then", "p50 now", "diff", "p99 then", "p99 now", "diff"
    );
    for s in now {
        let Some(old) = before["results"].as_array().and_then(|r| r.iter().find(|o| o["operation"] == s.op)) else {
            continue;
        };
        let (p50, p99) = (old["p50_ms"].as_f64().unwrap_or(0.0), old["p99_ms"].as_f64().unwrap_or(0.0));
        println!(
            "{:<20} {:>10.2} {:>10.2} {:>+9.2} {:>10.2} {:>10.2} {:>+9.2}",
            s.op,
            p50,
            s.pct(0.5),
            s.pct(0.5) - p50,
            p99,
            s.pct(0.99),
            s.pct(0.99) - p99
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(server) = &args.server {
        let trust = nexus_client::tls::Trust::ca_file_or_system(args.ca_file.as_deref())?;
        return bench(Client::with_trust(server, args.token.clone(), trust), &args, "external").await;
    }
    let dir = tempfile::tempdir()?;
    let pg;
    let backend = match args.backend.as_str() {
        "postgres" => {
            pg = TestPostgres::start();
            Backend::Postgres(pg.fresh_database())
        }
        _ => Backend::Sqlite(dir.path().join("data")),
    };
    let server = ApiServer::start(&backend, dir.path(), &[]).await;
    bench(server.client(), &args, backend.name()).await
}
