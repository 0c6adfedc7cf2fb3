//! Free space in the run directory, and whether it is short enough to say
//! so: the node's `DiskPressure` condition, which keeps new VMs away until
//! there is room again.

use std::path::Path;

/// Bytes of the filesystem holding a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes an unprivileged writer may still use.
    pub free: u64,
    pub total: u64,
}

/// The space of the filesystem holding `dir`.
pub fn of(dir: &Path) -> std::io::Result<Space> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let block = st.fragment_size() as u64;
    Ok(Space { free: st.blocks_available() as u64 * block, total: st.blocks() as u64 * block })
}

/// Why `space` is short, if less than `min_free_percent` of it is free.
pub fn pressure(space: Space, min_free_percent: u8) -> Option<String> {
    let mib = |b: u64| b >> 20;
    let short = u128::from(space.free) * 100 < u128::from(space.total) * u128::from(min_free_percent);
    short.then(|| {
        format!(
            "the run directory's filesystem has {} MiB free of {} MiB (less than {min_free_percent}%)",
            mib(space.free),
            mib(space.total)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_starts_below_the_share_of_free_space() {
        let total = 1000 << 20;
        assert_eq!(pressure(Space { free: 50 << 20, total }, 5), None, "exactly 5% free is enough");
        let short = pressure(Space { free: 49 << 20, total }, 5).unwrap();
        assert_eq!(short, "the run directory's filesystem has 49 MiB free of 1000 MiB (less than 5%)");
        assert_eq!(pressure(Space { free: 0, total }, 0), None, "0 turns the condition off");
    }

    #[test]
    fn a_directory_has_some_space() {
        let dir = tempfile::tempdir().unwrap();
        let s = of(dir.path()).unwrap();
        assert!(s.total > 0 && s.free <= s.total);
    }
}
