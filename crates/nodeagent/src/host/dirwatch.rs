//! Wakes a task when entries appear in a directory (inotify), so the agent
//! learns that a VMM has made its API socket the moment it does, instead of
//! looking for it on a timer.
//!
//! Closing an inotify instance waits for the kernel's fsnotify grace period
//! (10-20 ms on a busy host), so a watch is closed on a blocking thread,
//! never on the task that used it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// An inotify instance watching one directory for new entries.
#[derive(Debug)]
pub struct DirWatch {
    /// `None` only while being dropped.
    fd: Option<AsyncFd<Watched>>,
}

#[derive(Debug)]
struct Watched(Inotify);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DirWatch {
    /// Starts watching `dir` for entries created in it or moved into it.
    /// Entries made before this call are not reported: look for what you
    /// wait for after creating the watch, then wait.
    pub fn new(dir: &Path) -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)?;
        // SAFETY: the descriptor is owned by the value registered with it,
        // so it stays open for as long as the registration lasts.
        let fd = unsafe { AsyncFd::register_with_interest(Watched(inotify), Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(DirWatch { fd: Some(fd) })
    }

    /// Waits until at least one entry has appeared since the last call.
    pub async fn changed(&self) -> io::Result<()> {
        let Some(fd) = &self.fd else { return Err(io::ErrorKind::BrokenPipe.into()) };
        loop {
            let mut ready = fd.readable().await?;
            match ready.try_io(|w| w.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                // Nothing to read after all; readiness was cleared.
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else { return };
        // Deregistered here; closed where waiting does no harm.
        let watched = fd.into_inner();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(watched))),
            Err(_) => drop(watched),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_new_entry_wakes_the_waiter_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let watch = DirWatch::new(dir.path()).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), watch.changed()).await.is_err(),
            "nothing appeared yet"
        );
        let path = dir.path().join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        tokio::time::timeout(Duration::from_secs(2), watch.changed())
            .await
            .expect("woken by the socket's creation")
            .unwrap();
    }
}
