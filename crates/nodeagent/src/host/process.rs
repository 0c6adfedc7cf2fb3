//! VMM processes: launching one in its jail (see `jail`), in its own
//! process group, finding it again after an agent restart, and stopping it.
//!
//! A VMM is known by its root directory: a live process whose
//! `/proc/PID/root` is a VM's jail directory under this agent's run
//! directory is that VM's VMM.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
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
    #[error(transparent)]
    Jail(#[from] crate::host::jail::JailError),
}

/// Starts the jailed VMM `/firecracker --api-sock /run/fc.sock --id <uid>`
/// (logging to the jail's log and metrics files, which must exist)
/// (in `jail`, which [`crate::host::jail::Jail::prepare`] made) in its own process group, its stdout and stderr (the guest console)
/// appended to `console`, in the network namespace `net` says. The process outlives the agent; while the
/// agent lives, a task reaps it and calls `ended` with how it ended (see
/// [`record_exit`]).
pub fn launch(
    jail: &crate::host::jail::Jail,
    uid: &str,
    console: &Path,
    net: crate::host::jail::VmmNet,
    ended: impl FnOnce(Reaped) + Send + 'static,
) -> Result<u32, ProcessError> {
    use crate::host::jail::inside;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console)
        .map_err(|source| ProcessError::Console { path: console.to_path_buf(), source })?;
    let entry = jail.entry(net)?;
    let null =
        crate::host::spawn::dev_null().map_err(|source| ProcessError::Console { path: "/dev/null".into(), source })?;
    // The log and metrics from the start, rather than by two requests
    // before the VM's configuration (a restore's load waits for them).
    let args = [
        "--api-sock",
        inside::API_SOCK,
        "--id",
        uid,
        "--log-path",
        inside::LOG,
        "--level",
        "Info",
        "--show-level",
        "--metrics-path",
        inside::METRICS,
    ];
    let cmd = crate::host::spawn::Command {
        program: std::ffi::OsStr::new(inside::BINARY),
        args: args.iter().map(std::ffi::OsStr::new).collect(),
        stdio: [null.as_fd(), out.as_fd(), out.as_fd()],
    };
    let setup = move || {
        // SAFETY: in the child before its exec, as `enter` requires.
        unsafe { entry.enter() }
    };
    // SAFETY: `enter` only makes system calls on strings prepared above.
    let child = crate::host::forks::forking(|| unsafe { crate::host::spawn::spawn(&cmd, &setup) })
        .map_err(|source| ProcessError::Spawn { binary: jail.binary.clone(), source })?;
    let pid = child.id();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                tracing::info!(pid, %status, "VMM process exited");
                ended(Reaped {
                    pid,
                    exit: nexus_api::vm::VmExit {
                        code: status.code(),
                        signal: status.signal(),
                        at: Some(chrono::Utc::now()),
                    },
                });
            }
            Err(e) => tracing::warn!(pid, error = %e, "waiting for VMM process failed"),
        }
    });
    Ok(pid)
}

/// Writes how a VMM ended to `path` (its VM's `reaped` file), where
/// [`reaped`] finds it.
pub fn record_exit(path: &Path, record: &Reaped) {
    // The directory is gone when the VM was removed: nothing to record.
    let _ = std::fs::write(path, serde_json::to_vec(record).unwrap_or_default());
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

/// The directory VMM `pid` is chrooted into, as this process sees it.
pub(crate) fn root_of(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/root")).ok()
}

fn args_of(pid: u32) -> Option<Vec<Vec<u8>>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(cmdline.split(|b| *b == 0).map(<[u8]>::to_vec).collect())
}

fn value_of<'a>(args: &'a [Vec<u8>], flag: &[u8]) -> Option<&'a [u8]> {
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].as_slice())
}

/// The command name of every jailed VMM (`/firecracker` in its jail).
const VMM_COMM: &[u8] = b"firecracker";

/// How the agent tells its VMMs from the host's other processes.
///
/// A jailed VMM is known by its root directory: a live process whose
/// `/proc/PID/root` is `<vms dir>/<uid>/root` is VM `uid`'s VMM. VMMs an
/// agent started before VMMs were jailed (unjailed, `--api-sock <run
/// dir>/vm/fc.sock --id <uid>`, their VM directory bind-mounted at `<run
/// dir>/vm`) are still known, so an upgraded agent adopts them: they run on
/// until they stop, and start again jailed.
///
/// A VMM's root and arguments are fixed from its exec on, so whose it is
/// never changes: [`Vmms::find`] remembers each VMM it has looked at by
/// pid and the inode of its `/proc` directory (a new process under the
/// same pid gets a new one), and only checks that one of ours is still
/// alive. Another agent's (on a host several share) is not looked at again.
#[derive(Debug, Clone)]
pub struct Vmms {
    vms_dir: PathBuf,
    legacy_comm: Vec<u8>,
    legacy_sock: PathBuf,
    /// The VMMs seen by the last search, by pid.
    known: std::sync::Arc<std::sync::Mutex<HashMap<u32, Known>>>,
}

/// A VMM [`Vmms::find`] has looked at.
#[derive(Debug, Clone)]
struct Known {
    /// The inode of its `/proc/PID` directory.
    inode: u64,
    /// Its VM's uid when it is ours; `None` for another's.
    vm: Option<String>,
}

impl Vmms {
    /// The VMMs of the agent with run directory `run`, started from `binary`.
    pub fn new(run: &crate::paths::RunDir, binary: &Path) -> Self {
        let name = binary.file_name().map(|n| n.as_bytes()).unwrap_or_default();
        Self {
            vms_dir: run.vms(),
            legacy_comm: name[..name.len().min(15)].to_vec(),
            legacy_sock: run.root().join("vm/fc.sock"),
            known: Default::default(),
        }
    }

    /// The uid of the VM whose VMM `pid` is, if it is one of ours.
    /// `stat` is the content of `/proc/PID/stat`.
    fn vm_of(&self, pid: u32, stat: &[u8]) -> Option<String> {
        self.is_live_vmm_command(stat).then(|| self.vm_rooted(pid)).flatten()
    }

    /// Whether the process whose `/proc/PID/stat` is `stat` is alive (not a
    /// zombie) and named as a VMM.
    fn is_live_vmm_command(&self, stat: &[u8]) -> bool {
        let (Some(open), Some(close)) = (stat.iter().position(|b| *b == b'('), stat.iter().rposition(|b| *b == b')'))
        else {
            return false;
        };
        open < close
            && stat.get(close + 2).is_some_and(|state| !matches!(state, b'Z' | b'X'))
            && self.is_vmm_command(&stat[open + 1..close])
    }

    /// Whether a process named `comm` may be a VMM.
    fn is_vmm_command(&self, comm: &[u8]) -> bool {
        comm == VMM_COMM || comm == self.legacy_comm.as_slice()
    }

    /// The uid of the VM whose jail process `pid` is rooted in (or, for an
    /// unjailed VMM of an older agent, whose id it was started with).
    fn vm_rooted(&self, pid: u32) -> Option<String> {
        let root = root_of(pid)?;
        if root == Path::new("/") {
            let args = args_of(pid)?;
            if value_of(&args, b"--api-sock") != Some(self.legacy_sock.as_os_str().as_bytes()) {
                return None;
            }
            return value_of(&args, b"--id").map(|id| String::from_utf8_lossy(id).into_owned());
        }
        if root.file_name().map(|n| n.as_bytes()) != Some(b"root") {
            return None;
        }
        let vm_dir = root.parent()?;
        if vm_dir.parent() != Some(self.vms_dir.as_path()) {
            return None;
        }
        vm_dir.file_name()?.to_str().map(str::to_string)
    }

    /// Whether `pid` is a live (not zombie) VMM of VM `uid`: the check that
    /// guards every signal the agent sends.
    pub fn is_vmm(&self, pid: u32, uid: &str) -> bool {
        pid != 0
            && std::fs::read(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| self.vm_of(pid, &stat).as_deref() == Some(uid))
    }

    /// Every live VMM of ours, as (pid, uid). Every process on the host is
    /// looked at, so the cheap tests come first: the command name (its own
    /// small file, not the fifty fields of `/proc/PID/stat`), then the root
    /// link (not for a VMM already known to be another's), and only for
    /// ours the state.
    pub fn find(&self) -> Vec<(u32, String)> {
        use std::os::unix::fs::DirEntryExt;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashMap::with_capacity(known.len());
        let mut ours = Vec::new();
        let live = |pid: u32| std::fs::read(format!("/proc/{pid}/stat")).is_ok_and(|s| self.is_live_vmm_command(&s));
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let inode = entry.ino();
            let vmm = match known.remove(&pid) {
                Some(k) if k.inode == inode => k,
                _ => {
                    let Ok(comm) = std::fs::read(format!("/proc/{pid}/comm")) else { continue };
                    if !self.is_vmm_command(comm.strip_suffix(b"\n").unwrap_or(&comm)) {
                        // Not (yet) a VMM: a child before its exec.
                        continue;
                    }
                    Known { inode, vm: self.vm_rooted(pid) }
                }
            };
            if let Some(uid) = &vmm.vm
                && live(pid)
            {
                ours.push((pid, uid.clone()));
            }
            seen.insert(pid, vmm);
        }
        *known = seen;
        ours
    }

    /// Stops VMM `pid` (verified to be VM `uid`'s): SIGTERM, then SIGKILL
    /// after `grace`. Returns once the process is gone.
    pub async fn stop(&self, pid: u32, uid: &str, grace: Duration) {
        if !self.is_vmm(pid, uid) {
            return;
        }
        let target = Pid::from_raw(pid as i32);
        let _ = kill(target, Signal::SIGTERM);
        if wait_gone(pid, grace).await {
            return;
        }
        if self.is_vmm(pid, uid) {
            let _ = kill(target, Signal::SIGKILL);
        }
        wait_gone(pid, Duration::from_secs(5)).await;
    }
}

/// Whether `pid` is a child of this process (so a reaper task of ours
/// will record how it ends).
pub fn is_our_child(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // Fields after the parenthesised name: state, then the parent's pid.
    let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
    ppid == Some(std::process::id())
}

/// Whether `pid` is stopped (SIGSTOP, or a debugger): it answers nothing,
/// so asking its guest to power off would only wait out the grace.
pub fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['T', 't'])))
        .unwrap_or(false)
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])).unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone or a zombie; returns whether it went.
pub async fn wait_gone(pid: u32, within: Duration) -> bool {
    // Its pidfd turns readable when it ends.
    match crate::host::spawn::pidfd(pid) {
        Ok(ended) => !alive(pid) || tokio::time::timeout(within, ended.readable()).await.is_ok(),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => true,
        // No pidfds: look every 20 ms.
        Err(_) => {
            let deadline = tokio::time::Instant::now() + within;
            while alive(pid) {
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_gone_returns_when_the_process_ends_or_the_time_is_up() {
        let mut long = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut short = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let started = std::time::Instant::now();
        assert!(!wait_gone(long.id(), Duration::from_millis(100)).await, "still running");
        // Not reaped: a zombie counts as gone.
        assert!(wait_gone(short.id(), Duration::from_secs(5)).await);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        long.kill().unwrap();
        assert!(wait_gone(long.id(), Duration::from_secs(5)).await);
        let _ = long.wait();
        let _ = short.wait();
        assert!(wait_gone(u32::MAX >> 10, Duration::from_secs(5)).await, "no such process");
    }

    #[test]
    fn a_vmm_is_found_while_it_lives_and_another_agents_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let ours = crate::paths::RunDir::new(&dir.path().join("ours")).unwrap();
        let theirs = crate::paths::RunDir::new(&dir.path().join("theirs")).unwrap();
        // Unjailed VMMs, known by their command name and arguments: a shell
        // under the VMM binary's name that stays, reading its stdin with a
        // builtin (a shell that ran a command would fork, and its child
        // would look like the VMM until it exec'd).
        // (A link, not a copy: a copy may be busy while another test forks.)
        let binary = dir.path().join("fc-test-vmm");
        std::os::unix::fs::symlink("/bin/sh", &binary).unwrap();
        let vmm = |run: &crate::paths::RunDir, uid: &str| {
            let sock = run.root().join("vm/fc.sock");
            std::process::Command::new(&binary)
                .args(["-c", "read line", "vmm", "--api-sock"])
                .arg(&sock)
                .args(["--id", uid])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut mine = vmm(&ours, "u-ours");
        let mut other = vmm(&theirs, "u-theirs");
        let vmms = Vmms::new(&ours, &binary);
        let want = vec![(mine.id(), "u-ours".to_string())];
        let mut found = Vec::new();
        for _ in 0..100 {
            found = vmms.find();
            if found == want {
                break;
            }
            // Until the shell has exec'd, its name is the test's.
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(found, want);
        assert_eq!(vmms.find(), want, "found again from what the first search remembered");
        mine.kill().unwrap();
        // Not reaped yet: a zombie is not a live VMM.
        for _ in 0..100 {
            if vmms.find().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(vmms.find().is_empty(), "a zombie is not a live VMM");
        mine.wait().unwrap();
        assert!(vmms.find().is_empty());
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
