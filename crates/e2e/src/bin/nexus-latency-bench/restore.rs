//! `--restore`: a VM started from a snapshot, by hand and through nexus;
//! `--fork N`: N copies of a running VM from one fork request.
//!
//! By hand: a VM booted and snapshotted as Firecracker's documentation
//! shows (pause, `PUT /snapshot/create`), then, one run after another, a
//! new VMM spawned and `PUT /snapshot/load` with `resume_vm`, timed from
//! the spawn to the load's answer. Through nexus: the same guest as a VM, a
//! Snapshot of it, then VMs with `restoreFrom` created one at a time (200 ms
//! apart), each timed to phase Running seen on a watch, with the phases of
//! `phases()`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures::StreamExt;
use nexus_api::snapshot::SnapshotPhase;
use nexus_api::vm::RestoreSource;
use nexus_api::{Snapshot, SnapshotSpec, Vm, VmPhase, VmSpec};
use nexus_client::{Client, Event, ListParams};
use nexus_e2e::multinode::MultiNode;

use super::{Args, Phases, boot_by_hand, http, ms, phases, spawn_vmm, wait_boot_line};

/// The pause between two clones restored through nexus.
const REST: Duration = Duration::from_millis(200);

/// The by-hand figures: the snapshot's creation and each load (ms).
pub struct RawRestores {
    pub snapshot: f64,
    pub loads: Vec<f64>,
}

async fn raw_restores_here(vmm: &Path, dir: &Path, args: &Args) -> anyhow::Result<RawRestores> {
    let tap = "nxlatr0";
    nexus_e2e::run_ok(std::process::Command::new("ip").args(["tuntap", "add", "dev", tap, "mode", "tap"]));
    let source_dir = dir.join("raw-source");
    let (mut source, socket, _) = spawn_vmm(vmm, &source_dir, "raw-source").await?;
    boot_by_hand(&socket, args, tap).await?;
    wait_boot_line(&source_dir.join("console.log"), &args.boot_line).await?;
    let (state, mem) = (dir.join("raw-snap.state"), dir.join("raw-snap.mem"));
    let paused = Instant::now();
    http(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#).await?;
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    http(&socket, "PUT", "/snapshot/create", &create).await?;
    let snapshot = ms(paused.elapsed());
    let _ = source.kill().await;
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        state.display(),
        mem.display()
    );
    let mut loads = Vec::new();
    for i in 0..args.raw_runs {
        let (mut child, socket, started) = spawn_vmm(vmm, &dir.join(format!("raw-restore-{i}")), "raw-restore").await?;
        http(&socket, "PUT", "/snapshot/load", &load).await?;
        loads.push(ms(started.elapsed()));
        let _ = child.kill().await;
    }
    nexus_e2e::run_ok(std::process::Command::new("ip").args(["link", "del", tap]));
    Ok(RawRestores { snapshot, loads })
}

/// The by-hand restores, in a network namespace of their own.
pub fn raw_restores(vmm: PathBuf, dir: PathBuf, args: Arc<Args>) -> anyhow::Result<RawRestores> {
    std::thread::spawn(move || {
        nexus_e2e::enter_private_netns();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(raw_restores_here(&vmm, &dir, &args))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the raw restores panicked"))?
}

/// Creates a VM from `spec` and waits for it to be Running.
async fn running_vm(client: &Client, name: &str, args: &Args) -> anyhow::Result<Vm> {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "vcpu": 1, "memMib": 128, "kernel": args.kernel, "rootfs": args.rootfs, "network": {"ip": "auto"}
    }))?;
    client.create(&Vm::new(name, Some("default"), spec)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let vm = client.get::<VmSpec>("default", name).await?;
        if vm.status_or_default().phase == VmPhase::Running {
            return Ok(vm);
        }
        anyhow::ensure!(Instant::now() < deadline, "VM {name} not Running within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes Snapshot `name` of VM `vm`; returns how long the VM was paused.
async fn snapshot(client: &Client, vm: &str, name: &str) -> anyhow::Result<u64> {
    let spec = SnapshotSpec { vm_name: vm.into(), resume_after: true };
    client.create(&Snapshot::new(name, Some("default"), spec)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = client.get::<SnapshotSpec>("default", name).await?.status_or_default();
        match s.phase {
            SnapshotPhase::Ready => return Ok(s.paused_millis.unwrap_or_default()),
            SnapshotPhase::Failed => anyhow::bail!("snapshot {name} failed: {:?}", s.last_error),
            _ => {}
        }
        anyhow::ensure!(Instant::now() < deadline, "snapshot {name} not Ready within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// VMs restored one at a time through nexus: their phases, and how long
/// the source was paused for its snapshot.
pub async fn through_nexus(vmm: &Path, dir: &Path, args: &Args) -> anyhow::Result<(Vec<Phases>, u64)> {
    let mut cluster = MultiNode::start_for_bench(&dir.join("cluster"), 1, args.vms as u32 + 10, vmm, &[]).await;
    let client = cluster.client();
    running_vm(&client, "restore-src", args).await?;
    let paused = snapshot(&client, "restore-src", "restore-snap").await?;
    let params = ListParams { label_selector: Some("bench=restore".into()), ..Default::default() };
    let mut watch = Box::pin(client.watch::<VmSpec>(Some("default"), &params, None).await?);
    let mut out = Vec::new();
    for i in 0..args.vms {
        let spec =
            VmSpec { restore_from: Some(RestoreSource { snapshot: "restore-snap".into() }), ..Default::default() };
        let mut vm = Vm::new(&format!("restored-{i:04}"), Some("default"), spec);
        vm.metadata.labels.insert("bench".into(), "restore".into());
        let sent = Utc::now();
        client.create(&vm).await?;
        let seen = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(event) = watch.next().await {
                if let Ok(Event::Added(v) | Event::Modified(v)) = event
                    && v.name() == vm.name()
                    && v.status_or_default().phase == VmPhase::Running
                {
                    return Some((Utc::now(), v));
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some((at, running)) = seen else {
            let words = nexus_e2e::last_words(|a| cluster.nexusctl(a), "vm", vm.name());
            anyhow::bail!("VM {} not Running within 30 s\n{words}", vm.name());
        };
        // A restore prints no new boot line: the phases end at Running.
        out.push(phases(&running, sent, at, at).context("a Running VM without its timestamps")?);
        // Each clone is measured on a node at rest, as a single clone is,
        // not behind the work the one before left (its report, a spare
        // namespace made to replace the one it took).
        tokio::time::sleep(REST).await;
    }
    let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "--all", "--wait", "--timeout", "120"]);
    anyhow::ensure!(ok, "deleting the VMs: {err}");
    cluster.stop();
    Ok((out, paused))
}

/// The counts a ticking guest printed (`tick N` lines), in order.
fn ticks(console: &str) -> Vec<u64> {
    console.lines().filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok()).collect()
}

/// Resident memory of the VMMs under `run` and the host's available
/// memory, in MiB.
fn memory(run: &Path) -> (u64, u64) {
    let (rss, available) = nexus_e2e::host::vmm_memory_kib(run);
    (rss >> 10, available >> 10)
}

/// `--fork N`: one running VM, then `nexusctl fork --copies N --wait`,
/// timed, with the node's memory before and after.
pub async fn fork(vmm: &Path, dir: &Path, args: &Args, copies: u32) -> anyhow::Result<serde_json::Value> {
    let mut cluster = MultiNode::start_for_bench(&dir.join("fork"), 1, copies + 10, vmm, &[]).await;
    let client = cluster.client();
    let source = running_vm(&client, "fork-src", args).await?;
    let run = cluster.dir.join("run-1");
    let console_of =
        |uid: &str| std::fs::read_to_string(run.join("vms").join(uid).join("console.log")).unwrap_or_default();
    // A guest that counts on its console (`tick N`) shows whether copies go
    // on from the source's state: where the source was when forked, and
    // the first count each copy prints.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let source_tick = ticks(&console_of(source.uid())).last().copied();
    let before = memory(&run);
    let began = Instant::now();
    let n = copies.to_string();
    let (ok, out, err) = cluster.nexusctl(&["fork", "fork-src", "--copies", &n, "--wait", "--timeout", "120"]);
    let took = ms(began.elapsed());
    anyhow::ensure!(ok, "fork: {out}{err}");
    let after = memory(&run);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let params = ListParams { label_selector: Some("nexus.dev/forked-from=fork-src".into()), ..Default::default() };
    let made = client.list::<VmSpec>(Some("default"), &params).await?.items;
    let firsts: Vec<u64> = made.iter().filter_map(|v| ticks(&console_of(v.uid())).first().copied()).collect();
    let source_now = ticks(&console_of(source.uid())).last().copied();
    println!(
        "console: the source was at tick {source_tick:?} a second before the fork and at {source_now:?} after; {} of \
         {} copies print ticks, their first {:?} to {:?}",
        firsts.len(),
        made.len(),
        firsts.iter().min(),
        firsts.iter().max()
    );
    let snaps = client.list::<SnapshotSpec>(Some("default"), &ListParams::default()).await?;
    let paused = snaps.items.first().and_then(|s| s.status_or_default().paused_millis).unwrap_or_default();
    println!(
        "fork --copies {copies} --wait: {took:.0} ms to all Running; source paused {paused} ms; VMM RSS {} -> {} MiB; \
         host MemAvailable {} -> {} MiB",
        before.0, after.0, before.1, after.1
    );
    let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "--all", "--wait", "--timeout", "120"]);
    anyhow::ensure!(ok, "deleting the VMs: {err}");
    cluster.stop();
    Ok(serde_json::json!({"copies": copies, "allRunningMs": took, "pausedMs": paused,
        "vmmRssMib": {"before": before.0, "after": after.0}, "memAvailableMib": {"before": before.1, "after": after.1}}))
}
