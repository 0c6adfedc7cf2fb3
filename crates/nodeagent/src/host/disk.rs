//! Per-VM writable copies of images: a reflink where the filesystem has
//! them, else a sparse copy. Images themselves are only ever read.
//!
//! Copies run on tokio's blocking pool ([`ensure_copy`]): a multi-GiB copy
//! on an async worker would stall every other task of the agent, its
//! heartbeat included.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

nix::ioctl_write_int!(ficlone, 0x94, 9);

const CHUNK: usize = 1 << 20;

/// How a private copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMethod {
    /// A copy-on-write clone (FICLONE): constant time, no new blocks.
    Reflink,
    /// The data extents copied, holes kept.
    Sparse,
    /// The copy was already there.
    Existing,
}

/// Makes `dst` a private copy of `src` unless `dst` already exists, on the
/// blocking pool. The copy is written beside `dst` and renamed into place,
/// so a crash never leaves a half-written copy under the final name.
pub async fn ensure_copy(src: PathBuf, dst: PathBuf) -> std::io::Result<CopyMethod> {
    tokio::task::spawn_blocking(move || ensure_copy_blocking(&src, &dst))
        .await
        .map_err(|e| std::io::Error::other(format!("the copy task failed: {e}")))?
}

/// [`ensure_copy`] on the calling thread.
pub fn ensure_copy_blocking(src: &Path, dst: &Path) -> std::io::Result<CopyMethod> {
    copy_into_place(src, dst, true)
}

/// Makes `dst` a private copy of `src` (unless it exists) by a reflink or
/// a sparse copy written beside it and renamed into place; with `sync`, the
/// copy is flushed to disk before the rename.
fn copy_into_place(src: &Path, dst: &Path, sync: bool) -> std::io::Result<CopyMethod> {
    if dst.exists() {
        return Ok(CopyMethod::Existing);
    }
    let tmp = dst.with_extension("partial");
    let mut input = File::open(src)?;
    let copied = (|| {
        let mut output = OpenOptions::new().create(true).write(true).truncate(true).open(&tmp)?;
        // SAFETY: both descriptors are open for the duration of the call.
        let cloned = unsafe { ficlone(output.as_raw_fd(), input.as_raw_fd() as libc::c_ulong) }.is_ok();
        let method = if cloned {
            CopyMethod::Reflink
        } else {
            sparse_copy(&mut input, &mut output)?;
            CopyMethod::Sparse
        };
        if sync {
            output.sync_all()?;
        }
        std::fs::rename(&tmp, dst)?;
        Ok(method)
    })();
    if copied.is_err() {
        // A copy cut short (a full disk) leaves nothing behind.
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

/// The marker beside a VM disk saying it has been flushed to disk.
fn synced_marker(disk: &Path) -> PathBuf {
    disk.with_extension("synced")
}

/// Makes `dst`, a VM's private disk, a copy of `src` unless it exists, and
/// returns at once: the flush to disk follows on a blocking thread, off the
/// VM's start, and leaves a `.synced` marker beside the disk.
///
/// # Guarantees
/// A disk found without its marker was either made since the host last
/// started (its data is all in the page cache: it is flushed now) or before
/// (the host went down before the flush, so it may be incomplete: it is
/// copied again). A VM therefore never boots from a disk that a crash cut
/// short; what it loses in such a crash is what an unflushed guest write
/// loses anyway.
pub async fn ensure_disk(src: PathBuf, dst: PathBuf) -> std::io::Result<CopyMethod> {
    let disk = dst.clone();
    let method = tokio::task::spawn_blocking(move || place_disk(&src, &dst, boot_time()?))
        .await
        .map_err(|e| std::io::Error::other(format!("the copy task failed: {e}")))??;
    if !synced_marker(&disk).exists() {
        tokio::task::spawn_blocking(move || {
            if let Err(e) = flush(&disk) {
                // The VM may have been deleted meanwhile.
                tracing::debug!(disk = %disk.display(), error = %e, "flushing a VM disk failed");
            }
        });
    }
    Ok(method)
}

/// Flushes `disk` and its directory entry, then marks it flushed.
fn flush(disk: &Path) -> std::io::Result<()> {
    File::open(disk)?.sync_all()?;
    let dir = disk.parent().unwrap_or(Path::new("/"));
    File::open(dir)?.sync_all()?;
    File::create(synced_marker(disk))?.sync_all()?;
    File::open(dir)?.sync_all()
}

/// The blocking part of [`ensure_disk`]; `boot` is when the host started
/// (seconds since the epoch).
fn place_disk(src: &Path, dst: &Path, boot: Option<i64>) -> std::io::Result<CopyMethod> {
    use std::os::unix::fs::MetadataExt;
    if dst.exists() && !synced_marker(dst).exists() {
        let changed = std::fs::metadata(dst)?.ctime();
        if boot.is_some_and(|boot| changed < boot) {
            tracing::warn!(disk = %dst.display(), "a disk made before the host restarted was never flushed; copying it again");
            std::fs::remove_file(dst)?;
        }
    }
    copy_into_place(src, dst, false)
}

/// When the host started, in seconds since the epoch (`btime` of
/// /proc/stat), read once: the file is long and the answer never changes.
fn boot_time() -> std::io::Result<Option<i64>> {
    static BOOT: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();
    if let Some(boot) = BOOT.get() {
        return Ok(*boot);
    }
    let stat = std::fs::read_to_string("/proc/stat")?;
    let boot = stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok());
    Ok(*BOOT.get_or_init(|| boot))
}

/// Whether the filesystem holding `dir` clones files in constant time:
/// tries a reflink of a small scratch file there.
pub fn supports_reflink(dir: &Path) -> bool {
    let a = dir.join(".reflink-probe-a");
    let b = dir.join(".reflink-probe-b");
    let result = (|| -> std::io::Result<bool> {
        let mut src = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(&a)?;
        src.write_all(&[1u8; 4096])?;
        src.sync_all()?;
        let dst = OpenOptions::new().create(true).write(true).truncate(true).open(&b)?;
        // SAFETY: both descriptors are open for the duration of the call.
        Ok(unsafe { ficlone(dst.as_raw_fd(), src.as_raw_fd() as libc::c_ulong) }.is_ok())
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    result.unwrap_or(false)
}

/// Copies the data extents only (SEEK_DATA/SEEK_HOLE), so a sparse image
/// costs what it holds, not its size; inside extents, blocks of zeros are
/// skipped too. Falls back to reading everything where the filesystem does
/// not report extents.
fn sparse_copy(input: &mut File, output: &mut File) -> std::io::Result<()> {
    let len = input.metadata()?.len();
    // Made at the first data extent: an image of holes needs none.
    let mut buf: Vec<u8> = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let (start, end) = match data_extent(input, pos) {
            Some(Ok(extent)) => extent,
            Some(Err(e)) => return Err(e),
            // No more data: the rest is a hole.
            None => break,
        };
        let end = end.min(len);
        if buf.is_empty() {
            buf = vec![0u8; CHUNK];
        }
        input.seek(SeekFrom::Start(start))?;
        output.seek(SeekFrom::Start(start))?;
        let mut at = start;
        while at < end {
            let want = ((end - at) as usize).min(CHUNK);
            let n = read_full(input, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().all(|b| *b == 0) {
                output.seek(SeekFrom::Current(n as i64))?;
            } else {
                output.write_all(&buf[..n])?;
            }
            at += n as u64;
        }
        pos = end;
    }
    output.set_len(len)?;
    Ok(())
}

/// The next data extent at or after `from` as `[start, end)`; `None` when
/// only a hole remains. Filesystems without extent reporting answer with
/// one extent to the end of the file.
fn data_extent(f: &File, from: u64) -> Option<std::io::Result<(u64, u64)>> {
    let fd = f.as_raw_fd();
    // SAFETY: lseek on an open descriptor has no memory effects.
    let start = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => None,
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Some(Ok((from, u64::MAX))),
            _ => Some(Err(err)),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Some(Ok((start as u64, u64::MAX)));
    }
    Some(Ok((start as u64, end as u64)))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sparse_image(path: &Path, size: u64) {
        let mut f = File::create(path).unwrap();
        f.write_all(b"head").unwrap();
        f.set_len(size).unwrap();
        f.seek(SeekFrom::Start(size / 2)).unwrap();
        f.write_all(b"middle").unwrap();
        f.seek(SeekFrom::End(-4)).unwrap();
        f.write_all(b"tail").unwrap();
    }

    #[test]
    fn copies_keep_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("img");
        sparse_image(&src, 64 << 20);
        let dst = dir.path().join("copy");
        let method = ensure_copy_blocking(&src, &dst).unwrap();
        assert_ne!(method, CopyMethod::Existing);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // 64 MiB of mostly holes must not take 64 MiB on disk.
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        assert!(!dst.with_extension("partial").exists());
        assert_eq!(ensure_copy_blocking(&src, &dst).unwrap(), CopyMethod::Existing);
    }

    #[test]
    fn extents_skip_the_holes_of_a_large_image() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big");
        sparse_image(&src, 4 << 30);
        let f = File::open(&src).unwrap();
        let (start, end) = data_extent(&f, 0).unwrap().unwrap();
        assert_eq!(start, 0);
        if end == u64::MAX {
            eprintln!("this filesystem reports no extents; the copy reads everything");
            return;
        }
        assert!(end < 1 << 20, "the first extent is the head only: {end}");
        let (middle, _) = data_extent(&f, end).unwrap().unwrap();
        assert!(middle <= 2 << 30 && middle > 1 << 30, "the next extent is the middle one: {middle}");
        let mut out = File::create(dir.path().join("out")).unwrap();
        sparse_copy(&mut File::open(&src).unwrap(), &mut out).unwrap();
        let copy = std::fs::metadata(dir.path().join("out")).unwrap();
        assert_eq!(copy.len(), 4 << 30);
        assert!(copy.blocks() * 512 < 1 << 20, "holes stay holes: {} bytes", copy.blocks() * 512);
    }

    #[tokio::test]
    async fn a_vm_disk_is_flushed_after_it_is_made_and_one_never_flushed_before_a_reboot_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("img");
        sparse_image(&src, 16 << 20);
        let dst = dir.path().join("rootfs.ext4");
        assert_ne!(ensure_disk(src.clone(), dst.clone()).await.unwrap(), CopyMethod::Existing);
        let marker = synced_marker(&dst);
        for _ in 0..500 {
            if marker.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(marker.exists(), "flushed in the background");
        assert_eq!(ensure_disk(src.clone(), dst.clone()).await.unwrap(), CopyMethod::Existing);

        // Without its marker: kept when made since the host started...
        std::fs::remove_file(&marker).unwrap();
        std::fs::write(&dst, b"cut short").unwrap();
        let boot = boot_time().unwrap().expect("btime");
        assert_eq!(place_disk(&src, &dst, Some(boot)).unwrap(), CopyMethod::Existing, "same boot: kept");
        // ... and made again when the host started after it last changed.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_ne!(place_disk(&src, &dst, Some(now + 60)).unwrap(), CopyMethod::Existing);
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap(), "a whole copy again");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_async_copy_leaves_the_runtime_free() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("img");
        sparse_image(&src, 16 << 20);
        let copy = tokio::spawn(ensure_copy(src.clone(), dir.path().join("copy")));
        // On a single-threaded runtime this only runs if the copy is not on it.
        tokio::task::yield_now().await;
        assert!(copy.await.unwrap().is_ok());
    }
}
