//! The guest's serial console on stdout: a boot banner, then one line a
//! second while the guest runs, so log tailing has something real to show.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vmm::Vmm;

/// Starts printing the console of a guest that just booted.
pub fn start(vmm: Arc<Mutex<Vmm>>) {
    let (id, args, vcpus, mem) = {
        let v = vmm.lock().unwrap_or_else(|p| p.into_inner());
        (v.id.clone(), v.boot_args(), v.machine().vcpu_count, v.machine().mem_size_mib)
    };
    let booted = Instant::now();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "[    0.000000] Linux version 6.1.0-nexus-sim (firecracker-sim) #1 SMP");
    let _ = writeln!(out, "[    0.000000] Command line: {args}");
    let _ = writeln!(out, "[    0.000000] smpboot: Allowing {vcpus} CPUs, {mem} MiB memory");
    let _ = writeln!(out, "[    0.050000] Run /sbin/init as init process");
    let _ = writeln!(out, "{id} login: booted");
    let _ = out.flush();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
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
