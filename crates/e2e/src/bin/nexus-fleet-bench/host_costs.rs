//! What this machine charges for two things a ramp does many thousand
//! times: waking a sleeping thread, on the waker's CPU and on another, and
//! the `cpuid` instruction (a glibc program's start runs some 80 of them to
//! learn the CPU's caches). On a virtual machine both can leave the guest
//! for the hypervisor and then cost many times what they cost on bare
//! metal, so the figures tell how one day's or one machine's ramp compares
//! with another's. Measured before the fleet starts, on a quiet machine.

use std::io::{Read, Write};
use std::time::Duration;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::usage::thread_cpu;

/// The CPU time of each operation, in microseconds; `None` where it could
/// not be measured (one CPU only, or not x86-64 for `cpuid`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCosts {
    /// One wake-up of a thread sleeping on a pipe, both threads on one CPU.
    pub wake_same_cpu: Option<f64>,
    /// The same with the two threads on two CPUs.
    pub wake_other_cpu: Option<f64>,
    /// One `cpuid` instruction.
    pub cpuid: Option<f64>,
}

impl HostCosts {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "wakeUpSameCpu": self.wake_same_cpu,
            "wakeUpOtherCpu": self.wake_other_cpu,
            "cpuid": self.cpuid,
        })
    }
}

/// Measures each cost over `rounds` repetitions (2,000 take well under a
/// second). Runs its own threads: the caller's CPU affinity is untouched.
pub fn measure(rounds: u32) -> HostCosts {
    let cpus = allowed_cpus();
    HostCosts {
        wake_same_cpu: cpus.first().and_then(|&c| wake_up(c, c, rounds)),
        wake_other_cpu: match cpus.as_slice() {
            [a, b, ..] => wake_up(*a, *b, rounds),
            _ => None,
        },
        cpuid: cpuid(rounds),
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else { return Vec::new() };
    (0..CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).collect()
}

/// Keeps the calling thread on `cpu`.
fn pin(cpu: usize) -> Option<()> {
    let mut set = CpuSet::new();
    set.set(cpu).ok()?;
    sched_setaffinity(Pid::from_raw(0), &set).ok()
}

/// Two threads, on CPUs `a` and `b`, pass a byte to and fro `rounds` times
/// through two pipes, each sleeping until the other's byte arrives: the CPU
/// both used, per wake-up (two per round). Either thread failing ends the
/// other (its pipe closes), so this never hangs.
fn wake_up(a: usize, b: usize, rounds: u32) -> Option<f64> {
    let pipe = || nix::unistd::pipe().ok().map(|(rx, tx)| (std::fs::File::from(rx), std::fs::File::from(tx)));
    let ((mut ping_rx, mut ping_tx), (mut pong_rx, mut pong_tx)) = (pipe()?, pipe()?);
    let peer = std::thread::spawn(move || -> Option<Duration> {
        pin(b)?;
        let (from, mut byte) = (thread_cpu(), [0u8]);
        for _ in 0..rounds {
            ping_rx.read_exact(&mut byte).ok()?;
            pong_tx.write_all(&byte).ok()?;
        }
        Some(thread_cpu() - from)
    });
    let starter = std::thread::spawn(move || -> Option<Duration> {
        pin(a)?;
        let (from, mut byte) = (thread_cpu(), [1u8]);
        for _ in 0..rounds {
            ping_tx.write_all(&byte).ok()?;
            pong_rx.read_exact(&mut byte).ok()?;
        }
        Some(thread_cpu() - from)
    });
    let used = starter.join().ok()?? + peer.join().ok()??;
    Some(used.as_secs_f64() * 1e6 / (2.0 * f64::from(rounds.max(1))))
}

/// The CPU time of one `cpuid` of leaf 4 (the caches' parameters, which
/// glibc asks for at every program's start).
#[cfg(target_arch = "x86_64")]
fn cpuid(rounds: u32) -> Option<f64> {
    let from = thread_cpu();
    for i in 0..rounds {
        #[allow(unused_unsafe)]
        // SAFETY: every x86-64 CPU has `cpuid`; it only reads.
        let leaf = unsafe { std::arch::x86_64::__cpuid_count(4, i % 4) };
        std::hint::black_box(leaf);
    }
    Some((thread_cpu() - from).as_secs_f64() * 1e6 / f64::from(rounds.max(1)))
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid(_rounds: u32) -> Option<f64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_wake_ups_and_cpuid_on_this_machine() {
        let costs = measure(200);
        assert!(costs.wake_same_cpu.is_some_and(|us| us > 0.0), "{costs:?}");
        if allowed_cpus().len() > 1 {
            assert!(costs.wake_other_cpu.is_some_and(|us| us > 0.0), "{costs:?}");
        }
        if cfg!(target_arch = "x86_64") {
            assert!(costs.cpuid.is_some_and(|us| us > 0.0), "{costs:?}");
        }
        let json = costs.json();
        assert!(json["wakeUpSameCpu"].is_number(), "{json}");
    }

    #[test]
    fn leaves_the_callers_cpus_as_they_were() {
        let before = allowed_cpus();
        measure(10);
        assert_eq!(allowed_cpus(), before);
    }
}
