//! VMM processes: launching one in its own process group and its own mount
//! namespace, finding it again after an agent restart, and stopping it.
//!
//! Each VMM sees its VM directory bind-mounted at one fixed path (the run
//! directory's `vm/`), so every Firecracker names its files the same way.
//! A snapshot taken from one VM therefore restores into another VM's
//! directory: its recorded drive paths resolve to the new VM's own copies.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
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
    #[error("path {0} cannot be passed to the kernel")]
    BadPath(PathBuf),
}

/// Where a VMM's files are: on the host, and as the VMM sees them.
#[derive(Debug, Clone)]
pub struct View {
    /// The VM's directory on the host.
    pub host_dir: PathBuf,
    /// Where the VMM sees it (the same for every VMM of this agent).
    pub fixed: PathBuf,
}

impl View {
    /// The API socket as the VMM is told to open it.
    pub fn api_sock(&self) -> PathBuf {
        self.fixed.join("fc.sock")
    }
}

fn cstring(p: &Path) -> Result<CString, ProcessError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ProcessError::BadPath(p.to_path_buf()))
}

/// Starts `binary --api-sock <fixed>/fc.sock --id <uid>` in its own process
/// group and mount namespace, with the VM directory at `view.fixed`, its
/// stdout and stderr (the guest console) appended to `console`; with
/// `own_netns`, in a network namespace of its own too (which ends with it).
/// The process outlives the agent; while the agent lives, a task reaps it,
/// writes how it ended to `reaped` (a [`Reaped`] as JSON) and then calls
/// `ended(pid)`.
pub fn launch(
    binary: &Path,
    view: &View,
    uid: &str,
    console: &Path,
    reaped: PathBuf,
    own_netns: bool,
    ended: impl FnOnce(u32) + Send + 'static,
) -> Result<u32, ProcessError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console)
        .map_err(|source| ProcessError::Console { path: console.to_path_buf(), source })?;
    let err = out.try_clone().map_err(|source| ProcessError::Console { path: console.to_path_buf(), source })?;
    // Allocated before fork: the child may only make system calls.
    let (src, dst, root) = (cstring(&view.host_dir)?, cstring(&view.fixed)?, cstring(Path::new("/"))?);
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("--api-sock")
        .arg(view.api_sock())
        .arg("--id")
        .arg(uid)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false);
    let namespaces = if own_netns { libc::CLONE_NEWNS | libc::CLONE_NEWNET } else { libc::CLONE_NEWNS };
    // SAFETY: the closure runs between fork and exec and only makes the
    // unshare and mount system calls on pre-built C strings.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(namespaces) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Keep our mounts from propagating back to the host.
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn { binary: binary.to_path_buf(), source })?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                tracing::info!(pid, %status, "VMM process exited");
                let record = Reaped {
                    pid,
                    exit: nexus_api::vm::VmExit {
                        code: status.code(),
                        signal: status.signal(),
                        at: Some(chrono::Utc::now()),
                    },
                };
                // The directory is gone when the VM was removed: nothing to record.
                let _ = std::fs::write(&reaped, serde_json::to_vec(&record).unwrap_or_default());
                ended(pid);
            }
            Err(e) => tracing::warn!(pid, error = %e, "waiting for VMM process failed"),
        }
    });
    Ok(pid)
}

/// How a launched VMM process ended, as its reaper recorded it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reaped {
    pub pid: u32,
    pub exit: nexus_api::vm::VmExit,
}

/// How VMM `pid` ended, if the reaper recorded it in `path`. Waits up to
/// `within` for the record: a VMM that just died may not be reaped yet.
/// `None` when the agent was not its parent (it was adopted after a restart).
pub async fn reaped(path: &Path, pid: u32, within: Duration) -> Option<nexus_api::vm::VmExit> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(r) = std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<Reaped>(&b).ok())
            && r.pid == pid
        {
            return Some(r.exit);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn args_of(pid: u32) -> Option<Vec<Vec<u8>>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(cmdline.split(|b| *b == 0).map(<[u8]>::to_vec).collect())
}

fn has_pair(args: &[Vec<u8>], flag: &[u8], value: &[u8]) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

/// Whether `pid` is a live (not zombie) VMM of VM `uid` launched with
/// `api_sock`: the check that guards every signal the agent sends.
pub fn is_vmm(pid: u32, uid: &str, api_sock: &Path) -> bool {
    if pid == 0 || !alive(pid) {
        return false;
    }
    args_of(pid).is_some_and(|args| {
        has_pair(&args, b"--id", uid.as_bytes()) && has_pair(&args, b"--api-sock", api_sock.as_os_str().as_bytes())
    })
}

/// Whether `pid` is a child of this process (so a reaper task of ours
/// will record how it ends).
pub fn is_our_child(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // Fields after the parenthesised name: state, then the parent's pid.
    let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
    ppid == Some(std::process::id())
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])).unwrap_or(false),
        Err(_) => false,
    }
}

/// The name the kernel gives a process started from `binary` (its file
/// name, cut to 15 bytes), as `/proc/PID/stat` shows it.
fn comm_of(binary: &Path) -> Vec<u8> {
    let name = binary.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    name[..name.len().min(15)].to_vec()
}

/// Every live VMM started from `binary` with `api_sock`, as (pid, uid).
///
/// Every process on the host is looked at, so the cheap test comes first:
/// the command name and state in `/proc/PID/stat`. Only processes of
/// `binary` have their command line read (which costs the kernel a walk of
/// the process's memory).
pub fn find_vmms(binary: &Path, api_sock: &Path) -> Vec<(u32, String)> {
    let comm = comm_of(binary);
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else { continue };
        let (Some(open), Some(close)) = (stat.iter().position(|b| *b == b'('), stat.iter().rposition(|b| *b == b')'))
        else {
            continue;
        };
        let running = stat.get(close + 2).is_some_and(|state| !matches!(state, b'Z' | b'X'));
        if stat[open + 1..close] != comm[..] || !running {
            continue;
        }
        let Some(args) = args_of(pid) else { continue };
        if !has_pair(&args, b"--api-sock", api_sock.as_os_str().as_bytes()) {
            continue;
        }
        if let Some(w) = args.windows(2).find(|w| w[0] == b"--id") {
            found.push((pid, String::from_utf8_lossy(&w[1]).into_owned()));
        }
    }
    found
}

/// Stops VMM `pid` (verified to be VM `uid`'s): SIGTERM, then SIGKILL
/// after `grace`. Returns once the process is gone.
pub async fn stop(pid: u32, uid: &str, api_sock: &Path, grace: Duration) {
    if !is_vmm(pid, uid, api_sock) {
        return;
    }
    let target = Pid::from_raw(pid as i32);
    let _ = kill(target, Signal::SIGTERM);
    if wait_gone(pid, grace).await {
        return;
    }
    if is_vmm(pid, uid, api_sock) {
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
