//! Forks and the TAP descriptors they must not copy.
//!
//! A fork copies every open descriptor of the agent, close-on-exec or not,
//! and the child holds its copies until it execs. A VMM's launch runs the
//! jail's set-up in between (namespaces, mounts, chroot: milliseconds on a
//! busy host). A TAP device is attached to at most one open descriptor, so
//! a TAP the agent had open at the moment of a fork stays attached to that
//! child until its exec, and the VMM the TAP was made for, attaching in
//! that window, is refused with EBUSY ("Open tap device failed: Device or
//! resource busy"). Forks therefore hold this gate shared, and the agent's
//! brief opening of a TAP (to create it) holds it alone.

use std::sync::RwLock;

static GATE: RwLock<()> = RwLock::new(());

/// Runs `fork`, which forks and returns once the child has exec'd (as
/// `Command::spawn` does), while no TAP descriptor is open in the agent.
/// Blocks while a TAP is being created.
pub fn forking<T>(fork: impl FnOnce() -> T) -> T {
    let _shared = GATE.read().unwrap_or_else(|p| p.into_inner());
    fork()
}

/// Runs `open`, which opens a TAP device and closes it again, while no fork
/// is under way. Blocks until the forks under way have exec'd.
pub fn without_forks<T>(open: impl FnOnce() -> T) -> T {
    let _alone = GATE.write().unwrap_or_else(|p| p.into_inner());
    open()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// Set in the process the test runs alone in.
    const ALONE: &str = "NEXUS_FORKS_TEST_ALONE";

    #[test]
    fn a_tap_just_made_is_never_held_by_a_fork_in_progress() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: making TAP devices needs root");
            return;
        }
        // The other tests of this binary run in threads of this process and
        // start programs without the gate (the agent's own forks all pass
        // it), so any of them could copy a TAP made here: the test runs in a
        // process of its own.
        if std::env::var_os(ALONE).is_none() {
            let name = "host::forks::tests::a_tap_just_made_is_never_held_by_a_fork_in_progress";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--test-threads=1", "--nocapture"])
                .env(ALONE, "1")
                .output()
                .expect("running the test in a process of its own");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        // Forks that hold what they copied for 5 ms before their exec, as
        // a VMM's launch does while it sets up its jail.
        let stop = Arc::new(AtomicBool::new(false));
        let forkers: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut cmd = std::process::Command::new("true");
                        // SAFETY: the closure only sleeps.
                        unsafe {
                            cmd.pre_exec(|| {
                                std::thread::sleep(Duration::from_millis(5));
                                Ok(())
                            });
                        }
                        if let Ok(mut child) = super::forking(|| cmd.spawn()) {
                            let _ = child.wait();
                        }
                    }
                })
            })
            .collect();
        // TAPs are made in a network namespace of this thread's own.
        let maker = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a network namespace");
            let mut busy = 0;
            for i in 0..300 {
                let name = format!("nxtfork{i}");
                crate::host::net::create_persistent_tap(&name, (0, 0)).expect("making the TAP");
                match crate::host::net::attach_tap(&name) {
                    Ok(tap) => {
                        // SAFETY: `tap` is attached to the TAP; not persistent, it goes with `tap`.
                        let _ = unsafe { crate::host::net::tunsetpersist(tap.as_raw_fd(), 0) };
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy += 1,
                    Err(e) => panic!("attaching to {name}: {e}"),
                }
            }
            busy
        });
        let busy = maker.join().expect("the TAP maker");
        stop.store(true, Ordering::Relaxed);
        for f in forkers {
            f.join().expect("a forker");
        }
        assert_eq!(busy, 0, "{busy} of 300 TAPs were held by a fork when their VMM attached");
    }
}
