//! Starting a VMM process as `posix_spawn` does: the child shares the
//! agent's memory, and the calling thread waits, until the child execs.
//!
//! A fork copies the agent's page tables for every launch, makes each of
//! its pages copy-on-write (so the agent's next writes fault) and has the
//! child tear the copy down again at its exec: with a hundred VMs on a
//! node that cost about a millisecond of CPU per launch, more than the
//! jail's set-up. Here nothing is copied but the descriptor table and the
//! signal dispositions.
//!
//! What the child runs before its exec (`setup`) runs in the agent's
//! memory, on a stack of its own, while the agent's other threads go on:
//! it must not allocate, take a lock or touch anything but the child
//! itself, and must make credential changes with the raw system calls
//! (see [`crate::host::jail::Entry`]).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;

/// The child's stack, with an inaccessible page below it.
const STACK: usize = 256 << 10;

/// What to start: `program` (a path, looked up nowhere) with `args`
/// (after the program's own name), the agent's environment, and `stdio` as
/// its descriptors 0, 1 and 2.
#[derive(Debug)]
pub struct Command<'a> {
    pub program: &'a OsStr,
    pub args: Vec<&'a OsStr>,
    pub stdio: [BorrowedFd<'a>; 3],
}

/// A started process, which the caller waits for (it stays a zombie until
/// then).
#[derive(Debug)]
pub struct Child {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to end and reaps it.
    pub async fn wait(self) -> io::Result<ExitStatus> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            // SAFETY: a zeroed siginfo_t is valid; waitid fills it in.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let fd = self.pidfd.get_ref().as_raw_fd() as libc::id_t;
            // SAFETY: `fd` is our pidfd; `info` outlives the call.
            if unsafe { libc::waitid(libc::P_PIDFD, fd, &mut info, libc::WEXITED | libc::WNOHANG) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed).
            let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
            if pid == 0 {
                ready.clear_ready();
                continue;
            }
            // The raw wait status `ExitStatus` decodes.
            let raw = match info.si_code {
                libc::CLD_EXITED => (status & 0xff) << 8,
                libc::CLD_DUMPED => status | 0x80,
                _ => status,
            };
            return Ok(ExitStatus::from_raw(raw));
        }
    }
}

/// The child's stack: anonymous memory with a guard page at its low end.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
    /// The guard's size: one page.
    guard: usize,
}

impl Stack {
    fn new() -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let guard = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = STACK + guard;
        // SAFETY: a fresh private anonymous mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Self { base, len, guard };
        // SAFETY: the first page of the mapping just made.
        if unsafe { libc::mprotect(base, guard, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    fn usable(&mut self) -> &mut [u8] {
        // SAFETY: the mapping's pages above the guard, owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.base.cast::<u8>().add(self.guard), self.len - self.guard) }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, no longer used (the child has
        // exec'd or exited when `spawn` returns).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
}

/// Starts `cmd` in its own process group, running `setup` in the child
/// just before its exec. Returns once the child has exec'd; an error of
/// `setup` or of the exec is returned as it is (the child is reaped).
///
/// # Safety
/// `setup` runs in a child sharing this process's memory: it may only make
/// system calls that change the child alone, and must not allocate, lock,
/// panic or unwind (as a `pre_exec` closure after a fork, and more).
pub unsafe fn spawn(cmd: &Command, setup: &(dyn Fn() -> io::Result<()> + Sync)) -> io::Result<Child> {
    // Everything the child needs, prepared here: it may not allocate.
    let program = c_string(cmd.program)?;
    let args: Vec<CString> =
        std::iter::once(Ok(program.clone())).chain(cmd.args.iter().map(|a| c_string(a))).collect::<io::Result<_>>()?;
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the environment"))
        })
        .collect::<io::Result<_>>()?;
    let argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
    let stdio: [RawFd; 3] = [cmd.stdio[0].as_raw_fd(), cmd.stdio[1].as_raw_fd(), cmd.stdio[2].as_raw_fd()];
    let mut stack = Stack::new()?;
    let failed = AtomicI32::new(0);
    let child_main = || -> isize {
        // SAFETY: in the new child, on its own stack, before its exec.
        let errno = unsafe { in_child(&program, &argv, &envp, stdio, setup) };
        failed.store(errno, Ordering::Relaxed);
        // SAFETY: leaves the child at once, without running anything of the
        // agent's (atexit handlers, buffers) in its memory.
        unsafe { libc::_exit(127) }
    };
    // Every signal blocked across the clone, so no handler of the agent's
    // runs in the child before it has reset them.
    // SAFETY: sigset_t is plain data, filled in by the calls.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: valid sigset pointers.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    use nix::sched::CloneFlags;
    // SAFETY: with CLONE_VFORK this thread waits until the child execs or
    // exits, so everything `child_main` borrows outlives its use; the
    // stack is the child's alone.
    let cloned = unsafe {
        nix::sched::clone(
            Box::new(child_main),
            stack.usable(),
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    let pid = cloned.map_err(io::Error::from)?;
    let errno = failed.load(Ordering::Relaxed);
    if errno != 0 {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(errno));
    }
    let pidfd = match pidfd(pid.as_raw() as u32) {
        Ok(fd) => fd,
        Err(e) => {
            // Without a pidfd it cannot be waited for: stop it rather than
            // leave a process nobody reaps.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(e);
        }
    };
    Ok(Child { pid: pid.as_raw() as u32, pidfd })
}

/// A descriptor for process `pid` that turns readable when it ends (it
/// is then a zombie, or gone), registered with the runtime.
pub fn pidfd(pid: u32) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags; checked below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as RawFd;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the pidfd is owned by the AsyncFd and closed only with it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(io::Error::from)
}

/// The child's part: default signal dispositions and an empty mask, the
/// descriptors, its own process group, `setup`, then the exec. Returns the
/// errno of the step that failed.
///
/// # Safety
/// Only in the child `spawn` makes, before its exec.
unsafe fn in_child(
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    stdio: [RawFd; 3],
    setup: &dyn Fn() -> io::Result<()>,
) -> i32 {
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
    // SAFETY: system calls on the child's own state and on the prepared,
    // NUL-terminated strings and arrays.
    unsafe {
        // Handlers are the agent's code: the child gets the defaults (and
        // SIGPIPE back, which the Rust runtime ignores); what the agent
        // ignores otherwise stays ignored, as after a fork and exec.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut now: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut now) != 0 {
                continue;
            }
            if now.sa_sigaction != libc::SIG_DFL && (now.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE) {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &default, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        // Descriptors 0-2, by way of copies above them, so that one of the
        // three being already 0, 1 or 2 cannot clobber another.
        let mut high = [-1; 3];
        for (i, fd) in stdio.into_iter().enumerate() {
            high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
            if high[i] < 0 {
                return errno();
            }
        }
        for (target, fd) in high.into_iter().enumerate() {
            if libc::dup2(fd, target as RawFd) < 0 {
                return errno();
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return errno();
        }
        if let Err(e) = setup() {
            return e.raw_os_error().unwrap_or(libc::EINVAL);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        errno()
    }
}

/// `/dev/null`, for a child's standard input.
pub fn dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn sh<'a>(script: &'a str, out: &'a std::fs::File, null: &'a OwnedFd) -> Command<'a> {
        Command {
            program: OsStr::new("/bin/sh"),
            args: vec![OsStr::new("-c"), OsStr::new(script)],
            stdio: [null.as_fd(), out.as_fd(), out.as_fd()],
        }
    }

    fn nothing() -> io::Result<()> {
        Ok(())
    }

    #[tokio::test]
    async fn a_child_runs_with_its_output_redirected_in_its_own_group_and_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        let null = dev_null().unwrap();
        // SAFETY: the setup does nothing.
        let child =
            unsafe { spawn(&sh("echo $$ $(ps -o pgid= -p $$) \"$NEXUS_SPAWN_TEST\"; exit 3", &out, &null), &nothing) };
        let child = child.unwrap();
        let pid = child.id();
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        let text = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let mut words = text.split_whitespace();
        assert_eq!(words.next(), Some(pid.to_string().as_str()));
        assert_eq!(words.next(), Some(pid.to_string().as_str()), "its own process group: {text}");
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    }

    #[tokio::test]
    async fn a_signal_that_ends_the_child_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        let null = dev_null().unwrap();
        // SAFETY: the setup does nothing.
        let child = unsafe { spawn(&sh("kill -TERM $$; sleep 5", &out, &null), &nothing) }.unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!((status.code(), status.signal()), (None, Some(libc::SIGTERM)));
    }

    #[tokio::test]
    async fn a_failed_exec_or_setup_is_the_callers_error() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        let null = dev_null().unwrap();
        let absent = Command { program: OsStr::new("/nonexistent/vmm"), args: vec![], stdio: [null.as_fd(); 3] };
        // SAFETY: the setup does nothing.
        let err = unsafe { spawn(&absent, &nothing) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let refuse = || Err(io::Error::from_raw_os_error(libc::EPERM));
        // SAFETY: the setup makes no call at all.
        let err = unsafe { spawn(&sh("echo ran", &out, &null), &refuse) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert_eq!(std::fs::read_to_string(dir.path().join("out")).unwrap(), "", "nothing ran");
    }

    #[tokio::test]
    async fn what_the_setup_changes_is_the_childs_alone() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: changing users needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        let null = dev_null().unwrap();
        // The jail's last steps: drop to another user with the raw calls.
        let drop_user = || {
            // SAFETY: raw system calls changing the calling task alone.
            let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
        };
        // SAFETY: the setup makes one raw system call.
        let child = unsafe { spawn(&sh("id -u; trap - PIPE; kill -0 $$", &out, &null), &drop_user) }.unwrap();
        assert!(child.wait().await.unwrap().success());
        assert_eq!(std::fs::read_to_string(dir.path().join("out")).unwrap().trim(), "65534");
        // Every thread of the test keeps root.
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            assert!(status.lines().any(|l| l.starts_with("Uid:\t0\t0\t0")), "{status}");
        }
    }
}
