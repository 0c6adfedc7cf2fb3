//! `nexus-controller`: converges VMs to their spec.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nexus_controller::agent::AgentClient;
use nexus_controller::runner;
use nexus_controller::vm::VmReconciler;

#[derive(Debug, Parser)]
#[command(name = "nexus-controller", version, about = "The nexus controller")]
struct Args {
    /// URL of the apiserver.
    #[arg(long, env = "NEXUS_SERVER", default_value = "http://127.0.0.1:7443")]
    apiserver: String,
    /// File holding the node agents' credential.
    #[arg(long, env = "NEXUS_AGENT_TOKEN_FILE")]
    agent_token_file: PathBuf,
    /// VMs reconciled at once.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Agent calls in flight to any one node at once.
    #[arg(long, default_value_t = 8)]
    per_node_concurrency: usize,
    /// Seconds between full relists.
    #[arg(long, default_value_t = 60)]
    resync_secs: u64,
    /// Seconds after which a converged VM is checked against its node again.
    #[arg(long, default_value_t = 5)]
    recheck_secs: u64,
    /// Seconds without a heartbeat after which a node is not Ready
    /// (agents beat every 2 s).
    #[arg(long, default_value_t = 6)]
    node_grace_secs: i64,
    /// Seconds between garbage-collection passes over the nodes.
    #[arg(long, default_value_t = 10)]
    gc_interval_secs: u64,
    /// Seconds a thing must stay unclaimed before it is collected.
    #[arg(long, default_value_t = 60)]
    gc_grace_secs: u64,
    /// Address serving /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:7445")]
    metrics_listen: std::net::SocketAddr,
    /// Seconds a leader's lease lasts without renewal; a standby controller
    /// takes over after that.
    #[arg(long, default_value_t = 6)]
    lease_duration_secs: u64,
    /// Act without electing a leader (only one controller may run).
    #[arg(long)]
    no_leader_election: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.agent_token_file)
        .with_context(|| format!("reading the agent credential from {}", args.agent_token_file.display()))?
        .trim()
        .to_string();
    let api = nexus_api::client::Client::new(&args.apiserver, None);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let identity = format!("{}-{}", host.trim(), std::process::id());
    let elector = nexus_controller::leader::Elector::new(
        api.clone(),
        identity,
        Duration::from_secs(args.lease_duration_secs.max(1)),
    );
    if !args.no_leader_election {
        tracing::info!(identity = elector.identity(), "waiting to become the leader");
        tokio::select! {
            _ = elector.acquire() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm() => return Ok(()),
        }
        tracing::info!(identity = elector.identity(), "became the leader");
    }
    let events = nexus_controller::events::Recorder::new(api.clone());
    let node_grace = chrono::Duration::seconds(args.node_grace_secs);
    let reconciler = VmReconciler {
        api: api.clone(),
        agents: AgentClient::new(token),
        node_grace,
        recheck: Duration::from_secs(args.recheck_secs.max(1)),
        events: events.clone(),
        caches: Default::default(),
        scheduling: Default::default(),
        per_node: nexus_controller::vm::PerNode::new(args.per_node_concurrency),
    };
    tokio::spawn(nexus_controller::node::run(api.clone(), events.clone(), node_grace, Duration::from_secs(1)));
    tokio::spawn(nexus_controller::gc::run(
        api,
        reconciler.agents.clone(),
        events,
        Duration::from_secs(args.gc_grace_secs),
        Duration::from_secs(args.gc_interval_secs.max(1)),
        node_grace,
    ));
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0])?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("listening on {}", args.metrics_listen))?;
    let routes = axum::Router::new()
        .route("/metrics", axum::routing::get(move || std::future::ready(metrics.render())))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, routes).await });
    tracing::info!(apiserver = %args.apiserver, workers = args.workers, "controller starting");
    let lost =
        async { if args.no_leader_election { std::future::pending::<()>().await } else { elector.hold().await } };
    tokio::select! {
        _ = runner::run(reconciler, args.workers, Duration::from_secs(args.resync_secs.max(5))) => {}
        _ = lost => {
            tracing::error!(identity = elector.identity(), "lost the lease; exiting so another controller leads");
            std::process::exit(1);
        }
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm() => {}
    }
    if !args.no_leader_election {
        elector.release().await;
    }
    tracing::info!("controller stopped");
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
