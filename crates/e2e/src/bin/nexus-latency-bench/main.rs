//! `nexus-latency-bench`: how long one VM takes to start, driven by hand and
//! driven through nexus, in one run on one machine.
//!
//! 1. Raw: the VMM is started and configured by hand, as its documentation
//!    shows (spawn with `--api-sock`, wait for the socket, PUT the machine,
//!    boot source, drive and network interface one after another, then
//!    InstanceStart), and timed to the guest's boot line on its console.
//! 2. nexus: one apiserver, controller and agent (the agent in its own
//!    network namespace); VMs created one at a time through the API, each
//!    timed to phase Running (seen on a watch) and to its boot line, with a
//!    breakdown into phases taken from the timestamps the processes record:
//!    the object's creationTimestamp (apiserver), the Scheduled condition
//!    (controller), the VMM's launch and InstanceStart (agent, in
//!    `status.runtime`) and the Ready condition (controller, on the agent's
//!    report).
//!
//! With `--restore`, the same for a VM started from a snapshot, and with
//! `--fork N`, N copies from one fork request (see `restore`).
//!
//! The VMM is `firecracker` when `--firecracker PATH` is given (it then
//! needs a real `--kernel` and `--rootfs`), else the simulator; the report
//! says which.

mod restore;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use nexus_api::meta::find_condition;
use nexus_api::{Vm, VmPhase, VmSpec};
use nexus_client::{Event, ListParams};
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::percentile as pct;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

struct Args {
    vms: usize,
    restore: bool,
    fork: Option<u32>,
    raw_runs: usize,
    firecracker: Option<PathBuf>,
    kernel: String,
    rootfs: String,
    boot_line: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        vms: 100,
        restore: false,
        fork: None,
        raw_runs: 20,
        firecracker: None,
        kernel: "/var/lib/nexus/images/vmlinux".into(),
        rootfs: "/var/lib/nexus/images/rootfs.ext4".into(),
        boot_line: "login:".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--vms" => args.vms = value()?.parse()?,
            "--restore" => args.restore = true,
            "--fork" => args.fork = Some(value()?.parse()?),
            "--raw-runs" => args.raw_runs = value()?.parse()?,
            "--firecracker" => args.firecracker = Some(value()?.into()),
            "--kernel" => args.kernel = value()?,
            "--rootfs" => args.rootfs = value()?,
            "--boot-line" => args.boot_line = value()?,
            "--help" | "-h" => {
                println!(
                    "nexus-latency-bench [--vms 100] [--raw-runs 20] [--restore | --fork N] [--firecracker PATH \
                     --kernel K --rootfs R] [--boot-line TEXT]"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}; see --help"),
        }
    }
    anyhow::ensure!(args.vms > 0 && args.raw_runs > 0, "--vms and --raw-runs must be positive");
    Ok(args)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One HTTP/1.1 request on a fresh connection to a unix socket; the status.
async fn http(socket: &Path, method: &str, path: &str, body: &str) -> anyhow::Result<u16> {
    tokio::time::timeout(Duration::from_secs(5), exchange(socket, method, path, body))
        .await
        .with_context(|| format!("{method} {path}: no answer within 5 s"))?
}

async fn exchange(socket: &Path, method: &str, path: &str, body: &str) -> anyhow::Result<u16> {
    let mut stream = UnixStream::connect(socket).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    // Read the head, then as much body as it announces (Firecracker keeps
    // the connection open).
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let (head_len, body_len) = loop {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "{method} {path}: the connection closed before an answer");
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, len);
        }
    };
    while answer.len() < head_len + body_len {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "{method} {path}: the body was cut short");
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    anyhow::ensure!((200..300).contains(&status), "{method} {path}: {text}");
    Ok(status)
}

/// Spawns a VMM with its console in `dir/console.log` (as the agent keeps
/// it) and tries its socket every millisecond until it answers, as one
/// does by hand; returns the process, its socket and when it was spawned.
async fn spawn_vmm(vmm: &Path, dir: &Path, id: &str) -> anyhow::Result<(tokio::process::Child, PathBuf, Instant)> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("api.sock");
    let _ = std::fs::remove_file(&socket);
    let console = std::fs::File::create(dir.join("console.log"))?;
    let started = Instant::now();
    let child = tokio::process::Command::new(vmm)
        .args(["--api-sock", &socket.display().to_string(), "--id", id])
        .stdout(console)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", vmm.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(&socket, "GET", "/", "").await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the VMM's socket did not answer in 5 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok((child, socket, started))
}

/// Configures the VMM at `socket` as Firecracker's documentation shows
/// (machine, boot source, root drive, an interface on `tap`, one request
/// after another) and starts its guest.
async fn boot_by_hand(socket: &Path, args: &Args, tap: &str) -> anyhow::Result<()> {
    http(socket, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 128}"#).await?;
    let boot = format!(r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1"}}"#, args.kernel);
    http(socket, "PUT", "/boot-source", &boot).await?;
    let drive = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
        args.rootfs
    );
    http(socket, "PUT", "/drives/rootfs", &drive).await?;
    let nic = format!(r#"{{"iface_id": "eth0", "host_dev_name": "{tap}"}}"#);
    http(socket, "PUT", "/network-interfaces/eth0", &nic).await?;
    http(socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).await?;
    Ok(())
}

/// One VM started by hand; milliseconds from spawn to the socket answering,
/// to InstanceStart answered and to the boot line.
async fn raw_once(vmm: &Path, dir: &Path, i: usize, args: &Args) -> anyhow::Result<(f64, f64, f64)> {
    let vm_dir = dir.join(format!("raw-{i}"));
    let tap = format!("nxlat{i}");
    nexus_e2e::run_ok(std::process::Command::new("ip").args(["tuntap", "add", "dev", &tap, "mode", "tap"]));
    let (mut child, socket, started) = spawn_vmm(vmm, &vm_dir, &format!("raw-{i}")).await?;
    let listening = started.elapsed();
    let (console, boot_line) = (vm_dir.join("console.log"), args.boot_line.clone());
    let booted = tokio::spawn(async move {
        wait_boot_line(&console, &boot_line).await.ok()?;
        Some(Instant::now())
    });
    boot_by_hand(&socket, args, &tap).await?;
    let instance_started = started.elapsed();
    let boot_at = tokio::time::timeout(Duration::from_secs(10), booted)
        .await
        .context("no boot line within 10 s")??
        .context("the console ended before the boot line")?;
    let _ = child.kill().await;
    nexus_e2e::run_ok(std::process::Command::new("ip").args(["link", "del", &tap]));
    Ok((ms(listening), ms(instance_started), ms(boot_at - started)))
}

/// The raw runs, in a network namespace of their own (for their TAPs).
fn raw(vmm: PathBuf, dir: PathBuf, args: Arc<Args>) -> anyhow::Result<Vec<(f64, f64, f64)>> {
    std::thread::spawn(move || {
        nexus_e2e::enter_private_netns();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut runs = Vec::new();
            for i in 0..args.raw_runs {
                runs.push(raw_once(&vmm, &dir, i, &args).await?);
            }
            Ok(runs)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the raw runs panicked"))?
}

/// What one VM started through nexus went through, in milliseconds.
#[derive(Debug, Default, Clone)]
struct Phases {
    apiserver: f64,
    controller: f64,
    agent: f64,
    vmm: f64,
    report: f64,
    watch: f64,
    running: f64,
    boot_line: f64,
}

fn since(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or_default() as f64 / 1000.0
}

fn phases(vm: &Vm, sent: DateTime<Utc>, seen: DateTime<Utc>, boot_line: DateTime<Utc>) -> Option<Phases> {
    let status = vm.status.as_ref()?;
    let created = vm.metadata.creation_timestamp?;
    let scheduled = find_condition(&status.conditions, "Scheduled")?.last_transition_time;
    let ready = find_condition(&status.conditions, "Ready")?.last_transition_time;
    let runtime = status.runtime.as_ref()?;
    let instance_started = runtime.started_at?;
    let launched = instance_started - chrono::Duration::milliseconds(runtime.boot_millis? as i64);
    Some(Phases {
        apiserver: since(sent, created),
        controller: since(created, scheduled),
        agent: since(scheduled, launched),
        vmm: since(launched, instance_started),
        report: since(instance_started, ready),
        watch: since(ready, seen),
        running: since(sent, seen),
        boot_line: since(sent, boot_line),
    })
}

fn vm_object(i: usize, args: &Args) -> anyhow::Result<Vm> {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "vcpu": 1, "memMib": 128, "kernel": args.kernel, "rootfs": args.rootfs
    }))?;
    let mut vm = Vm::new(&format!("lat-{i:04}"), Some("default"), spec);
    vm.metadata.labels.insert("bench".into(), "latency".into());
    Ok(vm)
}

/// When each VM was first seen Running, by name, with that copy of it.
type SeenRunning = HashMap<String, (DateTime<Utc>, Vm)>;

/// Waits (polling the file every millisecond) for `line` on a console.
async fn wait_boot_line(console: &Path, line: &str) -> anyhow::Result<DateTime<Utc>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::fs::read_to_string(console).is_ok_and(|text| text.contains(line)) {
            return Ok(Utc::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "no boot line on {} within 10 s", console.display());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn through_nexus(vmm: &Path, dir: &Path, args: &Args) -> anyhow::Result<Vec<Phases>> {
    let mut cluster = MultiNode::start_for_bench(&dir.join("cluster"), 1, args.vms as u32 + 10, vmm, &[]).await;
    let client = cluster.client();
    // One watch for the whole run: when each VM was first seen Running.
    let running: Arc<Mutex<SeenRunning>> = Default::default();
    let wake = Arc::new(tokio::sync::Notify::new());
    let params = ListParams { label_selector: Some("bench=latency".into()), ..Default::default() };
    let mut stream = Box::pin(client.watch::<VmSpec>(Some("default"), &params, None).await?);
    let (seen, woken) = (running.clone(), wake.clone());
    tokio::spawn(async move {
        while let Some(Ok(event)) = stream.next().await {
            if let Event::Added(vm) | Event::Modified(vm) = event
                && vm.status_or_default().phase == VmPhase::Running
            {
                let at = Utc::now();
                seen.lock().unwrap_or_else(|p| p.into_inner()).entry(vm.name().to_string()).or_insert((at, vm));
                woken.notify_waiters();
            }
        }
    });
    let mut out = Vec::new();
    for i in 0..args.vms {
        let vm = vm_object(i, args)?;
        let name = vm.name().to_string();
        let sent = Utc::now();
        let created = client.create(&vm).await?;
        // The agent keeps a VM's console at <run dir>/vms/<uid>/console.log.
        let console = cluster.dir.join("run-1").join("vms").join(created.uid()).join("console.log");
        let line = args.boot_line.clone();
        let boot_line = tokio::spawn(async move { wait_boot_line(&console, &line).await });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (seen_at, vm) = loop {
            let notified = wake.notified();
            if let Some(found) = running.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned() {
                break found;
            }
            if Instant::now() >= deadline {
                let words = nexus_e2e::last_words(|a| cluster.nexusctl(a), "vm", &name);
                anyhow::bail!("VM {name} not Running within 30 s\n{words}");
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        };
        let boot_line = boot_line.await??;
        out.push(phases(&vm, sent, seen_at, boot_line).context("a Running VM without its timestamps")?);
    }
    let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "-l", "bench=latency", "--wait", "--timeout", "120"]);
    anyhow::ensure!(ok, "deleting the VMs: {err}");
    cluster.stop();
    Ok(out)
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let (vmm, which) = match &args.firecracker {
        Some(path) => (path.clone(), format!("firecracker ({})", path.display())),
        None => (nexus_e2e::bin("firecracker-sim"), "firecracker-sim (simulated VMM)".to_string()),
    };
    if args.firecracker.is_none() {
        nexus_e2e::ensure_host_example_images();
    }
    let tmp = tempfile::Builder::new().prefix("nexus-latency-bench").tempdir_in("/var/tmp")?;
    // NEXUS_BENCH_KEEP=1 keeps the processes' logs for a closer look.
    let (dir, _guard) = if std::env::var_os("NEXUS_BENCH_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("keeping {}", kept.display());
        (kept, None)
    } else {
        (tmp.path().to_path_buf(), Some(tmp))
    };
    if let Some(copies) = args.fork {
        eprintln!("fork: {copies} copies of one VM with {which} ...");
        let json = restore::fork(&vmm, &dir, &args, copies).await?;
        println!("{}", serde_json::json!({"vmm": which, "fork": json}));
        return Ok(());
    }
    if args.restore {
        return restores(&vmm, &dir, &which, args).await;
    }
    eprintln!("raw: {} VMs started by hand with {which} ...", args.raw_runs);
    let raw = raw(vmm.clone(), dir.clone(), args.clone())?;
    eprintln!("nexus: {} VMs, one at a time ...", args.vms);
    let runs = through_nexus(&vmm, &dir, &args).await?;

    let col = |f: fn(&Phases) -> f64| sorted(runs.iter().map(f).collect());
    let raw_col = |f: fn(&(f64, f64, f64)) -> f64| sorted(raw.iter().map(f).collect());
    let raw_boot = raw_col(|r| r.2);
    let nexus_boot = col(|p| p.boot_line);
    let ratio = pct(&nexus_boot, 0.5) / pct(&raw_boot, 0.5).max(f64::EPSILON);

    println!("VMM: {which}; raw runs: {}; nexus VMs: {} (one at a time)", raw.len(), runs.len());
    println!("{:<52} {:>9} {:>9}", "measure (ms)", "p50", "p99");
    let row = |name: &str, v: &[f64]| println!("{name:<52} {:>9.2} {:>9.2}", pct(v, 0.5), pct(v, 0.99));
    row("raw: spawn -> API socket answers", &raw_col(|r| r.0));
    row("raw: spawn -> InstanceStart answered", &raw_col(|r| r.1));
    row("raw: spawn -> boot line", &raw_boot);
    row("nexus: create -> Running (seen on a watch)", &col(|p| p.running));
    row("nexus: create -> boot line", &nexus_boot);
    let fifth = (runs.len() / 5).max(1);
    let early: Vec<f64> = sorted(runs[..fifth].iter().map(|p| p.running).collect());
    let late: Vec<f64> = sorted(runs[runs.len() - fifth..].iter().map(|p| p.running).collect());
    row(&format!("  first {fifth} VMs on the node: create -> Running"), &early);
    row(&format!("  last {fifth} VMs on the node: create -> Running"), &late);
    row("  apiserver: request -> stored", &col(|p| p.apiserver));
    row("  controller: stored -> placed", &col(|p| p.controller));
    row("  agent: placed -> VMM launched", &col(|p| p.agent));
    row("  VMM: launched -> InstanceStart answered", &col(|p| p.vmm));
    row("  report: InstanceStart -> status Ready", &col(|p| p.report));
    row("  watch: status Ready -> seen by the client", &col(|p| p.watch));
    println!("{:<52} {:>9.2}", "ratio nexus / raw (boot line, p50)", ratio);
    let p = |v: &[f64]| serde_json::json!({"p50": pct(v, 0.5), "p99": pct(v, 0.99)});
    let json = serde_json::json!({
        "vmm": which,
        "rawRuns": raw.len(),
        "vms": runs.len(),
        "raw": {"socket": p(&raw_col(|r| r.0)), "instanceStart": p(&raw_col(|r| r.1)), "bootLine": p(&raw_boot)},
        "nexus": {
            "running": p(&col(|p| p.running)), "bootLine": p(&nexus_boot),
            "apiserver": p(&col(|p| p.apiserver)), "controller": p(&col(|p| p.controller)),
            "agent": p(&col(|p| p.agent)), "vmm": p(&col(|p| p.vmm)),
            "report": p(&col(|p| p.report)), "watch": p(&col(|p| p.watch)),
        },
        "ratioBootLineP50": ratio,
    });
    println!("{json}");
    Ok(())
}

/// `--restore`: restores by hand, then through nexus, and their ratio.
async fn restores(vmm: &Path, dir: &Path, which: &str, args: Arc<Args>) -> anyhow::Result<()> {
    eprintln!("raw: a snapshot, then {} restores by hand with {which} ...", args.raw_runs);
    let raw = restore::raw_restores(vmm.to_path_buf(), dir.to_path_buf(), args.clone())?;
    eprintln!("nexus: a snapshot, then {} VMs restored one at a time ...", args.vms);
    let (runs, paused) = restore::through_nexus(vmm, dir, &args).await?;
    let col = |f: fn(&Phases) -> f64| sorted(runs.iter().map(f).collect());
    let loads = sorted(raw.loads.clone());
    let running = col(|p| p.running);
    let ratio = pct(&running, 0.5) / pct(&loads, 0.5).max(f64::EPSILON);
    println!("VMM: {which}; raw restores: {}; nexus restores: {} (one at a time)", loads.len(), runs.len());
    println!("{:<52} {:>9} {:>9}", "measure (ms)", "p50", "p99");
    let row = |name: &str, v: &[f64]| println!("{name:<52} {:>9.2} {:>9.2}", pct(v, 0.5), pct(v, 0.99));
    println!("{:<52} {:>9.2}", "raw: pause -> full snapshot written", raw.snapshot);
    println!("{:<52} {:>9}", "nexus: source paused for its snapshot", paused);
    row("raw: spawn -> snapshot loaded and resumed", &loads);
    row("nexus: create -> Running (seen on a watch)", &running);
    row("  apiserver: request -> stored", &col(|p| p.apiserver));
    row("  controller: stored -> placed", &col(|p| p.controller));
    row("  agent: placed -> VMM launched", &col(|p| p.agent));
    row("  VMM: launched -> loaded and resumed", &col(|p| p.vmm));
    row("  report: resumed -> status Ready", &col(|p| p.report));
    row("  watch: status Ready -> seen by the client", &col(|p| p.watch));
    println!("{:<52} {:>9.2}", "ratio nexus / raw (p50)", ratio);
    let p = |v: &[f64]| serde_json::json!({"p50": pct(v, 0.5), "p99": pct(v, 0.99)});
    let json = serde_json::json!({
        "vmm": which, "restore": true, "rawRuns": loads.len(), "vms": runs.len(),
        "raw": {"snapshotMs": raw.snapshot, "load": p(&loads)},
        "nexus": {"pausedMs": paused, "running": p(&running), "apiserver": p(&col(|p| p.apiserver)),
            "controller": p(&col(|p| p.controller)), "agent": p(&col(|p| p.agent)), "vmm": p(&col(|p| p.vmm)),
            "report": p(&col(|p| p.report)), "watch": p(&col(|p| p.watch))},
        "ratioP50": ratio,
    });
    println!("{json}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    anyhow::ensure!(nexus_e2e::is_root(), "nexus-latency-bench needs root (network namespaces, bridges, TAPs)");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(bench(args))
}
