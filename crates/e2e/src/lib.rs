//! Harness for system tests: runs the real nexus processes inside a network
//! namespace owned by the test thread, and inspects the host they run on.
//!
//! A test calls [`enter_private_netns`] on its own thread first; every
//! socket the thread opens and every process it starts then lives in that
//! namespace, which vanishes with them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_client::Client;

pub mod host;
pub mod multinode;

/// Whether the test runs as root (needed for namespaces, bridges and TAPs).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Moves the calling thread into a new network namespace with `lo` up.
///
/// # Panics
/// When the namespace cannot be created (not root) or `ip` is missing.
pub fn enter_private_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run the tests as root");
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
}

/// The `p`th percentile (0 to 1) of ascending `sorted`, by nearest rank;
/// 0 for no samples. Every benchmark reports with it.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs a command and panics with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Directory holding the workspace's built binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NEXUS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps, binaries one level up.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable's directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the system tests",
        path.display()
    );
    path
}

/// Waits for the admin token an apiserver writes on its first start.
pub async fn wait_admin_token(path: &Path) -> String {
    let what = format!("the bootstrap token in {}", path.display());
    wait_until(Duration::from_secs(20), &what, || async {
        std::fs::read_to_string(path).is_ok_and(|t| !t.trim().is_empty())
    })
    .await;
    std::fs::read_to_string(path).expect("the token file").trim().to_string()
}

/// Issues a token for `subject` with an admin client.
pub async fn issue_token(admin: &Client, subject: &str) -> String {
    let req = nexus_api::auth::TokenRequest { subject: Some(subject.into()), ..Default::default() };
    admin.create_token(&req).await.unwrap_or_else(|e| panic!("issuing a token for {subject}: {e}")).token
}

/// Writes the components' credentials into `dir`: `join.token` (nodes join
/// with it) and `controller.token`. Returns their paths.
pub async fn component_tokens(admin: &Client, dir: &Path) -> (PathBuf, PathBuf) {
    let join = dir.join("join.token");
    let controller = dir.join("controller.token");
    std::fs::write(&join, issue_token(admin, "system:join").await).expect("join.token");
    std::fs::write(&controller, issue_token(admin, "system:controller").await).expect("controller.token");
    (join, controller)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a server accepts connections on the unix socket `path`.
/// The file exists from `bind()` on, before the server listens, so its
/// existence says nothing: only an accepted connection does.
pub async fn wait_unix_listening(path: &Path, timeout: Duration) {
    let what = format!("a server to listen on {}", path.display());
    wait_until(timeout, &what, || async { tokio::net::UnixStream::connect(path).await.is_ok() }).await;
}

/// A running process that is stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: &'static str,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the process: SIGTERM, up to 5 s, then SIGKILL; always reaped.
    pub fn stop(&mut self) {
        // Already ended (and reaped): its pid may belong to another process now.
        if !self.is_running() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Starts `bin args...` with its output appended to `log`.
pub fn spawn(name: &'static str, bin: &Path, args: &[&str], log: &Path) -> Proc {
    spawn_env(name, bin, args, log, &[])
}

/// Like `spawn`, with extra environment variables.
pub fn spawn_env(name: &'static str, bin: &Path, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Proc {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    Proc { name, child }
}

/// Starts a controller tuned for tests: rechecks every 2 s, a node is lost
/// after 4 s without heartbeats, a 3 s leader lease, garbage collection every
/// second with a 3 s grace. `token` is a file holding a system:controller token.
pub fn spawn_controller(server: &str, ca: &Path, token: &Path, metrics_listen: &str, log: &Path) -> Proc {
    spawn_controller_tuned(server, ca, token, metrics_listen, log, true)
}

/// [`spawn_controller`]; with `fast`, the controller rechecks VMs every
/// 2 s, collects garbage every second and trusts a node for 4 s, so tests
/// see things happen quickly. Without it (benchmarks), it runs with its
/// defaults, as an operator would.
pub fn spawn_controller_tuned(
    server: &str,
    ca: &Path,
    token: &Path,
    metrics_listen: &str,
    log: &Path,
    fast: bool,
) -> Proc {
    let token = token.display().to_string();
    let ca = ca.display().to_string();
    let mut args = vec!["--apiserver", server, "--ca-file", &ca, "--token-file", &token];
    if fast {
        args.extend([
            "--recheck-secs",
            "2",
            "--node-grace-secs",
            "4",
            "--lease-duration-secs",
            "3",
            "--gc-interval-secs",
            "1",
            "--gc-grace-secs",
            "3",
        ]);
    }
    args.extend(["--metrics-listen", metrics_listen]);
    spawn("controller", &bin("nexus-controller"), &args, log)
}

/// Makes the cluster's CA in `pki` (kept if there) with `nexus-apiserver
/// init-pki`, as an operator would. Returns the CA file.
pub fn init_pki(pki: &Path) -> PathBuf {
    let dir = pki.display().to_string();
    run_pki(&["init-pki", "--dir", &dir]);
    pki.join("ca.crt")
}

/// Issues serving certificate `name` for `sans` from the CA in `pki` with
/// `nexus-apiserver issue-cert`. Returns (certificate, key).
pub fn issue_cert(pki: &Path, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
    let dir = pki.display().to_string();
    let mut args = vec!["issue-cert", "--dir", &dir, "--name", name];
    for san in sans {
        args.extend(["--san", san]);
    }
    run_pki(&args);
    (pki.join(format!("{name}.crt")), pki.join(format!("{name}.key")))
}

fn run_pki(args: &[&str]) {
    let out = Command::new(bin("nexus-apiserver")).args(args).output().expect("running nexus-apiserver");
    assert!(out.status.success(), "nexus-apiserver {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Trust in the CA file `ca` (panics when it cannot be read).
pub fn trust(ca: &Path) -> nexus_client::tls::Trust {
    nexus_client::tls::Trust::ca_file(ca).unwrap_or_else(|e| panic!("{e}"))
}

/// A raw HTTP client that trusts the CA file `ca`, for requests the typed
/// client cannot make.
pub fn https_client(ca: &Path) -> reqwest::Client {
    trust(ca).apply(reqwest::Client::builder().timeout(Duration::from_secs(30))).build().expect("an HTTPS client")
}

/// A byte stream to a server: plain TCP or TLS.
pub trait RawIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawIo for T {}

/// Completes a TLS handshake over `tcp` with the server named `name`,
/// trusting only the CA file `ca`.
pub async fn tls_connect(
    tcp: tokio::net::TcpStream,
    ca: &Path,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(std::io::Error::other)? {
        roots.add(cert.map_err(std::io::Error::other)?).map_err(std::io::Error::other)?;
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await
}

/// A plain HTTP client (metrics endpoints and the like).
pub fn http_client() -> reqwest::Client {
    nexus_client::tls::Trust::system()
        .apply(reqwest::Client::builder().timeout(Duration::from_secs(30)))
        .build()
        .expect("an HTTP client")
}

/// Waits until the controller serving metrics on `metrics_addr` counts
/// `n` Ready nodes in its cache (`nexus_nodes{ready="true"}`).
pub async fn wait_controller_sees_ready_nodes(metrics_addr: &str, n: usize) {
    let url = format!("http://{metrics_addr}/metrics");
    let want = format!("nexus_nodes{{ready=\"true\"}} {n}");
    wait_until(Duration::from_secs(20), &format!("the controller to see {n} Ready node(s)"), || async {
        match http_client().get(&url).send().await {
            Ok(r) => r.text().await.is_ok_and(|t| t.lines().any(|l| l == want)),
            Err(_) => false,
        }
    })
    .await;
}

/// An apiserver, controller and node agent (on the simulated VMM), started
/// as real processes in the calling thread's network namespace.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub run_dir: PathBuf,
    pub server: String,
    /// The cluster's CA file: the apiserver's and the agent's certificates
    /// are signed by it.
    pub ca: PathBuf,
    pub apiserver: Proc,
    pub agent: Proc,
    pub controller: Proc,
    /// A cluster-admin token (the bootstrap admin's).
    pub admin_token: String,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    apiserver_args: Vec<String>,
}

/// How [`Cluster::start_opts`] starts the processes, beyond the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterOptions<'a> {
    /// Extra flags for the node agent.
    pub agent_args: &'a [&'a str],
    /// Extra flags for the apiserver.
    pub apiserver_args: &'a [&'a str],
    /// Environment of the node agent (and so of the VMMs it starts).
    pub agent_env: &'a [(&'a str, &'a str)],
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed test must not leave VMMs behind: they outlive the agent.
        // The agent goes first, or its restart policy would start again
        // the VMMs being killed.
        self.agent.stop();
        kill_vmms_under(&self.run_dir);
    }
}

/// SIGKILLs every VMM whose API socket lies under `dir`.
pub fn kill_vmms_under(dir: &Path) {
    for (pid, _) in host::vmm_processes_under(dir) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Ports used inside the test's own namespace (no clash with the host).
pub const APISERVER_ADDR: &str = "127.0.0.1:7443";
pub const AGENT_ADDR: &str = "127.0.0.1:7444";

impl Cluster {
    /// Starts the three processes with state under `dir` and waits until
    /// the node is registered and Ready.
    pub async fn start(dir: &Path, node: &str) -> Cluster {
        Cluster::start_with(dir, node, &[]).await
    }

    /// Like [`Cluster::start`], with extra flags for the node agent.
    pub async fn start_with(dir: &Path, node: &str, agent_extra: &[&str]) -> Cluster {
        Cluster::start_full(dir, node, agent_extra, &[]).await
    }

    /// Like [`Cluster::start`], with extra flags for the node agent and the
    /// apiserver. Every connection is HTTPS: the apiserver finds its
    /// certificate where `nexus-apiserver init-pki` puts it (`pki/` in its
    /// data directory), and the agent's is issued for its address.
    pub async fn start_full(dir: &Path, node: &str, agent_extra: &[&str], apiserver_extra: &[&str]) -> Cluster {
        let opts = ClusterOptions { agent_args: agent_extra, apiserver_args: apiserver_extra, agent_env: &[] };
        Cluster::start_opts(dir, node, &opts).await
    }

    /// Like [`Cluster::start`], started as `opts` say.
    pub async fn start_opts(dir: &Path, node: &str, opts: &ClusterOptions<'_>) -> Cluster {
        let (agent_extra, apiserver_extra) = (opts.agent_args, opts.apiserver_args);
        let agent_env: Vec<(String, String)> =
            opts.agent_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        std::fs::create_dir_all(dir).expect("cluster dir");
        let run_dir = dir.join("run");
        let data = dir.join("data");
        let pki = data.join("pki");
        let ca = init_pki(&pki);
        let agent_ip = AGENT_ADDR.split(':').next().expect("agent address");
        let (agent_cert, agent_key) = issue_cert(&pki, "agent", &[agent_ip]);
        let server = format!("https://{APISERVER_ADDR}");
        let s = |p: &Path| p.display().to_string();
        let mut apiserver_args: Vec<String> =
            ["--listen", APISERVER_ADDR, "--data-dir", &s(&data), "--bookmark-interval-secs", "2", "--allow-raw-paths"]
                .iter()
                .map(|a| a.to_string())
                .collect();
        // Tests are not about request budgets, unless they say so.
        if !apiserver_extra.contains(&"--rate-limit-qps") {
            apiserver_args.extend(["--rate-limit-qps", "100000", "--rate-limit-burst", "100000"].map(String::from));
        }
        apiserver_args.extend(apiserver_extra.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = apiserver_args.iter().map(String::as_str).collect();
        let apiserver = spawn("apiserver", &bin("nexus-apiserver"), &argv, &dir.join("apiserver.log"));
        let admin_token = wait_admin_token(&data.join("admin.token")).await;
        let client = Client::with_trust(&server, Some(admin_token.clone()), trust(&ca));
        wait_until(Duration::from_secs(10), "the apiserver to answer", || async { client.version().await.is_ok() })
            .await;
        let (join, controller_token) = component_tokens(&client, dir).await;
        let agent_args: Vec<String> = [
            "--apiserver",
            &server,
            "--ca-file",
            &s(&ca),
            "--tls-cert",
            &s(&agent_cert),
            "--tls-key",
            &s(&agent_key),
            "--node-name",
            node,
            "--listen",
            AGENT_ADDR,
            "--state-dir",
            &s(&dir.join("agent-state")),
            "--join-token-file",
            &s(&join),
            "--run-dir",
            &s(&run_dir),
            "--firecracker",
            &s(&bin("firecracker-sim")),
            "--heartbeat-secs",
            "1",
            "--process-manager",
            "direct",
        ]
        .iter()
        .chain(agent_extra)
        .map(|a| a.to_string())
        .collect();
        let argv: Vec<&str> = agent_args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let agent = spawn_env("nodeagent", &bin("nexus-nodeagent"), &argv, &dir.join("agent.log"), &env);
        let controller =
            spawn_controller(&server, &ca, &controller_token, "127.0.0.1:7445", &dir.join("controller.log"));
        // Registered, heartbeating, and seen Ready by the controller (its
        // cache trails the apiserver): a VM applied now is placed at once.
        wait_controller_sees_ready_nodes("127.0.0.1:7445", 1).await;
        Cluster {
            dir: dir.to_path_buf(),
            run_dir,
            server,
            ca,
            apiserver,
            agent,
            controller,
            admin_token,
            agent_args,
            agent_env,
            apiserver_args,
        }
    }

    /// Starts another controller (a standby while the first leads), serving
    /// its metrics on `metrics_listen`.
    pub fn spawn_controller(&self, metrics_listen: &str, log: &str) -> Proc {
        spawn_controller(
            &self.server,
            &self.ca,
            &self.dir.join("controller.token"),
            metrics_listen,
            &self.dir.join(log),
        )
    }

    /// Starts the apiserver again (after it was killed or stopped) on the
    /// same address and data, and waits until it answers.
    pub async fn restart_apiserver(&mut self) {
        let argv: Vec<&str> = self.apiserver_args.iter().map(String::as_str).collect();
        self.apiserver = spawn("apiserver", &bin("nexus-apiserver"), &argv, &self.dir.join("apiserver.log"));
        let client = self.client();
        wait_until(Duration::from_secs(10), "the apiserver to answer again", || async {
            client.version().await.is_ok()
        })
        .await;
    }

    /// Starts the node agent again (after it was killed or stopped).
    pub fn restart_agent(&mut self) {
        let argv: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.agent = spawn_env("nodeagent", &bin("nexus-nodeagent"), &argv, &self.dir.join("agent.log"), &env);
    }

    /// A client with the cluster admin's token.
    pub fn client(&self) -> Client {
        Client::with_trust(&self.server, Some(self.admin_token.clone()), trust(&self.ca))
    }

    /// Runs `nexusctl` as the cluster admin; returns (success, stdout, stderr).
    pub fn nexusctl(&self, args: &[&str]) -> (bool, String, String) {
        nexusctl(&self.server, &self.ca, &self.admin_token, args)
    }

    /// Stops all three processes (controller first).
    pub fn stop(&mut self) {
        self.controller.stop();
        self.agent.stop();
        self.apiserver.stop();
    }

    /// The processes' logs, for failure messages.
    pub fn logs(&self) -> String {
        ["apiserver.log", "agent.log", "controller.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs `nexusctl --server <server> --certificate-authority <ca> <args>`
/// with `token`; returns (success, stdout, stderr).
pub fn nexusctl(server: &str, ca: &Path, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("nexusctl"))
        .args(["--server", server])
        .arg("--certificate-authority")
        .arg(ca)
        .args(args)
        .env("NEXUS_TOKEN", token)
        .env_remove("NEXUS_CONTEXT")
        .output()
        .expect("running nexusctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Makes sure the image paths `examples/vm.yaml` names exist, creating
/// placeholder images (as `hack/images.sh` does) when they do not. The
/// simulated VMM only opens them; a real Firecracker needs real ones.
pub fn ensure_example_images() {
    let dir = Path::new("/var/lib/nexus/images");
    std::fs::create_dir_all(dir).expect("creating /var/lib/nexus/images");
    let kernel = dir.join("vmlinux");
    if !kernel.exists() {
        std::fs::write(&kernel, vec![0x7fu8; 4096]).expect("placeholder kernel");
    }
    let rootfs = dir.join("rootfs.ext4");
    if !rootfs.exists() {
        let f = std::fs::File::create(&rootfs).expect("placeholder rootfs");
        f.set_len(256 << 20).expect("sizing the placeholder rootfs");
    }
}

/// Runs `test` on a fresh thread inside its own network namespace, on a
/// single-threaded runtime (so every socket it opens is in the namespace).
///
/// # Panics
/// When not root: a system test that cannot run fails, it never passes
/// without having run. The tests that need no root live in the crates
/// themselves (`cargo test -p nexus-controller` and the like).
pub fn in_private_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    assert!(
        is_root(),
        "this system test needs root to create a network namespace, a bridge and TAP devices: run the suite as \
         root (hack/test.sh), or leave the system tests out with `cargo test --workspace --exclude nexus-e2e`"
    );
    let handle = std::thread::spawn(move || {
        enter_private_netns();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(test());
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

pub mod postgres;
pub mod webdriver;

/// A storage backend an apiserver can run on.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Embedded SQLite in this directory.
    Sqlite(PathBuf),
    /// PostgreSQL at this URL.
    Postgres(String),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// One `nexus-apiserver` process.
#[derive(Debug)]
pub struct ApiServer {
    pub url: String,
    /// The CA file its certificate is signed by (`None` with `--plain-http`).
    pub ca: Option<PathBuf>,
    pub proc: Proc,
    pub log: PathBuf,
    /// The bootstrap admin's token, when this server made it (the first
    /// on an empty store).
    pub admin_token: Option<String>,
}

impl ApiServer {
    /// Starts an apiserver on a free port of 127.0.0.1 and waits until it
    /// answers (`/healthz`: its `/readyz` also wants a Ready node).
    ///
    /// It serves HTTPS with a certificate from the CA in `log_dir/pki` (made
    /// on first use, so apiservers started with the same `log_dir` share
    /// it), unless `extra` holds `--plain-http`.
    pub async fn start(backend: &Backend, log_dir: &Path, extra: &[&str]) -> ApiServer {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let token_file = log_dir.join(format!("admin-{port}.token"));
        let mut args: Vec<String> = vec![
            "--listen".into(),
            listen.clone(),
            "--bootstrap-token-file".into(),
            token_file.display().to_string(),
            "--allow-raw-paths".into(),
        ];
        let ca = (!extra.contains(&"--plain-http")).then(|| {
            let pki = log_dir.join("pki");
            let ca = init_pki(&pki);
            let (cert, key) = issue_cert(&pki, &format!("apiserver-{port}"), &["127.0.0.1", "localhost"]);
            args.extend([
                "--tls-cert".into(),
                cert.display().to_string(),
                "--tls-key".into(),
                key.display().to_string(),
            ]);
            ca
        });
        // Tests are not about request budgets, unless they say so.
        if !extra.contains(&"--rate-limit-qps") {
            args.extend(["--rate-limit-qps", "100000", "--rate-limit-burst", "100000"].map(String::from));
        }
        match backend {
            Backend::Sqlite(dir) => args.extend(["--data-dir".into(), dir.display().to_string()]),
            Backend::Postgres(url) => args.extend(["--database-url".into(), url.clone()]),
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = log_dir.join(format!("apiserver-{port}.log"));
        let proc = spawn("apiserver", &bin("nexus-apiserver"), &argv, &log);
        let url = format!("{}://{listen}", if ca.is_some() { "https" } else { "http" });
        let trust = ca.as_deref().map(trust).unwrap_or_default();
        let http = trust.apply(reqwest::Client::builder()).build().expect("an HTTP client");
        wait_until(Duration::from_secs(20), "the apiserver to be ready", || {
            let http = http.clone();
            let url = url.clone();
            async move { http.get(format!("{url}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        let admin_token = std::fs::read_to_string(&token_file).ok().map(|t| t.trim().to_string());
        ApiServer { url, ca, proc, log, admin_token }
    }

    /// How clients of this server verify it.
    pub fn trust(&self) -> nexus_client::tls::Trust {
        self.ca.as_deref().map(trust).unwrap_or_default()
    }

    /// A client with the bootstrap admin's token (none if this server did
    /// not make it: use [`ApiServer::client_with`]).
    pub fn client(&self) -> Client {
        Client::with_trust(&self.url, self.admin_token.clone(), self.trust())
    }

    /// A client presenting `token`.
    pub fn client_with(&self, token: &str) -> Client {
        Client::with_trust(&self.url, Some(token.to_string()), self.trust())
    }

    /// A raw connection to this server (TLS when it serves TLS), for
    /// requests sent byte for byte.
    pub async fn connect_raw(&self) -> std::io::Result<Box<dyn RawIo>> {
        let addr = self.url.split_once("://").map(|(_, a)| a).unwrap_or(&self.url);
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        match &self.ca {
            None => Ok(Box::new(tcp)),
            Some(ca) => Ok(Box::new(tls_connect(tcp, ca, "127.0.0.1").await?)),
        }
    }

    /// A raw HTTP client that trusts this server, for requests the typed
    /// client cannot make.
    pub fn http(&self) -> reqwest::Client {
        self.trust().apply(reqwest::Client::builder().timeout(Duration::from_secs(30))).build().expect("an HTTP client")
    }
}
