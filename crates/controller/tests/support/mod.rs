//! Test fixtures that need no root: a real apiserver serving a temporary
//! SQLite database over real HTTPS in this process, scripted node agents
//! that answer the agent API (over HTTPS too) as told, and the controllers
//! of this crate. One CA, made per test, signs every certificate.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::Utc;
use nexus_api::agent::{CollectReport, EnsureVm, Inventory, ObservedState, VmReport};
use nexus_api::conditions::READY as CONDITION_READY;
use nexus_api::meta::set_condition;
use nexus_api::node::NodeCapacity;
use nexus_api::vm::VmExit;
use nexus_api::{ConditionStatus, ErrorBody, Node, NodeSpec, NodeStatus, PowerState};
use nexus_client::Client;
use nexus_controller::runtime::Manager;
use nexus_controller::{Context, Settings, gc, node_lifecycle, vm};

/// A test's CA in `dir/pki`, and a serving certificate for 127.0.0.1
/// under `name`.
pub fn pki(dir: &Path, name: &str) -> (PathBuf, Arc<rustls::ServerConfig>) {
    let pki = dir.join("pki");
    nexus_tls::pki::init_ca(&pki).unwrap();
    let issued = nexus_tls::pki::issue(&pki, name, &["127.0.0.1".into()]).unwrap();
    (pki.join(nexus_tls::pki::CA_CERT), nexus_tls::server_config(&issued.cert, &issued.key).unwrap())
}

/// Trust in the test CA under `dir`.
pub fn trust(dir: &Path) -> nexus_client::tls::Trust {
    nexus_client::tls::Trust::ca_file(&dir.join("pki").join(nexus_tls::pki::CA_CERT)).unwrap()
}

/// An apiserver in this process, restartable on the same port and file.
pub struct Api {
    pub url: String,
    /// The CA file its certificate is signed by.
    pub ca: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    /// The bootstrap admin's token.
    pub admin_token: String,
    addr: SocketAddr,
    db: PathBuf,
    retained: i64,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Api {
    /// Serves a fresh database in `dir`, keeping `retained` changes for watches.
    pub async fn start(dir: &Path, retained: i64) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ca, tls) = pki(dir, "apiserver");
        let mut api = Api {
            url: format!("https://{addr}"),
            ca,
            tls,
            admin_token: String::new(),
            addr,
            db: dir.join("nexus.db"),
            retained,
            shutdown: None,
            task: None,
        };
        api.serve(listener).await;
        api.admin_token = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_string();
        api
    }

    async fn serve(&mut self, listener: tokio::net::TcpListener) {
        let store =
            nexus_apiserver::store::Store::open_sqlite(&self.db).await.unwrap().with_retained_changes(self.retained);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut state = nexus_apiserver::AppState::new(store, rx.clone());
        state.bookmark_interval = Duration::from_millis(300);
        state.allow_raw_paths = true;
        let token_file = self.db.with_file_name("admin.token");
        nexus_apiserver::access::bootstrap(&state, &token_file).await.unwrap();
        let mut stop = rx;
        let serving = nexus_tls::Serving::Tls(self.tls.clone());
        let task = tokio::spawn(async move {
            let _ = nexus_tls::serve(listener, serving, nexus_apiserver::app(state), async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
        self.shutdown = Some(tx);
        self.task = Some(task);
    }

    /// Stops serving: open watches end, connections close.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Serves again on the same address and database.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener).await;
    }

    /// A client with the bootstrap admin's token.
    pub fn client(&self) -> Client {
        Client::with_trust(&self.url, Some(self.admin_token.clone()), self.trust())
    }

    /// Trust in this server's CA.
    pub fn trust(&self) -> nexus_client::tls::Trust {
        nexus_client::tls::Trust::ca_file(&self.ca).unwrap()
    }
}

/// What a scripted agent holds for one VM.
#[derive(Debug, Clone)]
pub struct AgentVm {
    pub req: EnsureVm,
    pub pid: u32,
    /// When set, the VMM "ended on its own" this way and stays down.
    pub exited: Option<VmExit>,
}

/// How a scripted agent answers, and what it was asked.
#[derive(Debug, Default)]
pub struct Script {
    pub vms: BTreeMap<String, AgentVm>,
    /// Uids whose ensure is refused with 422 and this Firecracker message.
    pub refuse: HashMap<String, String>,
    /// Every call, as `METHOD uid`.
    pub calls: Vec<String>,
    next_pid: u32,
}

/// A node agent that answers from a script, on a port of its own, to
/// callers presenting its own credential.
#[derive(Clone)]
pub struct ScriptedAgent {
    pub address: String,
    pub credential: String,
    pub script: Arc<Mutex<Script>>,
}

async fn check_credential(
    State(expected): State<Arc<String>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let presented = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    if presented != format!("Bearer {expected}") {
        return axum::http::StatusCode::UNAUTHORIZED.into_response();
    }
    next.run(req).await
}

fn report(uid: &str, vm: Option<&AgentVm>) -> VmReport {
    let (state, pid, exit) = match vm {
        None => (ObservedState::Absent, None, None),
        Some(v) if v.exited.is_some() => (ObservedState::Exited, None, v.exited.clone()),
        Some(v) => match v.req.state {
            PowerState::Running => (ObservedState::Running, Some(v.pid), None),
            PowerState::Paused => (ObservedState::Paused, Some(v.pid), None),
            PowerState::Stopped => (ObservedState::Stopped, None, None),
        },
    };
    VmReport {
        uid: uid.to_string(),
        state,
        runtime: nexus_api::vm::VmRuntime {
            pid,
            socket_path: None,
            tap_name: vm.map(|_| nexus_api::agent::tap_name(uid)),
            mac: vm.map(|v| v.req.mac.clone()),
            ip: None,
            log_path: None,
            console_path: None,
            started_at: pid.map(|_| Utc::now()),
            boot_millis: pid.map(|_| 1),
            restarts: 0,
            exit,
            ..Default::default()
        },
        probe: None,
    }
}

async fn ensure(
    State(script): State<Arc<Mutex<Script>>>,
    UrlPath(uid): UrlPath<String>,
    Json(req): Json<EnsureVm>,
) -> Result<Json<VmReport>, (axum::http::StatusCode, Json<ErrorBody>)> {
    let mut s = script.lock().unwrap();
    s.calls.push(format!("PUT {uid}"));
    if let Some(fault) = s.refuse.get(&uid).cloned() {
        let body = ErrorBody {
            error: "FirecrackerRejected".into(),
            message: "Firecracker refused boot-source".into(),
            status: 422,
            fault_message: Some(fault),
            suggestion: Some("check spec.kernel".into()),
            request_id: String::new(),
        };
        return Err((axum::http::StatusCode::UNPROCESSABLE_ENTITY, Json(body)));
    }
    s.next_pid += 1;
    let pid = 1000 + s.next_pid;
    let entry = s.vms.entry(uid.clone()).or_insert_with(|| AgentVm { req: req.clone(), pid, exited: None });
    entry.req = req;
    let v = entry.clone();
    Ok(Json(report(&uid, Some(&v))))
}

async fn remove(State(script): State<Arc<Mutex<Script>>>, UrlPath(uid): UrlPath<String>) -> Json<VmReport> {
    let mut s = script.lock().unwrap();
    s.calls.push(format!("DELETE {uid}"));
    s.vms.remove(&uid);
    Json(report(&uid, None))
}

async fn inventory(State(script): State<Arc<Mutex<Script>>>) -> Json<Inventory> {
    let s = script.lock().unwrap();
    let uids: Vec<String> = s.vms.keys().cloned().collect();
    Json(Inventory {
        vms: s.vms.iter().map(|(u, v)| report(u, Some(v))).collect(),
        taps: uids.iter().map(|u| nexus_api::agent::tap_name(u)).collect(),
        sockets: Vec::new(),
        run_dirs: uids,
        vmms: Vec::new(),
        snapshots: Vec::new(),
        spare_namespaces: 0,
    })
}

async fn collect(
    State(script): State<Arc<Mutex<Script>>>,
    Json(req): Json<nexus_api::agent::Collect>,
) -> Json<CollectReport> {
    let mut s = script.lock().unwrap();
    let mut removed = Vec::new();
    for uid in req.uids {
        s.vms.remove(&uid);
        removed.push(format!("vm {uid}"));
    }
    Json(CollectReport { removed })
}

impl ScriptedAgent {
    /// An agent accepting `credential`, serving HTTPS with `tls`.
    pub async fn start(credential: &str, tls: Arc<rustls::ServerConfig>) -> ScriptedAgent {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = Router::new()
            .route("/v1/vms/{uid}", put(ensure).delete(remove))
            .route("/v1/inventory", get(inventory))
            .route("/v1/gc", post(collect))
            .with_state(script.clone())
            .layer(axum::middleware::from_fn_with_state(Arc::new(credential.to_string()), check_credential));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("https://{}", listener.local_addr().unwrap());
        let never = std::future::pending::<()>();
        tokio::spawn(async move { nexus_tls::serve(listener, nexus_tls::Serving::Tls(tls), app, never).await });
        ScriptedAgent { address, credential: credential.to_string(), script }
    }

    pub fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }

    /// Calls made for `uid` so far.
    pub fn calls_for(&self, uid: &str) -> usize {
        self.script().calls.iter().filter(|c| c.ends_with(uid)).count()
    }
}

/// Writes node `name`'s status as its agent would: Ready, beating now.
pub async fn beat(api: &Client, name: &str, address: &str) {
    let mut node: Node = match api.get::<NodeSpec>("", name).await {
        Ok(n) => n,
        Err(_) => api.create(&Node::new(name, None, NodeSpec::default())).await.unwrap(),
    };
    let mut status = NodeStatus {
        address: address.to_string(),
        capacity: NodeCapacity { vcpu: 8, mem_mib: 8192, max_vms: 10 },
        last_heartbeat_time: Some(Utc::now()),
        conditions: node.status.clone().unwrap_or_default().conditions,
        ..Default::default()
    };
    set_condition(&mut status.conditions, CONDITION_READY, ConditionStatus::True, "AgentHeartbeat", "beating");
    node.status = Some(status);
    node.metadata.resource_version = None;
    api.replace_status(&node).await.unwrap();
}

/// A node: its scripted agent and the task beating for it.
pub struct FakeNode {
    pub name: String,
    pub agent: ScriptedAgent,
    beating: Option<tokio::task::JoinHandle<()>>,
}

impl FakeNode {
    /// Stops the heartbeats, as a dead agent would.
    pub fn go_silent(&mut self) {
        if let Some(t) = self.beating.take() {
            t.abort();
        }
    }
}

/// An apiserver, fake nodes and the controllers.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub api: Api,
    pub nodes: Vec<FakeNode>,
    controllers: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.controllers.abort();
        for n in &mut self.nodes {
            n.go_silent();
        }
    }
}

/// Settings for tests: quick rechecks and a short grace.
pub fn settings() -> Settings {
    Settings {
        workers: 4,
        per_node_concurrency: 4,
        resync: Duration::from_secs(60),
        recheck: Duration::from_millis(500),
        node_grace: chrono::Duration::seconds(2),
        gc_interval: Duration::from_millis(300),
        gc_grace: Duration::from_millis(600),
    }
}

impl Harness {
    /// Starts an apiserver, a Ready node with a scripted agent per name,
    /// and the VM, node-lifecycle and GC controllers (no election).
    pub async fn start(nodes: &[&str]) -> Harness {
        // The controllers' logs, shown for a failing test.
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
        let dir = tempfile::tempdir().unwrap();
        let api = Api::start(dir.path(), 100_000).await;
        let client = api.client();
        let mut fakes = Vec::new();
        for name in nodes {
            // Each node's own credential, which the controller reads from the apiserver.
            let credential = format!("scripted-agent-credential-of-{name}-0123456789");
            let (_, tls) = pki(dir.path(), &format!("agent-{name}"));
            let agent = ScriptedAgent::start(&credential, tls).await;
            beat(&client, name, &agent.address).await;
            let cred = nexus_api::auth::NodeCredential { secret: credential, previous: None };
            client.set_node_credential(name, &cred).await.unwrap();
            let (c, n, a) = (client.clone(), name.to_string(), agent.address.clone());
            let beating = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    beat(&c, &n, &a).await;
                }
            });
            fakes.push(FakeNode { name: name.to_string(), agent, beating: Some(beating) });
        }
        let req = nexus_api::auth::TokenRequest { subject: Some("system:controller".into()), ..Default::default() };
        let controller_token = client.create_token(&req).await.unwrap().token;
        let ctx = Context::new(Client::with_trust(&api.url, Some(controller_token), api.trust()), settings());
        let mut manager = Manager::new(None);
        manager.add(vm::controller(&ctx));
        manager.add(node_lifecycle::controller(&ctx));
        manager.add(gc::controller(&ctx));
        let controllers = tokio::spawn(async move { manager.run().await });
        Harness { dir, api, nodes: fakes, controllers }
    }

    pub fn client(&self) -> Client {
        self.api.client()
    }

    pub fn node(&self, name: &str) -> &FakeNode {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
