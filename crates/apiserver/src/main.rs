//! `nexus-apiserver`: serves the nexus API from an embedded SQLite database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nexus_apiserver::{AppState, app, store::Store};

#[derive(Debug, Parser)]
#[command(name = "nexus-apiserver", version, about = "The nexus API server")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "NEXUS_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Directory holding the embedded SQLite database (`nexus.db`).
    #[arg(long, env = "NEXUS_DATA_DIR", default_value = "/var/lib/nexus")]
    data_dir: PathBuf,
    /// Use PostgreSQL instead of SQLite (`postgres://user@host/db`); several
    /// apiservers may share one database.
    #[arg(long, env = "NEXUS_DATABASE_URL")]
    database_url: Option<String>,
    /// Changes kept for watches to resume from; older versions get 410.
    #[arg(long, default_value_t = nexus_apiserver::store::DEFAULT_RETAINED_CHANGES)]
    retained_changes: i64,
    /// Seconds between BOOKMARK events on idle watches.
    #[arg(long, default_value_t = 10)]
    bookmark_interval_secs: u64,
    /// Dev mode: admins may name raw host paths as a VM's or Template's
    /// kernel and rootfs (otherwise only Images may).
    #[arg(long, env = "NEXUS_ALLOW_RAW_PATHS")]
    allow_raw_paths: bool,
    /// Where the first start on an empty store writes the admin's token
    /// (default: `admin.token` in the data directory).
    #[arg(long, env = "NEXUS_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let (store, database) = match &args.database_url {
        Some(url) => {
            let store = Store::open_postgres(url).await.context("connecting to PostgreSQL")?;
            (store, redact(url))
        }
        None => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
            let db = args.data_dir.join("nexus.db");
            let store = Store::open_sqlite(&db).await.with_context(|| format!("opening {}", db.display()))?;
            (store, db.display().to_string())
        }
    };
    let store = store.with_retained_changes(args.retained_changes);
    let metrics = nexus_apiserver::metrics::install().context("installing the metrics recorder")?;
    let (shutdown_tx, shutting_down) = tokio::sync::watch::channel(false);
    let mut state = AppState::new(store, shutting_down);
    state.bookmark_interval = Duration::from_secs(args.bookmark_interval_secs.max(1));
    state.metrics = Some(metrics);
    state.allow_raw_paths = args.allow_raw_paths;
    let token_file = args.bootstrap_token_file.clone().unwrap_or_else(|| args.data_dir.join("admin.token"));
    match nexus_apiserver::access::bootstrap(&state, &token_file).await {
        Ok(Some(path)) => tracing::info!(
            token_file = %path.display(),
            "first start: wrote a cluster-admin token (user:admin) to the token file; keep it safe"
        ),
        Ok(None) => {}
        Err(e) => anyhow::bail!("bootstrapping the first admin failed: {e}"),
    }
    if args.allow_raw_paths {
        tracing::warn!("dev mode: admins may name raw host paths as kernels and disks (--allow-raw-paths)");
    }
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, %database, "apiserver ready");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown().await;
            // End open watches so the graceful shutdown does not wait on them.
            let _ = shutdown_tx.send(true);
        })
        .await?;
    Ok(())
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
