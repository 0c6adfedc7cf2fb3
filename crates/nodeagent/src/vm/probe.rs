//! Readiness probes: whether a running VM's guest is up, by a line on its
//! console or by a TCP port on its address that accepts a connection.
//!
//! The console is read from where it stood when the VMM was launched (its
//! `console-offset`), so a line an earlier boot printed never counts. A
//! console match holds for the life of that VMM and is remembered; a TCP
//! port is tried again each time.

use std::collections::HashMap;
use std::io::{BufRead, Read, Seek};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use nexus_api::agent::ProbeResult;
use nexus_api::vm::ReadinessProbe;

/// Most console bytes one probe reads past where the last one stopped.
const MAX_SCAN: u64 = 8 << 20;
/// How long a TCP probe waits for the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// What the console probes of each VMM have read so far.
#[derive(Debug, Default)]
pub struct Probes {
    /// By VM uid: the VMM's pid, how far its console was read, and the
    /// matching line once found.
    console: Mutex<HashMap<String, ConsoleScan>>,
}

#[derive(Debug, Clone)]
struct ConsoleScan {
    pid: u32,
    pattern: String,
    offset: u64,
    matched: Option<String>,
}

impl Probes {
    /// Runs `probe` for VM `uid`, whose VMM `pid` writes `console` from
    /// byte `start` on and whose guest has address `ip`.
    pub async fn run(
        &self,
        uid: &str,
        pid: u32,
        probe: &ReadinessProbe,
        console: &Path,
        start: u64,
        ip: Option<Ipv4Addr>,
    ) -> ProbeResult {
        match (&probe.console, probe.tcp_port) {
            (Some(pattern), _) => self.console(uid, pid, pattern, console, start),
            (None, Some(port)) => tcp(ip, port).await,
            (None, None) => ProbeResult { passed: true, message: "no check".into() },
        }
    }

    fn console(&self, uid: &str, pid: u32, pattern: &str, console: &Path, start: u64) -> ProbeResult {
        let Ok(re) = regex::Regex::new(pattern) else {
            return ProbeResult { passed: false, message: format!("{pattern:?} is not a regular expression") };
        };
        let mut scans = self.console.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = ConsoleScan { pid, pattern: pattern.to_string(), offset: start, matched: None };
        let scan = scans.entry(uid.to_string()).or_insert_with(|| fresh.clone());
        if scan.pid != pid || scan.pattern != pattern {
            *scan = fresh;
        }
        if scan.matched.is_none() {
            match scan_lines(console, scan.offset, &re) {
                Ok((offset, matched)) => {
                    scan.offset = offset;
                    scan.matched = matched;
                }
                Err(e) => {
                    return ProbeResult { passed: false, message: format!("reading the console: {e}") };
                }
            }
        }
        match &scan.matched {
            Some(line) => ProbeResult { passed: true, message: format!("console printed {line:?}") },
            None => ProbeResult { passed: false, message: format!("no console line matches {pattern:?} yet") },
        }
    }

    /// Forgets VM `uid` (it was removed).
    pub fn forget(&self, uid: &str) {
        self.console.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
}

/// Reads whole lines of `path` from `offset`; returns where the next read
/// starts (after the last complete line) and the first line matching `re`.
fn scan_lines(path: &Path, offset: u64, re: &regex::Regex) -> std::io::Result<(u64, Option<String>)> {
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut reader = std::io::BufReader::new(file.take(MAX_SCAN));
    let mut at = offset;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            // End of what is written: a partial line is read again next time.
            return Ok((at, None));
        }
        at += n as u64;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if re.is_match(text) {
            return Ok((at, Some(nexus_api::validation::truncate(text, 120))));
        }
    }
}

async fn tcp(ip: Option<Ipv4Addr>, port: u16) -> ProbeResult {
    let Some(ip) = ip else {
        return ProbeResult { passed: false, message: "the VM has no address from the node (spec.network.ip)".into() };
    };
    let addr = SocketAddr::from((ip, port));
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => ProbeResult { passed: true, message: format!("{addr} accepted a connection") },
        Ok(Err(e)) => ProbeResult { passed: false, message: format!("connecting to {addr}: {e}") },
        Err(_) => ProbeResult { passed: false, message: format!("connecting to {addr}: no answer in 500 ms") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_console_line_after_the_launch_offset_passes_and_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, "old-vm login: booted\n").unwrap();
        let start = std::fs::metadata(&console).unwrap().len();
        let probes = Probes::default();
        let probe = ReadinessProbe { console: Some("login:".into()), tcp_port: None };
        let r = probes.run("u1", 7, &probe, &console, start, None).await;
        assert!(!r.passed, "an earlier boot's line does not count: {r:?}");
        let mut f = std::fs::OpenOptions::new().append(true).open(&console).unwrap();
        std::io::Write::write_all(&mut f, b"[ 0.1] booting\nnew-vm login: bo").unwrap();
        assert!(!probes.run("u1", 7, &probe, &console, start, None).await.passed, "half a line is not a line");
        std::io::Write::write_all(&mut f, b"oted\n").unwrap();
        let r = probes.run("u1", 7, &probe, &console, start, None).await;
        assert!(r.passed, "{r:?}");
        assert_eq!(r.message, "console printed \"new-vm login: booted\"");
        // A new VMM (pid) reads from its own start again.
        let start2 = std::fs::metadata(&console).unwrap().len();
        assert!(!probes.run("u1", 8, &probe, &console, start2, None).await.passed);
    }

    #[tokio::test]
    async fn a_tcp_probe_passes_only_while_the_port_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let probes = Probes::default();
        let probe = ReadinessProbe { console: None, tcp_port: Some(port) };
        let ip = Some(Ipv4Addr::LOCALHOST);
        assert!(probes.run("u", 1, &probe, Path::new("/nonexistent"), 0, ip).await.passed);
        drop(listener);
        // A port bound but not listening refuses, and stays ours: a port
        // merely released could be taken by a parallel test, or by this very
        // connect as its own source port (a TCP self-connect).
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let probe = ReadinessProbe { console: None, tcp_port: Some(held.local_addr().unwrap().port()) };
        let r = probes.run("u", 1, &probe, Path::new("/nonexistent"), 0, ip).await;
        assert!(!r.passed && r.message.contains("refused"), "{r:?}");
        assert!(!probes.run("u", 1, &probe, Path::new("/nonexistent"), 0, None).await.passed);
    }
}
