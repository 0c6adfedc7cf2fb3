//! `nexus-controller`: converges every object to its spec.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use nexus_api::LeaseSpec;
use nexus_controller::runtime::Manager;
use nexus_controller::runtime::leader::Elector;
use nexus_controller::{Context, Settings, gc, node_lifecycle, pool, quota, snapshot, vm, volume};

/// mimalloc: the daemon allocates and frees many small objects per request
/// (bodies, JSON values, headers), and glibc's malloc was a fifth of its
/// CPU time under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "nexus-controller", version, about = "The nexus controller")]
struct Args {
    /// URL of the apiserver, or of several sharing one database, separated
    /// by commas (the next is used when one stops answering).
    #[arg(long, env = "NEXUS_SERVER", default_value = "https://127.0.0.1:7443")]
    apiserver: String,
    /// CA certificate (PEM) the apiserver's and the node agents'
    /// certificates are checked against (the cluster's `ca.crt`; default:
    /// the system's roots).
    #[arg(long, env = "NEXUS_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// File holding the controller's API token (subject system:controller:
    /// `nexusctl token create --subject system:controller`).
    #[arg(long, env = "NEXUS_TOKEN_FILE")]
    token_file: PathBuf,
    /// VMs reconciled at once. A VM's start holds its worker through its
    /// binding, its agent's launch and its status write, so the workers
    /// bound how many VMs start per second.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Agent calls in flight to any one node at once.
    #[arg(long, default_value_t = 8)]
    per_node_concurrency: usize,
    /// Seconds between requeues of every object (from the caches; no LIST).
    #[arg(long, default_value_t = 300)]
    resync_secs: u64,
    /// Seconds after which a converged VM is checked against its node again.
    #[arg(long, default_value_t = 30)]
    recheck_secs: u64,
    /// Seconds without a heartbeat after which a node is not Ready
    /// (agents beat every 2 s).
    #[arg(long, default_value_t = 6)]
    node_grace_secs: i64,
    /// Seconds between garbage-collection passes over a node.
    #[arg(long, default_value_t = 10)]
    gc_interval_secs: u64,
    /// Seconds a thing must stay unclaimed before it is collected.
    #[arg(long, default_value_t = 60)]
    gc_grace_secs: u64,
    /// Address serving /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:7445")]
    metrics_listen: std::net::SocketAddr,
    /// Seconds a leader's lease lasts without renewal; a standby controller
    /// takes over that long after the last renewal it saw. The leader renews
    /// every third of it and steps down after two renewals in a row fail
    /// (shorter: faster failover, more lost terms when the apiserver is
    /// slow; safety does not depend on it, writes are fenced).
    #[arg(long, default_value_t = 2)]
    lease_duration_secs: u64,
    /// Act without electing a leader (only one controller may run).
    #[arg(long)]
    no_leader_election: bool,
    /// Export spans as OpenTelemetry traces to this OTLP/HTTP collector
    /// (`http://host:4318`; off when unset).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = nexus_telemetry::init("nexus-controller", "info", args.otlp_endpoint.as_deref())?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading the controller's token from {}", args.token_file.display()))?
        .trim()
        .to_string();
    let trust = nexus_client::tls::Trust::ca_file_or_system(args.ca_file.as_deref())?;
    let api = nexus_client::Client::with_trust(&args.apiserver, Some(token), trust);
    let settings = Settings {
        workers: args.workers.max(1),
        per_node_concurrency: args.per_node_concurrency.max(1),
        resync: Duration::from_secs(args.resync_secs.max(5)),
        recheck: Duration::from_secs(args.recheck_secs.max(1)),
        node_grace: chrono::Duration::seconds(args.node_grace_secs.max(1)),
        gc_interval: Duration::from_secs(args.gc_interval_secs.max(1)),
        gc_grace: Duration::from_secs(args.gc_grace_secs),
    };
    let ctx = Context::new(api.clone(), settings);
    serve_metrics(args.metrics_listen).await?;

    let elector = (!args.no_leader_election).then(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let identity = format!("{}-{}", host.trim(), std::process::id());
        let leases = ctx.reflectors.store::<LeaseSpec>();
        Arc::new(Elector::new(api, leases, identity, Duration::from_secs(args.lease_duration_secs.max(1))))
    });
    tokio::spawn(nexus_controller::fleet_metrics::run(
        ctx.reflectors.clone(),
        ctx.settings.node_grace,
        Duration::from_secs(5),
    ));
    let mut manager = Manager::new(elector.clone());
    manager.add(vm::controller(&ctx));
    manager.add(node_lifecycle::controller(&ctx));
    manager.add(gc::controller(&ctx));
    manager.add(quota::controller(&ctx));
    manager.add(snapshot::controller(&ctx));
    manager.add(pool::controller(&ctx));
    manager.add(volume::controller(&ctx));

    tracing::info!(apiserver = %args.apiserver, workers = args.workers, "controller starting");
    tokio::select! {
        _ = manager.run() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm() => {}
    }
    if let Some(elector) = elector {
        elector.release().await;
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// Serves `/metrics` and `/healthz` on `listen`.
async fn serve_metrics(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0])?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    let routes = axum::Router::new()
        .route("/metrics", axum::routing::get(move || std::future::ready(metrics.render())))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, routes).await });
    Ok(())
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
