//! `nexus-nodeagent`: the privileged per-host executor.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use nexus_nodeagent::host::HostConfig;
use nexus_nodeagent::host::net::{Net, parse_cidr};
use nexus_nodeagent::paths::RunDir;
use nexus_nodeagent::server::credentials::{self, AgentCredential};
use nexus_nodeagent::server::register::{NodeInfo, firecracker_version, heartbeat_loop, host_capacity};
use nexus_nodeagent::server::{AgentState, router};
use nexus_nodeagent::vm::Runtime;

#[derive(Debug, Parser)]
#[command(name = "nexus-nodeagent", version, about = "The nexus node agent")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// URL of the apiserver, or of several sharing one database, separated
    /// by commas (the next is used when one stops answering).
    #[arg(long, env = "NEXUS_SERVER", default_value = "https://127.0.0.1:7443")]
    apiserver: String,
    /// CA certificate (PEM) the apiserver's certificate is checked against
    /// (the cluster's `ca.crt`; default: the system's roots).
    #[arg(long, env = "NEXUS_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The agent's serving certificate (PEM), signed by the cluster's CA for
    /// the address the controller uses (`nexus-apiserver issue-cert`;
    /// default: `agent.crt` in the state directory when it exists).
    #[arg(long, env = "NEXUS_AGENT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM; default: `agent.key` in the state directory).
    #[arg(long, env = "NEXUS_AGENT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Serve the agent API as plain HTTP, without TLS.
    #[arg(long, env = "NEXUS_AGENT_PLAIN_HTTP")]
    plain_http: bool,
    /// Name of this node (defaults to the host name).
    #[arg(long, env = "NEXUS_NODE_NAME")]
    node_name: Option<String>,
    /// Address the agent API listens on.
    #[arg(long, env = "NEXUS_AGENT_LISTEN", default_value = "127.0.0.1:7444")]
    listen: SocketAddr,
    /// URL the controller uses to reach this agent (defaults to
    /// https://<listen>, or http:// with --plain-http).
    #[arg(long, env = "NEXUS_AGENT_ADVERTISE")]
    advertise_url: Option<String>,
    /// Directory for the node's own credentials (its token for the
    /// apiserver, the credential callers of its API present), mode 0700.
    #[arg(long, env = "NEXUS_AGENT_STATE_DIR", default_value = "/var/lib/nexus/agent")]
    state_dir: PathBuf,
    /// A join token (`nexusctl token create --subject system:join`), used
    /// when the node has no token of its own yet.
    #[arg(long, env = "NEXUS_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// Seconds between rotations of the node's credentials.
    #[arg(long, default_value_t = 86_400)]
    credential_rotation_secs: u64,
    /// Directory under which kernels and disks may be opened (repeatable).
    #[arg(long = "image-root", default_value = "/var/lib/nexus/images")]
    image_roots: Vec<PathBuf>,
    /// User ids VMMs run as, `first-last`: each VM's VMM gets one of its
    /// own (and the same group id), for as long as the VM is on the node.
    #[arg(long, global = true, env = "NEXUS_VMM_UIDS", default_value = "1000000-1065535", value_parser = nexus_nodeagent::host::jail::parse_uid_range)]
    vmm_uids: std::ops::RangeInclusive<u32>,
    /// Directory for VM run directories (sockets, logs, disks).
    #[arg(long, global = true, env = "NEXUS_RUN_DIR", default_value = "/var/lib/nexus/run")]
    run_dir: PathBuf,
    /// Bridge the VMs' TAP devices are attached to.
    #[arg(long, default_value = "nxbr0")]
    bridge: String,
    /// Address of the bridge, the VMs' gateway (`none` for no address).
    #[arg(long, default_value = "172.30.0.1/24")]
    bridge_address: String,
    /// The VMM binary: `firecracker`, or `firecracker-sim` for tests.
    #[arg(long, global = true, env = "NEXUS_FIRECRACKER", default_value = "firecracker")]
    firecracker: PathBuf,
    /// Most VMs this node accepts.
    #[arg(long, default_value_t = 100)]
    max_vms: u32,
    /// The share of the run directory's filesystem (percent) to keep free:
    /// below it the node reports `DiskPressure` and gets no new VMs (0: off).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=100))]
    disk_pressure_free_percent: u8,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 2)]
    heartbeat_secs: u64,
    /// Seconds between samples of the VMs' metrics.
    #[arg(long, default_value_t = 10)]
    metrics_interval_secs: u64,
    /// Export spans as OpenTelemetry traces to this OTLP/HTTP collector
    /// (`http://host:4318`; off when unset).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,

    /// Network namespaces kept ready for VMs restored from snapshots, each
    /// with a VMM started ahead in it (each an idle thread, an idle `nft`,
    /// a veth pair and an idle VMM; 0: made on demand).
    #[arg(long, default_value_t = 2)]
    spare_netns: usize,

    /// Seconds a VMM gets to stop before it is killed.
    #[arg(long, default_value_t = 2)]
    stop_grace_secs: u64,
    /// How VMM processes are held: `systemd` (a transient scope each),
    /// `direct` (children in their own process groups), or `auto`: systemd
    /// where it is the init system.
    #[arg(long, default_value = "auto", value_parser = ["auto", "systemd", "direct"])]
    process_manager: String,
    /// D-Bus address of systemd's manager (default: the system bus).
    #[arg(long, env = "NEXUS_SYSTEMD_BUS")]
    systemd_bus: Option<String>,
    /// Remove the bridge and the NAT rule and exit; refused while VMs
    /// remain in the run directory (delete them first).
    #[arg(long)]
    teardown_network: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check whether this host can run VMs (KVM, TUN, the VMM binary, NAT,
    /// reflinks, cgroups, the VMM uid range, privileges) and say what to
    /// fix; exits 1 when VMs cannot run.
    Check,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Check) = args.command {
        use nexus_nodeagent::host::check as hostcheck;
        let findings = hostcheck::check(&hostcheck::Target {
            firecracker: args.firecracker.clone(),
            run_dir: args.run_dir.clone(),
            vmm_uids: args.vmm_uids.clone(),
        });
        print!("{}", hostcheck::render(&findings));
        std::process::exit(if findings.iter().any(|f| f.verdict == hostcheck::Verdict::Fail) { 1 } else { 0 });
    }
    let _telemetry = nexus_telemetry::init("nexus-nodeagent", "info", args.otlp_endpoint.as_deref())?;
    let bridge_address = match args.bridge_address.as_str() {
        "none" => None,
        cidr => Some(parse_cidr(cidr).map_err(|e| anyhow::anyhow!("--bridge-address: {e}"))?),
    };
    let net = Net::connect().context("opening netlink")?;
    if args.teardown_network {
        return teardown(&net, &args, bridge_address).await;
    }
    let serving = nexus_tls::serving(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.plain_http,
        Some((args.state_dir.join("agent.crt"), args.state_dir.join("agent.key"))),
    )?;
    let trust = nexus_client::tls::Trust::ca_file_or_system(args.ca_file.as_deref())?;
    let firecracker = resolve_binary(&args.firecracker)?;
    let run_dir = RunDir::new(&args.run_dir).with_context(|| format!("preparing {}", args.run_dir.display()))?;
    let use_systemd = match args.process_manager.as_str() {
        "systemd" => true,
        "direct" => false,
        _ => nexus_nodeagent::host::scope::systemd_is_init(),
    };
    let scopes = if use_systemd {
        Some(
            nexus_nodeagent::host::scope::Scopes::connect(args.systemd_bus.as_deref())
                .await
                .context("connecting to systemd")?,
        )
    } else {
        None
    };
    // The node's client of the apiserver; its token is set once the node
    // has one (below), and rotations reach every clone.
    let api = nexus_client::Client::with_trust(&args.apiserver, None, trust);
    let runtime = Arc::new(Runtime::new(
        HostConfig {
            run_dir,
            bridge: args.bridge.clone(),
            bridge_address,
            firecracker: firecracker.clone(),
            stop_grace: Duration::from_secs(args.stop_grace_secs),
            cgroups: if scopes.is_none() { nexus_nodeagent::host::cgroup::Cgroups::detect() } else { None },
            scopes,
            image_roots: nexus_nodeagent::host::images::ImageRoots::new(&args.image_roots),
            vmm_uids: args.vmm_uids.clone(),
            api: Some(api.clone()),
            spare_netns: args.spare_netns,
        },
        net,
    ));
    runtime.host().ensure_network().await.map_err(|e| anyhow::anyhow!(e.chain()))?;
    runtime.start_spares();
    let node_name = match args.node_name {
        Some(n) => n,
        None => nix::unistd::gethostname()?.to_string_lossy().to_lowercase(),
    };
    let metrics_node = node_name.clone();
    let address = args.advertise_url.unwrap_or_else(|| format!("{}://{}", serving.scheme(), args.listen));
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let credential = Arc::new(AgentCredential::load_or_create(&args.state_dir)?);
    let info = NodeInfo {
        name: node_name.clone(),
        address,
        capacity: host_capacity(args.max_vms),
        firecracker_version: firecracker_version(&firecracker),
        bridge: args.bridge,
        runtime: runtime.clone(),
        min_free_percent: args.disk_pressure_free_percent,
    };
    // The API answers at once; the node's identity is established beside
    // it (the apiserver may not be up yet).
    let heartbeat = Duration::from_secs(args.heartbeat_secs.max(1));
    let rotation = Duration::from_secs(args.credential_rotation_secs.max(1));
    let (state_dir, join_file, cred) = (args.state_dir.clone(), args.join_token_file.clone(), credential.clone());
    tokio::spawn(async move {
        if let Err(e) = establish(&api, &node_name, &state_dir, join_file.as_deref(), &cred).await {
            tracing::error!(error = %e, "the node cannot establish its identity; it will not register");
            return;
        }
        if let Err(e) = spawn_heartbeat(&api, info, heartbeat) {
            tracing::error!(error = %e, "starting the heartbeat failed");
            return;
        }
        credentials::rotate_forever(api, node_name, state_dir, cred, rotation).await;
    });
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, scheme = serving.scheme(), firecracker = %firecracker.display(), "node agent ready");
    let sampler = runtime.clone();
    let every = Duration::from_secs(args.metrics_interval_secs.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            sampler.collect_metrics().await;
        }
    });
    let stopping = runtime.clone();
    let state = AgentState {
        runtime,
        credential,
        capacity: host_capacity(args.max_vms),
        node: metrics_node,
        peers: Default::default(),
    };
    nexus_tls::serve(listener, serving, router(state), shutdown()).await?;
    // VMs keep running; the spare namespaces are the agent's own.
    stopping.host().clear_spares().await;
    Ok(())
}

/// Gets the node's token (joining if needed) and publishes its agent credential.
async fn establish(
    api: &nexus_client::Client,
    node: &str,
    state_dir: &std::path::Path,
    join_token_file: Option<&std::path::Path>,
    cred: &AgentCredential,
) -> Result<(), credentials::CredentialError> {
    credentials::establish_node_token(api, node, state_dir, join_token_file).await?;
    credentials::publish(api, node, cred).await
}

/// Runs the heartbeat on a thread and runtime of its own: however busy the
/// agent's workers are (disk copies, VMM start-ups), the node's heartbeat
/// goes out on time, so a busy node is never taken for a lost one.
fn spawn_heartbeat(api: &nexus_client::Client, info: NodeInfo, interval: Duration) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("heartbeat runtime")?;
    let api = api.clone();
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            rt.block_on(async move {
                // Connections of its own, driven by this thread; the token is
                // shared, so a rotation reaches the heartbeat too.
                heartbeat_loop(api.with_fresh_connections(), info, interval).await
            })
        })
        .context("starting the heartbeat thread")?;
    Ok(())
}

/// Removes what the agent set up for all its VMs: the NAT rule and the bridge.
async fn teardown(net: &Net, args: &Args, bridge_address: Option<(std::net::Ipv4Addr, u8)>) -> anyhow::Result<()> {
    let vms = args.run_dir.join("vms");
    let remaining = std::fs::read_dir(&vms).map(|d| d.count()).unwrap_or(0);
    if remaining > 0 {
        bail!("{remaining} VM directories remain in {}: delete those VMs first", vms.display());
    }
    if let Some((ip, len)) = bridge_address {
        nexus_nodeagent::host::nat::remove_masquerade(nexus_nodeagent::host::nat::detect(), &args.bridge, ip, len)
            .await
            .context("removing the NAT rule")?;
    }
    let removed = net.delete_link(&args.bridge).await.map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(bridge = %args.bridge, removed, "node networking torn down");
    Ok(())
}

/// Finds the VMM binary: a path as given, or a name looked up on PATH.
fn resolve_binary(binary: &std::path::Path) -> anyhow::Result<PathBuf> {
    if binary.components().count() > 1 {
        return Ok(binary.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(binary)).find(|candidate| candidate.is_file()).with_context(|| {
        format!(
            "no {} binary on PATH; install Firecracker or pass --firecracker /path/to/firecracker-sim",
            binary.display()
        )
    })
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // VMs keep running: a restarted agent adopts them.
    tracing::info!("shutting down; VMs keep running");
}
