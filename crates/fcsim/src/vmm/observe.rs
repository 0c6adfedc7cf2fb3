//! What the simulated VMM writes and tells about itself: its metrics, its
//! log, its machine and boot arguments.

use super::*;

impl Vmm {
    /// Writes one metrics JSON object, as Firecracker does on FlushMetrics
    /// and every 60 seconds.
    pub fn flush_metrics(&mut self) {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let line = json!({
            "utc_timestamp_ms": now_ms,
            "api_server": {
                "process_startup_time_us": 0,
                "process_startup_time_cpu_us": 0,
                "sync_response_fails": 0,
                "sync_vmm_send_timeout_count": 0,
            },
            "vmm": { "panic_count": 0 },
            "uptime_seconds": self.started.elapsed().as_secs(),
            "api_requests": self.requests,
        });
        // As Firecracker's devices count: per flush, what happened since
        // the one before. A running guest does a little of everything
        // (a tick of I/O per millisecond), a paused or unborn one nothing.
        let ms = self.last_flush.elapsed().as_millis() as u64;
        self.last_flush = Instant::now();
        let n = if self.is_running() { ms } else { 0 };
        let mut line = line;
        line["vcpu"] = json!({"exit_io_in": n, "exit_io_out": n * 2, "exit_mmio_read": n / 2, "exit_mmio_write": n / 4,
            "failures": 0});
        line["block"] = json!({"read_bytes": n * 4096, "write_bytes": n * 512, "read_count": n, "write_count": n / 8,
            "rate_limiter_throttled_events": 0});
        // And each drive on its own, as Firecracker's `block_<drive id>`:
        // the root drive does the reads, every drive a few writes; a
        // drive with a bandwidth limit below that rate is throttled.
        for drive in &self.drives {
            let id = &drive.drive_id;
            let reads = if drive.is_root_device { n } else { n / 4 };
            let writes = if drive.is_read_only.unwrap_or(false) { 0 } else { n / 8 };
            let wanted_bps = (reads * 4096 + writes * 512) * 1000 / ms.max(1);
            let throttled = drive
                .rate_limiter
                .and_then(|r| r.bandwidth)
                .filter(|b| b.size * 1000 / b.refill_time.max(1) < wanted_bps)
                .map_or(0, |_| n / 16);
            line[format!("block_{id}")] = json!({"read_bytes": reads * 4096, "write_bytes": writes * 512,
                "read_count": reads, "write_count": writes, "rate_limiter_throttled_events": throttled});
        }
        line["net"] = json!({"rx_bytes_count": n * 100, "tx_bytes_count": n * 60, "rx_packets_count": n,
            "tx_packets_count": n, "rx_rate_limiter_throttled": 0, "tx_rate_limiter_throttled": 0});
        if let Some(f) = &mut self.metrics {
            // One write per line, as Firecracker's metrics writer does.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    /// Appends one line to the configured log in Firecracker's format.
    pub fn log(&mut self, thread: &str, level: &str, message: &str) {
        let id = self.id.clone();
        if let Some((cfg, file)) = &mut self.logger {
            let ts = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.9f");
            let lvl = if cfg.show_level.unwrap_or(false) { format!(":{level}") } else { String::new() };
            // One write per line, as Firecracker's logger does (a line a
            // `write!` piece at a time would be several system calls).
            let _ = file.write_all(format!("{ts} [{id}:{thread}{lvl}] {message}\n").as_bytes());
        }
    }

    /// Whether the guest is running (for the console).
    pub fn is_running(&self) -> bool {
        self.state == InstanceState::Running
    }

    pub fn boot_args(&self) -> String {
        self.boot.as_ref().and_then(|b| b.boot_args.clone()).unwrap_or_default()
    }

    /// The kernel's path, as the boot source names it.
    pub fn kernel_path(&self) -> Option<String> {
        self.boot.as_ref().map(|b| b.kernel_image_path.clone())
    }

    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }
}
