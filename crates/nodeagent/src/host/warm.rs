//! Warm VMMs: a jailed VMM started ahead in each spare network namespace
//! (see [`crate::host::spares`]), listening on its API socket for the VM
//! that will be restored into it.
//!
//! Until its snapshot is loaded, a restored VM's VMM is the same for every
//! VM: a fresh process, jailed, as a user of its own, in the namespace of
//! a spare. A warm VMM is that process made before any VM asks for it, in
//! a directory of its own under the run directory's `warm/` (its jail
//! root, console, log and metrics files, and the user id it holds, laid
//! out as a VM's directory is). A restore that takes a spare adopts its
//! warm VMM: the jail root, console, log, metrics and user id are renamed
//! into the VM's directory (the process is chrooted into the root and
//! holds the files open; a rename moves nothing under it), its pid becomes
//! the VM's, and its exit is reported as the VM's from then on. The load
//! follows at once: no fork, no jail set-up and no wait for the socket on
//! the restore's critical path.
//!
//! What the VM keeps of its VMM's past: the instance id (`--id`) is the
//! warm VMM's name, `warm-<n>`, as the first lines of its log show.
//!
//! A warm VMM that is not adopted is killed and its directory removed
//! when its spare is dropped (the agent stopping, or a restore that could
//! not use it). Those an agent that was killed left behind are found by
//! their root and killed when the next agent starts ([`end_leftovers`]).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::AgentError;
use crate::host::jail::{Jail, Skeleton, Users, VmmNet};
use crate::host::process::{self, Reaped};
use crate::paths::{RunDir, Uid, VmPaths};

/// Where a warm VMM's exit is reported once a VM adopted it: that VM's
/// `reaped` file and uid.
type ExitTo = Arc<Mutex<Option<(PathBuf, String)>>>;

/// One VMM started ahead, not yet any VM's.
#[derive(Debug)]
pub struct Warm {
    pid: u32,
    dir: PathBuf,
    users: Arc<Users>,
    exit_to: ExitTo,
    adopted: bool,
}

/// What starting a warm VMM needs of the node.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub run: RunDir,
    pub skeleton: Skeleton,
    pub binary: PathBuf,
    pub users: Arc<Users>,
    pub exits: Arc<crate::host::exits::Exits>,
}

impl Launcher {
    /// Starts warm VMM number `n` in the network namespace `netns` (an
    /// open descriptor of it). Blocks while the process is forked.
    pub fn start(&self, n: u64, netns: RawFd) -> Result<Warm, AgentError> {
        let dir = self.run.warm().join(n.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        let paths = VmPaths { dir: dir.clone() };
        let user = self.users.user_of(&paths)?;
        // Owned from here: a failure below removes the directory and frees the user.
        let mut warm = Warm { pid: 0, dir, users: self.users.clone(), exit_to: Arc::default(), adopted: false };
        let jail = Jail {
            root: paths.jail(),
            skeleton: self.skeleton.clone(),
            uid: user,
            gid: user,
            binary: self.binary.clone(),
            kernel: None,
            initrd: None,
            read_only_binds: Vec::new(),
        };
        jail.prepare()?;
        jail.link_log_files(&paths)?;
        let ended = {
            let (exit_to, exits) = (warm.exit_to.clone(), self.exits.clone());
            move |record: Reaped| match exit_to.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some((reaped, uid)) => {
                    process::record_exit(&reaped, &record);
                    exits.record(&uid, record.pid);
                }
                None => tracing::debug!(pid = record.pid, exit = %record.exit, "a warm VMM ended unadopted"),
            }
        };
        warm.pid = process::launch(&jail, &format!("warm-{n}"), &paths.console(), VmmNet::Join(netns), ended)?;
        Ok(warm)
    }
}

impl Warm {
    /// Whether its process still runs.
    pub fn alive(&self) -> bool {
        self.pid != 0 && process::alive(self.pid)
    }

    /// Makes this VMM the one of VM `uid`, whose directory `paths` holds
    /// no jail, console or log yet: moves its files there, records its
    /// pid, and reports its exit as the VM's. Returns the pid.
    pub fn adopt(mut self, paths: &VmPaths, uid: &Uid) -> Result<u32, AgentError> {
        let from = VmPaths { dir: self.dir.clone() };
        // First: it may end at any moment, and that end is the VM's now.
        *self.exit_to.lock().unwrap_or_else(|p| p.into_inner()) = Some((paths.reaped(), uid.to_string()));
        let moves = [
            (from.jail(), paths.jail()),
            (from.console(), paths.console()),
            (from.log(), paths.log()),
            (from.metrics(), paths.metrics()),
            (from.vmm_uid(), paths.vmm_uid()),
        ];
        for (a, b) in moves {
            std::fs::rename(&a, &b).map_err(AgentError::io(format!("moving {} to {}", a.display(), b.display())))?;
        }
        std::fs::write(paths.pid(), self.pid.to_string()).map_err(AgentError::io("writing the pid file"))?;
        self.adopted = true;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(self.pid)
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        if self.adopted {
            return;
        }
        if self.pid != 0 && rooted_under(self.pid, &self.dir) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::SIGKILL);
        }
        self.users.release(&VmPaths { dir: self.dir.clone() });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether process `pid` is chrooted somewhere under `dir`.
fn rooted_under(pid: u32, dir: &Path) -> bool {
    process::root_of(pid).is_some_and(|root| root.starts_with(dir))
}

/// Kills the warm VMMs an earlier agent of run directory `run` left (found
/// by their root) and removes their directories. For the agent's start,
/// before it makes any of its own.
pub fn end_leftovers(run: &RunDir) {
    let dir = run.warm();
    if !dir.exists() {
        return;
    }
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| rooted_under(*pid, &dir));
    for pid in pids {
        tracing::info!(pid, "ending a warm VMM left by an earlier agent");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "removing the warm VMMs' directory failed");
    }
}
