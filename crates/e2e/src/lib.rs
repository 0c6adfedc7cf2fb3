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

pub mod apiserver;
pub mod cluster;
pub mod host;
pub mod multinode;
pub mod pki;

pub use apiserver::*;
pub use cluster::*;
pub use pki::*;

/// Whether the test runs as root (needed for namespaces, bridges and TAPs).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Where `examples/vm.yaml` and the tests find their kernel and disk.
pub const EXAMPLE_IMAGES: &str = "/var/lib/nexus/images";

/// Moves the calling thread into a new network namespace with `lo` up.
///
/// # Panics
/// When the namespace cannot be created (not root) or `ip` is missing.
pub fn enter_private_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run the tests as root");
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
}

/// [`enter_private_netns`], and a mount namespace of its own in which
/// [`EXAMPLE_IMAGES`] is a fresh tmpfs holding placeholder images (as
/// `hack/images.sh` makes them; the simulated VMM only opens them): the
/// processes a test starts see only the images it made, never the host's
/// (a user's real image must not change what a test tests), and nothing a
/// test writes there reaches the host. On the host the directory is at
/// most created, empty, as a mount point.
///
/// # Panics
/// When the namespaces cannot be made (not root) or `ip` is missing.
pub fn enter_test_namespaces() {
    use nix::mount::{MsFlags, mount};
    enter_private_netns();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS): run the tests as root");
    // Mounts made here stay here.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .expect("making the test's mounts private");
    std::fs::create_dir_all(EXAMPLE_IMAGES).expect("the images' mount point");
    mount(Some("tmpfs"), EXAMPLE_IMAGES, Some("tmpfs"), MsFlags::empty(), Some("mode=0755"))
        .expect("a private tmpfs for the test's images");
    write_example_images(Path::new(EXAMPLE_IMAGES));
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
/// after 4 s without heartbeats, a 2 s leader lease, garbage collection every
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
            "2",
            "--gc-interval-secs",
            "1",
            "--gc-grace-secs",
            "3",
        ]);
    }
    args.extend(["--metrics-listen", metrics_listen]);
    spawn("controller", &bin("nexus-controller"), &args, log)
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

/// Makes sure the host's [`EXAMPLE_IMAGES`] hold a kernel and a disk, with
/// placeholders when they do not (for the benchmarks, which run on the
/// host as `hack/up.sh` does; the simulated VMM only opens them, a real
/// Firecracker needs real ones).
pub fn ensure_host_example_images() {
    write_example_images(Path::new(EXAMPLE_IMAGES));
}

fn write_example_images(dir: &Path) {
    std::fs::create_dir_all(dir).expect("creating the images' directory");
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

/// Runs `test` on a fresh thread inside its own network and mount
/// namespaces (see [`enter_test_namespaces`]), on a single-threaded runtime
/// (so every socket it opens is in the namespace).
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
        enter_test_namespaces();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(test());
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

pub mod postgres;
pub mod webdriver;

/// What `nexusctl describe KIND NAME` says of an object's conditions and
/// recent Events, for a benchmark or test that gives up on it: the reason
/// is most often there. `run` runs nexusctl (a cluster's own).
pub fn last_words(run: impl Fn(&[&str]) -> (bool, String, String), kind: &str, name: &str) -> String {
    let (_, out, err) = run(&["describe", kind, name]);
    match out.find("Conditions:") {
        Some(at) => out[at..].to_string(),
        None => format!("(describe {kind} {name}: {}{})", out.trim(), err.trim()),
    }
}

/// `nexusctl describe KIND NAME` (run by `run`, a cluster's own) once its
/// output holds `want`, or as it is after 10 s: Events are written in
/// batches, a moment after what they record.
pub async fn describe_showing(
    run: impl Fn(&[&str]) -> (bool, String, String),
    kind: &str,
    name: &str,
    want: &str,
) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = run(&["describe", kind, name]);
        if (ok && out.contains(want)) || Instant::now() >= deadline {
            return (ok, format!("{out}{err}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The message of the Event with `reason` about the object called `name`,
/// once there is one (Events are written in batches, a moment after what
/// they record); panics, naming the reasons seen, after 10 s.
pub async fn event_message(client: &nexus_client::Client, name: &str, reason: &str) -> String {
    let params = nexus_client::ListParams {
        field_selector: Some(format!("spec.involvedObject.name={name}")),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = client.list::<nexus_api::EventSpec>(None, &params).await.expect("listing events").items;
        if let Some(e) = events.iter().find(|e| e.spec.reason == reason) {
            return e.spec.message.clone();
        }
        let seen: Vec<_> = events.iter().map(|e| e.spec.reason.as_str()).collect();
        assert!(Instant::now() < deadline, "no {reason} event about {name}; saw {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every audit record `client`'s apiserver serves, page by page.
pub async fn all_audit_records(client: &nexus_client::Client) -> Vec<nexus_api::auth::AuditRecord> {
    let (mut all, mut next) = (Vec::new(), None::<String>);
    loop {
        let mut query = vec![("limit", "500".to_string())];
        if let Some(c) = &next {
            query.push(("continue", c.clone()));
        }
        let page = client.audit(&query).await.expect("listing audit records");
        let done = page.items.is_empty() || page.continue_token.is_none();
        all.extend(page.items);
        if done {
            return all;
        }
        next = page.continue_token;
    }
}
