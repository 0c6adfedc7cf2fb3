//! VMM processes: launching one in its own process group, finding it again
//! after an agent restart, and stopping it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Failures launching a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open the console file {path}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Starts `binary --api-sock <socket> --id <id>` in its own process group,
/// its stdout and stderr (the guest console) appended to `console`. The
/// process outlives the agent; a task reaps it while the agent lives.
pub fn launch(binary: &Path, socket: &Path, id: &str, console: &Path) -> Result<u32, ProcessError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console)
        .map_err(|source| ProcessError::Console { path: console.to_path_buf(), source })?;
    let err = out.try_clone().map_err(|source| ProcessError::Console { path: console.to_path_buf(), source })?;
    let mut child = tokio::process::Command::new(binary)
        .arg("--api-sock")
        .arg(socket)
        .arg("--id")
        .arg(id)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| ProcessError::Spawn { binary: binary.to_path_buf(), source })?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => tracing::info!(pid, %status, "VMM process exited"),
            Err(e) => tracing::warn!(pid, error = %e, "waiting for VMM process failed"),
        }
    });
    Ok(pid)
}

/// Whether `pid` is a live (not zombie) process whose command line names
/// `socket` as its API socket: the check that guards every signal we send.
pub fn is_vmm(pid: u32, socket: &Path) -> bool {
    if pid == 0 || !alive(pid) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2).any(|w| w[0] == b"--api-sock" && w[1] == socket.as_os_str().as_encoded_bytes())
        }
        Err(_) => false,
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])).unwrap_or(false),
        Err(_) => false,
    }
}

/// Every live process whose `--api-sock` lies under `dir`, as (pid, socket).
pub fn find_vmms_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    let prefix = dir.as_os_str().as_encoded_bytes();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        for w in args.windows(2) {
            if w[0] == b"--api-sock" && w[1].starts_with(prefix) && alive(pid) {
                found.push((pid, PathBuf::from(String::from_utf8_lossy(w[1]).into_owned())));
            }
        }
    }
    found
}

/// Stops VMM `pid` (verified to serve `socket`): SIGTERM, then SIGKILL
/// after `grace`. Returns once the process is gone.
pub async fn stop(pid: u32, socket: &Path, grace: Duration) {
    if !is_vmm(pid, socket) {
        return;
    }
    let target = Pid::from_raw(pid as i32);
    let _ = kill(target, Signal::SIGTERM);
    if wait_gone(pid, grace).await {
        return;
    }
    if is_vmm(pid, socket) {
        let _ = kill(target, Signal::SIGKILL);
    }
    wait_gone(pid, Duration::from_secs(5)).await;
}

/// Polls until `pid` is gone or a zombie; returns whether it went.
pub async fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if !alive(pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
