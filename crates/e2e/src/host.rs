//! What is on the host: links, sockets, VMM processes and run directories.

use std::path::Path;

/// A network link as `ip -j -d link` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub master: Option<String>,
    pub up: bool,
    pub kind: Option<String>,
}

/// Links in the calling thread's network namespace.
pub fn links() -> Vec<LinkInfo> {
    let out = crate::run_ok(std::process::Command::new("ip").args(["-j", "-d", "link", "show"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|l| LinkInfo {
            name: l["ifname"].as_str().unwrap_or("").to_string(),
            master: l["master"].as_str().map(str::to_string),
            up: l["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP")),
            kind: l["linkinfo"]["info_kind"].as_str().map(str::to_string),
        })
        .collect()
}

/// TAP devices the agent made (by its name prefix).
pub fn taps() -> Vec<LinkInfo> {
    links().into_iter().filter(|l| l.name.starts_with("nxt")).collect()
}

/// Unix sockets under `dir`, recursively, but for warm VMMs' (under a
/// `warm` directory: no VM's yet).
pub fn sockets_under(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() && e.file_name() != "warm" {
                stack.push(e.path());
            } else if ft.is_socket() {
                found.push(e.path().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// Live (non-zombie) processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with(['Z', 'X'])))
            .unwrap_or(true);
        if !zombie && cmd.contains(needle) {
            found.push((pid, cmd.trim().to_string()));
        }
    }
    found
}

/// Live VMM processes of VMs jailed under `dir` (their root directory lies
/// there), with their command lines. Warm VMMs, which no VM has adopted
/// yet, are not counted (see [`warm_vmms_under`]).
pub fn vmm_processes_under(dir: &Path) -> Vec<(u32, String)> {
    all_vmm_processes_under(dir).into_iter().filter(|(pid, _)| !is_warm(*pid)).collect()
}

/// Live warm VMMs (started ahead, waiting for a restored VM) under `dir`.
pub fn warm_vmms_under(dir: &Path) -> Vec<(u32, String)> {
    all_vmm_processes_under(dir).into_iter().filter(|(pid, _)| is_warm(*pid)).collect()
}

/// Every live VMM process jailed under `dir`, a VM's or warm.
pub fn all_vmm_processes_under(dir: &Path) -> Vec<(u32, String)> {
    processes_mentioning("--api-sock")
        .into_iter()
        .filter(|(pid, _)| std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|root| root.starts_with(dir)))
        .collect()
}

/// Whether VMM `pid` is a warm one: rooted at `<run dir>/warm/<n>/root`.
fn is_warm(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/root"))
        .is_ok_and(|root| root.parent().and_then(Path::parent).and_then(Path::file_name) == Some("warm".as_ref()))
}

/// Directories under `<run dir>/vms`.
pub fn run_dirs(run_dir: &Path) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(run_dir.join("vms"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// SIGKILLs process `pid`, as a crash would end it.
pub fn sigkill(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("SIGKILL {pid}: {e}"));
}

/// Sends `GET /` to a Firecracker API socket; returns the status line and body.
pub async fn fc_get_root(socket: &Path) -> std::io::Result<(u16, String)> {
    fc_request(socket, "GET", "/", None).await
}

/// Presses Ctrl+Alt+Del on the VMM behind `socket` (the guest shuts down).
pub async fn fc_ctrl_alt_del(socket: &Path) -> std::io::Result<u16> {
    Ok(fc_request(socket, "PUT", "/actions", Some(r#"{"action_type":"SendCtrlAltDel"}"#)).await?.0)
}

/// Sends one request to a Firecracker API socket; returns the status and body.
pub async fn fc_request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Whether `path` is on a tmpfs.
pub fn is_tmpfs(path: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Resident memory of every VMM under `run` summed, and the host's
/// available memory (`MemAvailable`), both in KiB.
pub fn vmm_memory_kib(run: &Path) -> (u64, u64) {
    let kib = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let rss = vmm_processes_under(run)
        .iter()
        .map(|(pid, _)| kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(), "VmRSS:"))
        .sum();
    (rss, kib(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default(), "MemAvailable:"))
}
