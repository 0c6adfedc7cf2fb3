//! The API server on the unix socket: HTTP/1.1, one request at a time per
//! connection, as Firecracker serves it.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::args::Args;
use crate::console;
use crate::vmm::{After, Reply, Vmm};

/// Largest request body accepted (Firecracker's default payload limit).
const MAX_PAYLOAD: usize = 51_200;
/// How often metrics are written without a FlushMetrics.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// Serves the API until the guest shuts down; returns the exit code.
pub async fn serve(args: Args) -> Result<u8, String> {
    // Tests of crash recovery need a VMM that is slow to come up.
    if let Some(ms) = std::env::var("FIRECRACKER_SIM_STARTUP_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // A VMM broken into by its guest would try the host's files: this
    // shows on the console whether the jail lets it.
    if let Ok(path) = std::env::var("FIRECRACKER_SIM_TRY_OPEN") {
        match std::fs::File::open(&path) {
            Ok(_) => println!("firecracker-sim: opened {path}"),
            Err(e) => println!("firecracker-sim: cannot open {path}: {e}"),
        }
    }
    let mut configured = Vmm::new(args.id.clone());
    // As Firecracker does, before its API is up: a log or metrics file
    // that cannot be opened ends the process.
    configured.use_logger(args.logger.clone()).map_err(|e| format!("Failed to initialize the logger: {e}"))?;
    if let Some(path) = &args.metrics_path {
        configured.use_metrics(path).map_err(|e| format!("Failed to initialize metrics: {e}"))?;
    }
    // Firecracker refuses to start when the socket path exists.
    let mut listener = Some(
        UnixListener::bind(&args.api_sock)
            .map_err(|e| format!("Failed to open the API socket at {}: {e}", args.api_sock.display()))?,
    );
    let vmm = Arc::new(Mutex::new(configured));
    let (after_tx, mut after_rx) = mpsc::unbounded_channel::<After>();
    let mut metrics = tokio::time::interval(METRICS_PERIOD);
    metrics.tick().await;
    // A guest honouring Ctrl+Alt+Del powers off a moment later; until then
    // the API answers as Firecracker's does (the guest is still running).
    let power_off = Duration::from_millis(
        std::env::var("FIRECRACKER_SIM_SHUTDOWN_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(300),
    );
    let mut powering_off: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    // A VMM that takes a while to exit on SIGTERM (and writes its files on
    // the way out) makes the agent's stop and removal race visible.
    let exit_delay = Duration::from_millis(
        std::env::var("FIRECRACKER_SIM_EXIT_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0),
    );
    // Without the flag SIGTERM kills at once, as it does Firecracker.
    let mut terminated = if exit_delay.is_zero() {
        None
    } else {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| format!("cannot handle SIGTERM: {e}"))?,
        )
    };
    loop {
        tokio::select! {
            accepted = async { listener.as_ref().expect("guarded").accept().await }, if listener.is_some() => {
                let Ok((stream, _)) = accepted else { continue };
                let vmm = vmm.clone();
                let after_tx = after_tx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(vmm.clone(), after_tx.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            Some(after) = after_rx.recv() => match after {
                After::Booted => console::start(vmm.clone()),
                After::Fail => {
                    // No new connection from now on: a client connecting to a
                    // Firecracker that is exiting is refused, not reset. The
                    // answer in flight goes out first, then the process ends.
                    drop(listener.take());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    lock(&vmm).log("main", "ERROR", "Loading the snapshot failed; exiting.");
                    return Ok(1);
                }
                After::Shutdown => {
                    powering_off.get_or_insert_with(|| Box::pin(tokio::time::sleep(power_off)));
                }
                After::Nothing => {}
            },
            _ = async { powering_off.as_mut().expect("guarded").await }, if powering_off.is_some() => {
                lock(&vmm).log("main", "INFO", "Vmm is stopping.");
                return Ok(0);
            }
            Some(_) = async { terminated.as_mut().expect("guarded").recv().await }, if terminated.is_some() => {
                // Tearing a VM down takes a moment; the last metrics are
                // written on the way out, into the VM's directory.
                tokio::time::sleep(exit_delay).await;
                lock(&vmm).flush_metrics();
                // Then end by the signal, as an unhandled SIGTERM would.
                // SAFETY: restoring the default disposition of SIGTERM.
                unsafe {
                    let _ = nix::sys::signal::signal(nix::sys::signal::Signal::SIGTERM, nix::sys::signal::SigHandler::SigDfl);
                }
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
                return Ok(143);
            }
            _ = metrics.tick() => lock(&vmm).flush_metrics(),
        }
    }
}

fn lock(vmm: &Arc<Mutex<Vmm>>) -> std::sync::MutexGuard<'_, Vmm> {
    vmm.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn handle(
    vmm: Arc<Mutex<Vmm>>,
    after_tx: mpsc::UnboundedSender<After>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(respond(Reply::fault(400, format!("Failed to read the request body: {e}")))),
    };
    if body.len() > MAX_PAYLOAD {
        return Ok(respond(Reply::fault(
            400,
            format!(
                "Request payload with size {} is larger than the limit of {MAX_PAYLOAD} allowed by server.",
                body.len()
            ),
        )));
    }
    if method == "PUT" && path == "/snapshot/create" {
        // Writing a guest's memory takes time (a flag, for tests that act
        // in the middle of a snapshot).
        if let Some(ms) = std::env::var("FIRECRACKER_SIM_SNAPSHOT_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    let (reply, after) = lock(&vmm).handle(&method, &path, &body);
    if after != After::Nothing {
        let _ = after_tx.send(after);
    }
    Ok(respond(reply))
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(reply.status).header("Server", "Firecracker API");
    let body = match reply.body {
        Some(v) => {
            builder = builder.header("Content-Type", "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    builder.body(Full::new(body)).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
