//! Per-VM writable copies of images: a reflink where the filesystem has
//! them, else a sparse copy. Images themselves are only ever read.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

nix::ioctl_write_int!(ficlone, 0x94, 9);

const CHUNK: usize = 1 << 20;

/// Makes `dst` a private copy of `src` unless `dst` already exists. The copy
/// is written beside `dst` and renamed into place, so a crash never leaves
/// a half-written copy under the final name.
pub fn ensure_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    if dst.exists() {
        return Ok(());
    }
    let tmp = dst.with_extension("partial");
    let mut input = File::open(src)?;
    let mut output = OpenOptions::new().create(true).write(true).truncate(true).open(&tmp)?;
    // SAFETY: both descriptors are open for the duration of the call.
    let cloned = unsafe { ficlone(output.as_raw_fd(), input.as_raw_fd() as libc::c_ulong) }.is_ok();
    if !cloned {
        sparse_copy(&mut input, &mut output)?;
    }
    output.sync_all()?;
    std::fs::rename(&tmp, dst)?;
    Ok(())
}

/// Copies block by block, leaving holes where the source reads as zeros.
fn sparse_copy(input: &mut File, output: &mut File) -> std::io::Result<()> {
    let len = input.metadata()?.len();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_full(input, &mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            output.seek(SeekFrom::Current(n as i64))?;
        } else {
            output.write_all(&buf[..n])?;
        }
    }
    output.set_len(len)?;
    Ok(())
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

    #[test]
    fn copies_keep_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("img");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::End(-4)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let dst = dir.path().join("copy");
        ensure_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // 64 MiB of mostly zeros must not take 64 MiB on disk.
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        assert!(!dst.with_extension("partial").exists());
    }
}
