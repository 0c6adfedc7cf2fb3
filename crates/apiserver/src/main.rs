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
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on.
    #[arg(long, env = "NEXUS_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Directory holding the embedded SQLite database (`nexus.db`) and, by
    /// default, the cluster's PKI (`pki/`).
    #[arg(long, env = "NEXUS_DATA_DIR", default_value = "/var/lib/nexus", global = true)]
    data_dir: PathBuf,
    /// Serving certificate (PEM; default: `pki/apiserver.crt` in the data
    /// directory when it exists).
    #[arg(long, env = "NEXUS_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM; default: `pki/apiserver.key`).
    #[arg(long, env = "NEXUS_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP, without TLS (tokens then cross the network in
    /// clear text; meant for the loopback).
    #[arg(long, env = "NEXUS_PLAIN_HTTP")]
    plain_http: bool,
    /// Use PostgreSQL instead of SQLite (`postgres://user@host/db`); several
    /// apiservers may share one database.
    #[arg(long, env = "NEXUS_DATABASE_URL", global = true)]
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
    /// Another name the server answers to (repeatable). A server on the
    /// loopback answers only to localhost, 127.0.0.1, [::1] and these.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// A web origin (scheme://host[:port]) whose pages may call the API
    /// from a browser (repeatable; none by default).
    #[arg(long = "cors-origin", env = "NEXUS_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Requests per second each person or service account may make.
    #[arg(long, default_value_t = 200.0)]
    rate_limit_qps: f64,
    /// Burst above that rate.
    #[arg(long, default_value_t = 1000.0)]
    rate_limit_burst: f64,
    /// Requests per second each system component (controller, node) may make.
    #[arg(long, default_value_t = 5000.0)]
    system_rate_limit_qps: f64,
    /// Open watches per person or service account.
    #[arg(long, default_value_t = 50)]
    max_watches_per_identity: usize,
    /// Open watches in all.
    #[arg(long, default_value_t = 5000)]
    max_watches: usize,
    /// CA certificate (PEM) node agents' certificates are checked against
    /// when the apiserver reads VM logs and metrics from them (default:
    /// the cluster's, `pki/ca.crt` in the data directory, when present).
    #[arg(long, env = "NEXUS_AGENT_CA_FILE")]
    agent_ca_file: Option<PathBuf>,
    /// How long an Event is kept after it last happened: 30s, 10m, 1h, 2d.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    event_ttl: Duration,
    /// Ready (`/readyz`) when storage answers, without waiting for a Ready
    /// node (for an apiserver that serves no VMs yet, or in tests).
    #[arg(long)]
    ready_without_nodes: bool,
    /// Where files uploaded for Images are kept (default: `blobs` in the
    /// data directory). Several apiservers on one database need one shared
    /// directory.
    #[arg(long, env = "NEXUS_BLOB_DIR")]
    blob_dir: Option<PathBuf>,
    /// Export spans as OpenTelemetry traces to this OTLP/HTTP collector
    /// (`http://host:4318`; off when unset).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    nexus_apiserver::observe::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a duration; use a number and s, m, h or d: 1h"))
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make the cluster's CA (once) and the apiserver's serving
    /// certificate, in the PKI directory.
    InitPki {
        /// PKI directory (default: `pki` in the data directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Another DNS name or IP address the apiserver is reached by
        /// (repeatable; localhost, 127.0.0.1, ::1 and the host name are
        /// always included).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issue a serving certificate signed by the cluster's CA (for a node
    /// agent: `--name node-1 --san 10.0.0.5`).
    IssueCert {
        /// PKI directory (default: `pki` in the data directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Certificate name: the files are NAME.crt and NAME.key.
        #[arg(long)]
        name: String,
        /// A DNS name or IP address the server is reached by (repeatable).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
    },
    /// Write a consistent copy of the store to FILE while the apiserver
    /// serves (SQLite: `VACUUM INTO`; PostgreSQL: `pg_dump`), and check it.
    Backup {
        /// The backup file to make (never overwritten).
        #[arg(long)]
        to: PathBuf,
    },
    /// Restore a backup into an empty store (a new data directory, or an
    /// empty database); a store that holds objects is never overwritten.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
    },
}

/// Runs `backup` or `restore` and says what the store holds.
async fn backup(command: Command, args: &Args) -> anyhow::Result<()> {
    use nexus_apiserver::backup;
    let db = args.data_dir.join("nexus.db");
    match (command, &args.database_url) {
        (Command::Backup { to }, None) => {
            let held = backup::backup_sqlite(&db, &to).await?;
            println!("backed up {} to {}: {held}; integrity check ok", db.display(), to.display());
        }
        (Command::Backup { to }, Some(url)) => {
            let held = backup::backup_postgres(url, &to).await?;
            println!("backed up the PostgreSQL store to {} (pg_dump, custom format): {held}", to.display());
        }
        (Command::Restore { from }, None) => {
            let held = backup::restore_sqlite(&from, &db).await?;
            println!("restored {} into {}: {held}", from.display(), db.display());
        }
        (Command::Restore { from }, Some(url)) => {
            let held = backup::restore_postgres(&from, url).await?;
            println!("restored {} into the PostgreSQL store (pg_restore): {held}", from.display());
        }
        _ => unreachable!("only backup and restore come here"),
    }
    Ok(())
}

/// Runs a PKI subcommand and prints what it made.
fn pki(command: Command, data_dir: &std::path::Path) -> anyhow::Result<()> {
    use nexus_tls::pki;
    let (dir, name, sans) = match command {
        Command::InitPki { dir, sans } => {
            let dir = dir.unwrap_or_else(|| data_dir.join("pki"));
            match pki::init_ca(&dir)? {
                pki::CaOutcome::Created => println!("made a new CA: {}", dir.join(pki::CA_CERT).display()),
                pki::CaOutcome::Kept => println!("kept the existing CA: {}", dir.join(pki::CA_CERT).display()),
            }
            let mut all = pki::default_sans();
            all.extend(sans.into_iter().filter(|s| !pki::default_sans().contains(s)));
            (dir, "apiserver".to_string(), all)
        }
        Command::IssueCert { dir, name, sans } => (dir.unwrap_or_else(|| data_dir.join("pki")), name, sans),
        Command::Backup { .. } | Command::Restore { .. } => unreachable!("backup and restore are not PKI commands"),
    };
    let issued = pki::issue(&dir, &name, &sans)?;
    println!("issued {name} for {}:", sans.join(", "));
    println!("  certificate: {}", issued.cert.display());
    println!("  key:         {}", issued.key.display());
    println!(
        "clients trust {} (nexusctl config set-context --certificate-authority, --ca-file)",
        dir.join(pki::CA_CERT).display()
    );
    Ok(())
}

/// mimalloc: each request allocates and frees many small objects (bodies,
/// JSON values, headers), and glibc's malloc was a fifth of the apiserver's
/// CPU time under load. It also returns the 19 MiB block of each token
/// check (Argon2id, see `auth::tokens`), which glibc kept in per-thread
/// arenas: a burst of first requests with new tokens held 300-600 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(command) = args.command.take() {
        if matches!(command, Command::Backup { .. } | Command::Restore { .. }) {
            return backup(command, &args).await;
        }
        return pki(command, &args.data_dir);
    }
    let _telemetry = nexus_telemetry::init("nexus-apiserver", "info,sqlx=warn", args.otlp_endpoint.as_deref())?;
    let pki_dir = args.data_dir.join("pki");
    let serving = nexus_tls::serving(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.plain_http,
        Some((pki_dir.join("apiserver.crt"), pki_dir.join("apiserver.key"))),
    )?;
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
    state.limits = std::sync::Arc::new(nexus_apiserver::limits::Limits::new(nexus_apiserver::limits::Budgets {
        users: nexus_apiserver::limits::Rate { per_second: args.rate_limit_qps, burst: args.rate_limit_burst },
        system: nexus_apiserver::limits::Rate {
            per_second: args.system_rate_limit_qps,
            burst: args.system_rate_limit_qps * 2.0,
        },
        user_watches: args.max_watches_per_identity,
        system_watches: args.max_watches_per_identity.max(500),
        total_watches: args.max_watches,
    }));
    state.cors_origins =
        args.cors_origins.iter().map(|o| nexus_apiserver::edge::parse_origin(o)).collect::<Result<_, _>>()?;
    let agent_ca = args.agent_ca_file.clone().or_else(|| Some(pki_dir.join("ca.crt")).filter(|p| p.exists()));
    let agent_trust = nexus_client::tls::Trust::ca_file_or_system(agent_ca.as_deref())
        .with_context(|| "loading the CA that node agents' certificates are checked against")?;
    state.agents = Some(std::sync::Arc::new(nexus_apiserver::observe::Agents::new(&agent_trust)));
    if args.listen.ip().is_loopback() {
        state.hosts = nexus_apiserver::edge::HostPolicy::loopback(&args.server_names);
    }
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
    state.ready_without_nodes = args.ready_without_nodes;
    state.blob_dir = Some(args.blob_dir.clone().unwrap_or_else(|| args.data_dir.join("blobs")));
    tokio::spawn(nexus_apiserver::events::expire_loop(
        state.store.clone(),
        args.event_ttl,
        state.shutting_down.clone(),
    ));
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, scheme = serving.scheme(), %database, "apiserver ready");
    nexus_tls::serve(listener, serving, app(state), async move {
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

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
