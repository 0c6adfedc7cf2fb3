//! Per-VM metrics: what each Firecracker counts (vCPU exits, block and
//! network bytes and operations, rate-limiter throttles) and what the host
//! sees of the VMM process (resident memory, CPU time).
//!
//! Firecracker writes one JSON object per flush holding the counts *since
//! the previous flush*. A collector task flushes every VMM each interval,
//! reads the lines written since it last looked, and adds them up into
//! cumulative counters, which `/metrics` renders for Prometheus (labelled
//! by node, project, VM and uid) and `GET /v1/vms/{uid}/stats` returns
//! with the rates over the last interval.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nexus_api::agent::{EnsureVm, NodeStats, VmStats};

use crate::paths::{RunDir, Uid, VmPaths};

/// The Firecracker counters kept, as (series suffix, JSON section, field).
pub const COUNTERS: &[(&str, &str, &str)] = &[
    ("vcpu_exits_io_in", "vcpu", "exit_io_in"),
    ("vcpu_exits_io_out", "vcpu", "exit_io_out"),
    ("vcpu_exits_mmio_read", "vcpu", "exit_mmio_read"),
    ("vcpu_exits_mmio_write", "vcpu", "exit_mmio_write"),
    ("block_read_bytes", "block", "read_bytes"),
    ("block_write_bytes", "block", "write_bytes"),
    ("block_read_ops", "block", "read_count"),
    ("block_write_ops", "block", "write_count"),
    ("block_throttled", "block", "rate_limiter_throttled_events"),
    ("net_rx_bytes", "net", "rx_bytes_count"),
    ("net_tx_bytes", "net", "tx_bytes_count"),
    ("net_rx_packets", "net", "rx_packets_count"),
    ("net_tx_packets", "net", "tx_packets_count"),
    ("net_rx_throttled", "net", "rx_rate_limiter_throttled"),
    ("net_tx_throttled", "net", "tx_rate_limiter_throttled"),
];

/// Firecracker's counters of each drive (its `block_<drive id>` section),
/// as (series suffix, field).
pub const DRIVE_COUNTERS: &[(&str, &str)] = &[
    ("read_bytes", "read_bytes"),
    ("write_bytes", "write_bytes"),
    ("read_ops", "read_count"),
    ("write_ops", "write_count"),
    ("throttled", "rate_limiter_throttled_events"),
];

/// Counters by drive, then by series suffix.
type DriveCounters = BTreeMap<String, BTreeMap<&'static str, f64>>;

/// What is known of one VM.
#[derive(Debug, Clone, Default)]
struct Totals {
    /// How far into its metrics file has been read.
    offset: u64,
    counters: BTreeMap<&'static str, f64>,
    drives: DriveCounters,
    cpu_seconds: f64,
    rss_bytes: u64,
    at: Option<DateTime<Utc>>,
    /// The sample before this one, for rates.
    previous: Option<(DateTime<Utc>, BTreeMap<&'static str, f64>, f64)>,
    project: String,
    name: String,
}

/// The host's CPU counters at one sample: (when, busy jiffies, all jiffies).
type CpuSample = (DateTime<Utc>, u64, u64);

/// Collects and keeps the per-VM metrics of this node.
#[derive(Debug, Default)]
pub struct Collector {
    vms: Mutex<HashMap<String, Totals>>,
    /// The last two samples of the host's CPU.
    host_cpu: Mutex<(Option<CpuSample>, Option<CpuSample>)>,
}

impl Collector {
    /// One pass over the VMs of `run` whose VMM is `live` (uid → pid):
    /// reads what their Firecrackers wrote and what the host sees. VMs
    /// gone since are forgotten.
    pub fn sample(&self, run: &RunDir, live: &HashMap<String, u32>) {
        let now = Utc::now();
        if let Some((busy, all)) = host_cpu() {
            let mut h = self.host_cpu.lock().unwrap_or_else(|p| p.into_inner());
            *h = (h.1, Some((now, busy, all)));
        }
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.retain(|uid, _| live.contains_key(uid));
        for (uid, pid) in live {
            let Ok(parsed) = Uid::parse(uid) else { continue };
            let paths = run.vm(&parsed);
            let t = vms.entry(uid.clone()).or_default();
            if t.name.is_empty() {
                let display = std::fs::read(paths.config())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<EnsureVm>(&b).ok())
                    .map(|c| c.display_name)
                    .unwrap_or_default();
                let (project, name) = display.split_once('/').unwrap_or(("", display.as_str()));
                (t.project, t.name) = (project.to_string(), name.to_string());
            }
            if let Some(at) = t.at {
                t.previous = Some((at, t.counters.clone(), t.cpu_seconds));
            }
            t.offset = add_new_lines(&paths, t.offset, &mut t.counters, &mut t.drives);
            let (cpu, rss) = host_usage(*pid);
            t.cpu_seconds = cpu;
            t.rss_bytes = rss;
            t.at = Some(now);
        }
    }

    /// The VM's latest values and the rates since the sample before.
    pub fn stats(&self, uid: &str) -> Option<VmStats> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let t = vms.get(uid)?;
        let at = t.at?;
        let mut rates = BTreeMap::new();
        let mut cpu_percent = None;
        if let Some((then, before, cpu_before)) = &t.previous {
            let secs = (at - *then).num_milliseconds() as f64 / 1000.0;
            if secs > 0.0 {
                for (k, v) in &t.counters {
                    let was = before.get(k).copied().unwrap_or(0.0);
                    rates.insert(k.to_string(), ((v - was) / secs).max(0.0));
                }
                cpu_percent = Some(((t.cpu_seconds - cpu_before) / secs * 100.0).max(0.0));
            }
        }
        Some(VmStats {
            uid: uid.to_string(),
            at,
            counters: t.counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            rates_per_second: rates,
            cpu_seconds: t.cpu_seconds,
            cpu_percent,
            rss_bytes: t.rss_bytes,
            drives: t
                .drives
                .iter()
                .map(|(d, c)| (d.clone(), c.iter().map(|(k, v)| (k.to_string(), *v)).collect()))
                .collect(),
        })
    }

    /// Every VM's stats.
    pub fn all(&self) -> Vec<VmStats> {
        let uids: Vec<String> = self.vms.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let mut all: Vec<VmStats> = uids.iter().filter_map(|u| self.stats(u)).collect();
        all.sort_by(|a, b| a.uid.cmp(&b.uid));
        all
    }

    /// The host's use and every VM's stats.
    pub fn node(&self) -> NodeStats {
        let vms = self.all();
        let (before, last) = *self.host_cpu.lock().unwrap_or_else(|p| p.into_inner());
        let cpu_percent = match (before, last) {
            (Some((_, b0, a0)), Some((_, b1, a1))) if a1 > a0 => Some((b1 - b0) as f64 / (a1 - a0) as f64 * 100.0),
            _ => None,
        };
        let (total, available) = host_memory();
        NodeStats {
            at: last.map(|l| l.0).unwrap_or_else(Utc::now),
            cpu_percent,
            cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            memory_total_bytes: total,
            memory_available_bytes: available,
            vm_rss_bytes: vms.iter().map(|v| v.rss_bytes).sum(),
            vms,
        }
    }

    /// The per-VM series in Prometheus' text format.
    pub fn render(&self, node: &str) -> String {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let mut sorted: Vec<(&String, &Totals)> = vms.iter().filter(|(_, t)| t.at.is_some()).collect();
        sorted.sort_by(|a, b| (&a.1.project, &a.1.name).cmp(&(&b.1.project, &b.1.name)));
        let labels = |uid: &str, t: &Totals| {
            format!(
                "node=\"{}\",project=\"{}\",vm=\"{}\",uid=\"{}\"",
                escape(node),
                escape(&t.project),
                escape(&t.name),
                escape(uid)
            )
        };
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str, value: &dyn Fn(&Totals) -> f64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (uid, t) in &sorted {
                out.push_str(&format!("{name}{{{}}} {}\n", labels(uid, t), value(t)));
            }
        };
        family(&mut out, "nexus_vm_up", "gauge", "1 for each VM whose VMM runs on this node.", &|_| 1.0);
        family(
            &mut out,
            "nexus_vm_cpu_seconds_total",
            "counter",
            "CPU time of the VMM process, from the host.",
            &|t| t.cpu_seconds,
        );
        let rss_help = "Resident memory of the VMM process, from the host.";
        family(&mut out, "nexus_vm_memory_rss_bytes", "gauge", rss_help, &|t| t.rss_bytes as f64);
        for (suffix, section, field) in COUNTERS {
            let name = format!("nexus_vm_{suffix}_total");
            let help = format!("Firecracker's {section}.{field}, summed over its flushes.");
            family(&mut out, &name, "counter", &help, &|t| t.counters.get(suffix).copied().unwrap_or(0.0));
        }
        for (suffix, field) in DRIVE_COUNTERS {
            let name = format!("nexus_vm_drive_{suffix}_total");
            out.push_str(&format!(
                "# HELP {name} Firecracker's block_<drive>.{field} of each drive, summed over its flushes.\n# TYPE {name} counter\n"
            ));
            for (uid, t) in &sorted {
                for (drive, counters) in &t.drives {
                    let value = counters.get(suffix).copied().unwrap_or(0.0);
                    out.push_str(&format!("{name}{{{},drive=\"{}\"}} {value}\n", labels(uid, t), escape(drive)));
                }
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Adds the counts in the lines of `paths`' metrics file after `offset`
/// to `counters` (and each drive's to `drives`); returns the new offset.
/// A file that shrank (a new VMM started over) is read from the start.
fn add_new_lines(
    paths: &VmPaths,
    offset: u64,
    counters: &mut BTreeMap<&'static str, f64>,
    drives: &mut DriveCounters,
) -> u64 {
    let Ok(mut f) = std::fs::File::open(paths.metrics()) else { return offset };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = if len < offset { 0 } else { offset };
    if f.seek(SeekFrom::Start(start)).is_err() {
        return offset;
    }
    let mut buf = Vec::new();
    if f.take(len - start).read_to_end(&mut buf).is_err() {
        return offset;
    }
    // Only whole lines; a line being written is read next time.
    let whole = buf.iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
    for line in String::from_utf8_lossy(&buf[..whole]).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        for (suffix, section, field) in COUNTERS {
            if let Some(n) = v[*section][*field].as_f64() {
                *counters.entry(suffix).or_default() += n;
            }
        }
        let Some(sections) = v.as_object() else { continue };
        for (key, section) in sections {
            let Some(drive) = key.strip_prefix("block_") else { continue };
            for (suffix, field) in DRIVE_COUNTERS {
                if let Some(n) = section[*field].as_f64() {
                    *drives.entry(drive.to_string()).or_default().entry(suffix).or_default() += n;
                }
            }
        }
    }
    start + whole as u64
}

/// CPU seconds (user + system) and resident bytes of process `pid`.
pub fn host_usage(pid: u32) -> (f64, u64) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // After the name: state is field 3; utime and stime are 14 and 15.
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / clock_ticks())
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0);
    (cpu, rss)
}

/// Busy and total jiffies of all CPUs, from `/proc/stat`.
fn host_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let all: u64 = v.iter().sum();
    // idle and iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((all - idle, all))
}

/// Total and available memory of the host, in bytes.
fn host_memory() -> (u64, u64) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// How often the collector samples by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_are_deltas_and_add_up_into_counters() {
        let dir = tempfile::tempdir().unwrap();
        let paths = VmPaths { dir: dir.path().to_path_buf() };
        let line = |io_out: u64, rx: u64| {
            format!("{{\"vcpu\":{{\"exit_io_out\":{io_out}}},\"net\":{{\"rx_bytes_count\":{rx}}}}}\n")
        };
        std::fs::write(paths.metrics(), line(5, 100) + &line(7, 50)).unwrap();
        let (mut counters, mut drives) = (BTreeMap::new(), DriveCounters::new());
        let offset = add_new_lines(&paths, 0, &mut counters, &mut drives);
        assert_eq!(counters["vcpu_exits_io_out"], 12.0);
        assert_eq!(counters["net_rx_bytes"], 150.0);
        // A partly written line waits for its end.
        let mut f = std::fs::OpenOptions::new().append(true).open(paths.metrics()).unwrap();
        std::io::Write::write_all(&mut f, b"{\"vcpu\":{\"exit_io_out\":1").unwrap();
        let same = add_new_lines(&paths, offset, &mut counters, &mut drives);
        assert_eq!((same, counters["vcpu_exits_io_out"]), (offset, 12.0));
        std::io::Write::write_all(&mut f, b"}}\n").unwrap();
        add_new_lines(&paths, same, &mut counters, &mut drives);
        assert_eq!(counters["vcpu_exits_io_out"], 13.0);
        // Each drive's own section counts for that drive.
        std::io::Write::write_all(
            &mut f,
            b"{\"block_cache\":{\"write_bytes\":512,\"rate_limiter_throttled_events\":2}}\n",
        )
        .unwrap();
        add_new_lines(&paths, 0, &mut BTreeMap::new(), &mut drives);
        assert_eq!((drives["cache"]["write_bytes"], drives["cache"]["throttled"]), (512.0, 2.0));
    }

    #[test]
    fn this_process_has_cpu_time_and_resident_memory() {
        let (cpu, rss) = host_usage(std::process::id());
        assert!(cpu >= 0.0 && rss > 1 << 20, "{cpu} {rss}");
    }
}
