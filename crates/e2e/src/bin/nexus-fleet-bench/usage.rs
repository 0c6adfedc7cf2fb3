//! What the fleet's programs and the machine used: CPU time from the
//! kernel's counters, resident memory, the machine's busy share and the
//! apiserver's requests by route.

use nexus_e2e::multinode::MultiNode;

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time every live thread of a process has used so far, in
/// microseconds, from the scheduler's nanosecond counters: the tick counts
/// of `/proc/PID/stat` round a short-lived VMM's 1-2 ms down to nothing.
pub fn cpu_us_precise(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>()
        / 1000
}

/// The CPU time the calling thread has used so far.
pub fn thread_cpu() -> std::time::Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec for the call to write into.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
    if !ok {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Whether the program at `path` names a dynamic loader (an ELF
/// `PT_INTERP` program header); `None` when it cannot be read as ELF64.
pub fn dynamically_linked(path: &std::path::Path) -> Option<bool> {
    let elf = std::fs::read(path).ok()?;
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let (offset, size, count) = (u64_at(0x20)? as usize, u16_at(0x36)? as usize, u16_at(0x38)? as usize);
    const PT_INTERP: u32 = 3;
    (0..count)
        .map(|i| offset + i * size)
        .map(|h| Some(u32::from_le_bytes(elf.get(h..h + 4)?.try_into().ok()?)))
        .collect::<Option<Vec<u32>>>()
        .map(|types| types.contains(&PT_INTERP))
}

/// Which C library the program at `path` was linked with, told from its
/// bytes: glibc leaves its symbol versions (`GLIBC_2.x`) in a dynamically
/// linked program and its tunables' name in a static one; musl leaves its
/// name. `None` when the file cannot be read or shows neither.
pub fn libc_of(path: &std::path::Path) -> Option<&'static str> {
    let bytes = std::fs::read(path).ok()?;
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    if has(b"GLIBC_") {
        Some("glibc")
    } else if has(b"musl") {
        Some("musl")
    } else {
        None
    }
}

/// CPU time (user + system) a process has used so far, in milliseconds.
pub fn cpu_ms(pid: u32) -> u64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    });
    // Linux reports CPU time in USER_HZ ticks, 100 per second on every architecture it supports.
    ticks.unwrap_or(0) * 10
}

/// The machine's CPU time counters (the `cpu` line of `/proc/stat`, in
/// ticks): user, nice, system, idle, iowait, irq, softirq, steal.
pub fn host_cpu() -> Option<[u64; 8]> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut fields = stat.lines().next()?.split_whitespace().skip(1).map(|f| f.parse::<u64>().ok());
    let mut ticks = [0; 8];
    for t in &mut ticks {
        *t = fields.next()??;
    }
    Some(ticks)
}

/// How the machine's CPUs spent a span, in percent: running anything,
/// idle (or waiting on I/O), and taken by the hypervisor for other guests.
pub struct HostCpu {
    pub busy: f64,
    pub idle: f64,
    pub stolen: f64,
}

impl HostCpu {
    pub fn share(before: &[u64; 8], after: &[u64; 8]) -> HostCpu {
        let d: Vec<f64> = before.iter().zip(after).map(|(a, b)| b.saturating_sub(*a) as f64).collect();
        let total = d.iter().sum::<f64>().max(1.0);
        let idle = d[3] + d[4];
        HostCpu {
            busy: 100.0 * (total - idle - d[7]) / total,
            idle: 100.0 * idle / total,
            stolen: 100.0 * d[7] / total,
        }
    }
}

/// The apiserver's requests so far by method, route and status, from its
/// `http_requests_total` counter, most first.
async fn requests_by_route(client: &nexus_client::Client) -> anyhow::Result<Vec<(String, u64)>> {
    use futures::TryStreamExt;
    let body: Vec<u8> = client
        .get_stream("/metrics")
        .await?
        .try_fold(Vec::new(), |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            Ok(all)
        })
        .await?;
    let mut rows: Vec<(String, u64)> = String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.strip_prefix("http_requests_total"))
        .filter_map(|l| {
            let (labels, n) = l.rsplit_once(' ')?;
            // `{route="...",method="...",code="..."}` as `METHOD route code`.
            let label = |name: &str| {
                let from = labels.find(&format!("{name}=\""))? + name.len() + 2;
                Some(labels[from..].split('"').next()?.to_string())
            };
            let row = format!("{} {} {}", label("method")?, label("route")?, label("code")?);
            Some((row, n.parse::<f64>().ok()? as u64))
        })
        .collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1));
    Ok(rows)
}

/// What the control plane has used so far: CPU milliseconds of each
/// part, the machine's CPU counters and the apiserver's requests by route.
pub struct Usage {
    pub apiserver: u64,
    pub controller: u64,
    pub agents: u64,
    pub host: Option<HostCpu>,
    cpu: Option<[u64; 8]>,
    pub requests: Vec<(String, u64)>,
}

impl Usage {
    pub async fn of(fleet: &MultiNode, client: &nexus_client::Client) -> anyhow::Result<Usage> {
        Ok(Usage {
            apiserver: cpu_ms(fleet.apiserver.pid()),
            controller: cpu_ms(fleet.controller.pid()),
            agents: fleet.agents.iter().map(|a| cpu_ms(a.pid())).sum(),
            host: None,
            cpu: host_cpu(),
            requests: requests_by_route(client).await?,
        })
    }

    /// What was used between `before` and this reading.
    pub fn since(self, before: &Usage) -> Usage {
        let mut requests: Vec<(String, u64)> = self
            .requests
            .into_iter()
            .map(|(route, n)| {
                let was = before.requests.iter().find(|(r, _)| *r == route).map_or(0, |(_, n)| *n);
                (route, n.saturating_sub(was))
            })
            .collect();
        requests.sort_by_key(|row| std::cmp::Reverse(row.1));
        Usage {
            apiserver: self.apiserver.saturating_sub(before.apiserver),
            controller: self.controller.saturating_sub(before.controller),
            agents: self.agents.saturating_sub(before.agents),
            host: before.cpu.zip(self.cpu).map(|(a, b)| HostCpu::share(&a, &b)),
            cpu: self.cpu,
            requests,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A program that is not ELF: a shell script.
    fn shell_script() -> tempfile::NamedTempFile {
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), "#!/bin/sh\n").unwrap();
        script
    }

    #[test]
    fn tells_a_dynamically_linked_program_and_what_is_not_elf() {
        // Test programs are linked dynamically unless built with crt-static.
        let expected = !cfg!(target_feature = "crt-static");
        assert_eq!(dynamically_linked(&std::env::current_exe().unwrap()), Some(expected));
        assert_eq!(dynamically_linked(shell_script().path()), None);
    }

    #[test]
    fn tells_which_libc_a_program_was_linked_with() {
        // This test program is the host target's: glibc on the machines the
        // project builds on, musl where the host target is a musl one.
        let expected = if cfg!(target_env = "musl") { "musl" } else { "glibc" };
        assert_eq!(libc_of(&std::env::current_exe().unwrap()), Some(expected));
        assert_eq!(libc_of(shell_script().path()), None);
    }

    #[test]
    fn counts_the_cpu_of_every_thread_precisely() {
        // Spins for 30 ms of this thread's CPU (not of the wall clock, which
        // a busy machine stretches).
        let from = thread_cpu();
        while thread_cpu() - from < Duration::from_millis(30) {}
        // The scheduler's counters may trail by a tick (10 ms at most).
        let us = cpu_us_precise(std::process::id());
        assert!(us >= 20_000, "{us} µs after spinning for 30 ms of CPU");
        assert_eq!(cpu_us_precise(u32::MAX >> 9), 0, "no such process");
    }
}
