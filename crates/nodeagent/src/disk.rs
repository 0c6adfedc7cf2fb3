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
    if dst.exists() {
        return Ok(CopyMethod::Existing);
    }
    let tmp = dst.with_extension("partial");
    let mut input = File::open(src)?;
    let mut output = OpenOptions::new().create(true).write(true).truncate(true).open(&tmp)?;
    // SAFETY: both descriptors are open for the duration of the call.
    let cloned = unsafe { ficlone(output.as_raw_fd(), input.as_raw_fd() as libc::c_ulong) }.is_ok();
    let method = if cloned {
        CopyMethod::Reflink
    } else {
        sparse_copy(&mut input, &mut output)?;
        CopyMethod::Sparse
    };
    output.sync_all()?;
    std::fs::rename(&tmp, dst)?;
    Ok(method)
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
    let mut buf = vec![0u8; CHUNK];
    let mut pos: u64 = 0;
    while pos < len {
        let (start, end) = match data_extent(input, pos) {
            Some(Ok(extent)) => extent,
            Some(Err(e)) => return Err(e),
            // No more data: the rest is a hole.
            None => break,
        };
        let end = end.min(len);
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
