//! One owner per VM: a task that holds the VM's process, socket, TAP and
//! files, and takes typed [`Command`]s from the API, the metrics sampler
//! and the garbage collector, one at a time, in the order they came. No
//! path reaches a VM but through its owner, so a configuration, a
//! snapshot, a stop and a proxied call never interleave.
//!
//! A command runs to its end even when its caller stops waiting (a client
//! that timed out): a VMM launched is always recorded, a removal always
//! completes. An owner with nothing to do for a while ends; the next
//! command for its VM starts a new one, which reads the VM's state from its
//! run directory as the old one left it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_api::agent::{EnsureVm, SnapshotReport, SnapshotRequest, VmReport};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::error::AgentError;
use crate::host::Host;
use crate::paths::Uid;
use crate::server::proxy::ProxyError;
use crate::vm::probe::Probes;

/// How long an owner with no command waits before it ends.
const IDLE: Duration = Duration::from_secs(30);

/// What a caller gets back.
pub type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

/// What a VM's owner is asked to do.
#[derive(Debug)]
pub enum Command {
    /// Bring the VM to the request's state (start, stop, pause, resume,
    /// restart after an exit as its policy says) and report.
    Ensure(Box<EnsureVm>, Reply<VmReport>),
    /// Stop the VM and remove everything of it from the host.
    Remove(Reply<VmReport>),
    /// Report what is on the host for the VM (its readiness probe included).
    Report(Reply<VmReport>),
    /// Take snapshot `Uid` of the running VM.
    Snapshot(Uid, SnapshotRequest, Reply<SnapshotReport>),
    /// Forward a Firecracker API call to the VM's VMM.
    Proxy(Proxied, oneshot::Sender<Result<axum::response::Response, ProxyError>>),
    /// Have the VMM write its metrics now.
    FlushMetrics(oneshot::Sender<()>),
}

/// A Firecracker API call forwarded to a VMM.
#[derive(Debug)]
pub struct Proxied {
    pub method: axum::http::Method,
    pub path: String,
    pub body: bytes::Bytes,
}

/// A command with the span and request id it was sent under, so what its
/// owner logs while running it carries the caller's request id.
#[derive(Debug)]
struct Envelope {
    command: Command,
    span: tracing::Span,
    request_id: Option<String>,
}

/// The owner of one VM: the VM, the host it is on, and the readiness
/// probes' progress (kept across owners, as an owner may end between calls).
#[derive(Debug)]
pub struct VmOwner {
    pub uid: Uid,
    pub host: Arc<Host>,
    pub probes: Arc<Probes>,
}

/// The owners of this node's VMs, by VM uid: where commands are sent.
#[derive(Debug)]
pub struct Owners {
    host: Arc<Host>,
    probes: Arc<Probes>,
    tasks: Mutex<HashMap<Uid, mpsc::UnboundedSender<Envelope>>>,
}

impl Owners {
    pub fn new(host: Arc<Host>) -> Arc<Self> {
        Arc::new(Owners { host, probes: Default::default(), tasks: Mutex::default() })
    }

    /// Hands `command` to VM `uid`'s owner, starting one if it has none.
    /// Sent under the table's lock, so an owner that ends for idleness
    /// (under the same lock) never leaves a command behind.
    fn send(self: &Arc<Self>, uid: &Uid, command: Command) {
        let envelope = Envelope { command, span: tracing::Span::current(), request_id: nexus_client::trace::current() };
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let envelope = match tasks.get(uid) {
            Some(tx) => match tx.send(envelope) {
                Ok(()) => return,
                // Its owner ended (it panicked): a new one takes over.
                Err(mpsc::error::SendError(returned)) => returned,
            },
            None => envelope,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(envelope);
        tasks.insert(uid.clone(), tx);
        let owner = VmOwner { uid: uid.clone(), host: self.host.clone(), probes: self.probes.clone() };
        tokio::spawn(run(self.clone(), owner, rx));
    }

    /// Sends a command built around `reply` and returns where its answer
    /// will come, without waiting for it.
    pub fn tell<T>(
        self: &Arc<Self>,
        uid: &Uid,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> oneshot::Receiver<T> {
        let (reply, answer) = oneshot::channel();
        self.send(uid, command(reply));
        answer
    }

    /// Sends a command built around `reply` and waits for the answer.
    pub async fn ask<T>(
        self: &Arc<Self>,
        uid: &Uid,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, AgentError> {
        let (reply, answer) = oneshot::channel();
        self.send(uid, command(reply));
        answer.await.map_err(|_| AgentError::Io {
            what: format!("VM {uid}'s owner"),
            source: std::io::Error::other("it ended without answering"),
        })
    }

    /// Forgets `uid`'s owner if it has no command waiting: returns whether
    /// it may end.
    fn retire(&self, uid: &Uid, rx: &mpsc::UnboundedReceiver<Envelope>) -> bool {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if !rx.is_empty() {
            return false;
        }
        tasks.remove(uid);
        true
    }

    /// How many VMs have an owner now.
    pub fn len(&self) -> usize {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no VM has an owner now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The owner's loop: each command in turn, until it has been idle for a
/// while or its VM was removed.
async fn run(owners: Arc<Owners>, owner: VmOwner, mut rx: mpsc::UnboundedReceiver<Envelope>) {
    loop {
        let envelope = tokio::select! {
            next = rx.recv() => next,
            () = tokio::time::sleep(IDLE) => None,
        };
        let Some(Envelope { command, span, request_id }) = envelope else {
            if owners.retire(&owner.uid, &rx) {
                return;
            }
            continue;
        };
        let removed = matches!(command, Command::Remove(_));
        let work = owner.handle(command).instrument(span);
        match request_id {
            Some(id) => nexus_client::trace::scope(id, work).await,
            None => work.await,
        }
        if removed && owners.retire(&owner.uid, &rx) {
            return;
        }
    }
}

impl VmOwner {
    async fn handle(&self, command: Command) {
        match command {
            Command::Ensure(req, reply) => {
                let _ = reply.send(self.ensure(&req).await);
            }
            Command::Remove(reply) => {
                let _ = reply.send(self.remove().await);
            }
            Command::Report(reply) => {
                let _ = reply.send(self.observe(None).await);
            }
            Command::Snapshot(snap, req, reply) => {
                let _ = reply.send(self.snapshot(&snap, &req).await);
            }
            Command::Proxy(call, reply) => {
                let run_dir = &self.host.cfg.run_dir;
                let _ = reply
                    .send(crate::server::proxy::forward(run_dir, &self.uid, &call.method, &call.path, call.body).await);
            }
            Command::FlushMetrics(reply) => {
                if let Ok(socket) = crate::server::proxy::socket_for(&self.host.cfg.run_dir, &self.uid) {
                    let _ = crate::firecracker::FcClient::new(socket).flush_metrics().await;
                }
                let _ = reply.send(());
            }
        }
    }

    /// Takes snapshot `snap` of this VM (see [`crate::vm::snapshots::create`]),
    /// holding the snapshot's files while it is written.
    async fn snapshot(&self, snap: &Uid, req: &SnapshotRequest) -> Result<SnapshotReport, AgentError> {
        let _files = self.host.snapshot_files.hold(snap).await;
        let paths = self.host.paths(&self.uid)?;
        crate::vm::snapshots::create(&self.host.cfg.run_dir, &self.uid, &paths, snap, req.resume_after).await
    }
}
