//! The guest's serial console on stdout: a boot banner, then one line a
//! second while the guest runs, so log tailing has something real to show.
//! `FIRECRACKER_SIM_CONSOLE_SECS=N` prints it every N seconds instead, and
//! `0` makes a guest that is quiet after its boot (as most idle guests are;
//! a thousand chatty ones cost a benchmark's host a tenth of a core).
//!
//! With `FIRECRACKER_SIM_PANIC_IF_KERNEL_CONTAINS=TEXT`, a guest whose
//! kernel file holds TEXT panics instead: it prints a kernel panic and
//! nothing more (no login line), and the VMM keeps running, as a guest
//! booted without `panic=` hangs. A bad kernel for rollout tests.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vmm::Vmm;

/// Starts printing the console of a guest that just booted.
pub fn start(vmm: Arc<Mutex<Vmm>>) {
    let (id, args, vcpus, mem, kernel) = {
        let v = vmm.lock().unwrap_or_else(|p| p.into_inner());
        (v.id.clone(), v.boot_args(), v.machine().vcpu_count, v.machine().mem_size_mib, v.kernel_path())
    };
    let booted = Instant::now();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "[    0.000000] Linux version 6.1.0-nexus-sim (firecracker-sim) #1 SMP");
    let _ = writeln!(out, "[    0.000000] Command line: {args}");
    let _ = writeln!(out, "[    0.000000] smpboot: Allowing {vcpus} CPUs, {mem} MiB memory");
    if kernel.is_some_and(|k| panics(&k)) {
        let _ = writeln!(
            out,
            "[    0.040000] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
        );
        let _ = out.flush();
        return;
    }
    let _ = writeln!(out, "[    0.050000] Run /sbin/init as init process");
    let _ = writeln!(out, "{id} login: booted");
    let _ = out.flush();
    let every = std::env::var("FIRECRACKER_SIM_CONSOLE_SECS").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
    if every == 0 {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(every));
        tick.tick().await;
        loop {
            tick.tick().await;
            let running = vmm.lock().unwrap_or_else(|p| p.into_inner()).is_running();
            if running {
                let t = booted.elapsed().as_secs_f64();
                let mut out = std::io::stdout();
                let _ = writeln!(out, "[{t:>12.6}] nexus-sim: guest alive");
                let _ = out.flush();
            }
        }
    });
}

/// Whether the kernel at `path` holds the text that makes the guest panic.
fn panics(path: &str) -> bool {
    let Some(marker) = std::env::var_os("FIRECRACKER_SIM_PANIC_IF_KERNEL_CONTAINS") else { return false };
    let marker = marker.as_encoded_bytes();
    let kernel = std::fs::read(path).unwrap_or_default();
    !marker.is_empty() && kernel.windows(marker.len()).any(|w| w == marker)
}
