//! The agent's host layout, and the one place names from the network become
//! paths: `<run dir>/vms/<uid>/{fc.log, metrics.json, console.log,
//! rootfs.ext4, pid, vm.json, ...}` per VM, private to the agent, with the
//! VMM's jail in `<run dir>/vms/<uid>/root/` (see `jail`; the root the
//! VMM sees is `<run dir>/jail-skeleton/`, shared), and
//! `<run dir>/snapshots/<uid>/{state, mem, rootfs.ext4, done.json}` per
//! Snapshot (apart from any VM, so a snapshot outlives the VM it was taken
//! from), and `<run dir>/volumes/<uid>/{disk, volume.json}` per Volume
//! (apart from any VM too). A VM's extra drives are `drives/<name>.img` in
//! its directory (private copies and scratch disks), seen by its VMM at
//! `/drives/<name>`.

use std::path::{Path, PathBuf};

pub use nexus_api::agent::TAP_PREFIX;

/// Failures turning a name into a path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("uid {0:?} is not a UUID (expected 8-4-4-4-12 lower-case hex digits)")]
    BadUid(String),
    #[error("drive name {0:?} is not a DNS label other than rootfs")]
    BadDriveName(String),
}

/// A VM uid that was checked to be a lower-case hyphenated UUID, so it can
/// name a directory and a device without escaping anything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(String);

impl Uid {
    /// Accepts only `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in lower-case hex.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        let groups: Vec<&str> = raw.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        let ok = groups.len() == 5
            && groups
                .iter()
                .zip(lens)
                .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        if ok { Ok(Uid(raw.to_string())) } else { Err(PathError::BadUid(raw.chars().take(80).collect())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The TAP device name (see [`nexus_api::agent::tap_name`]).
    pub fn tap_name(&self) -> String {
        nexus_api::agent::tap_name(&self.0)
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where one VM's files live.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    /// The VMM's jail: the directory it is chrooted into.
    pub fn jail(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// The VMM's API socket: inside the jail, at `/run/fc.sock`; or, for a
    /// VMM started unjailed by an agent of an earlier release and adopted,
    /// in the VM directory itself.
    pub fn socket(&self) -> PathBuf {
        let unjailed = self.dir.join("fc.sock");
        if unjailed.exists() { unjailed } else { self.jail().join("run/fc.sock") }
    }
    /// The user id the VM's VMM runs as.
    pub fn vmm_uid(&self) -> PathBuf {
        self.dir.join("vmm-uid")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("fc.log")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("pid")
    }
    /// Present from just before a VMM is launched until its pid is
    /// recorded: found later, a crash may have left a VMM no pid file names.
    pub fn launching(&self) -> PathBuf {
        self.dir.join("launching")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
    /// The guest address given to this VM, if it asked for one.
    pub fn ip(&self) -> PathBuf {
        self.dir.join("ip")
    }
    /// Where the agent gathers snapshot `snap` of this VM (Firecracker's
    /// files, moved out of the jail, and a copy of the disk) before it
    /// moves, complete, to the run directory's `snapshots/`.
    pub fn staging(&self, snap: &Uid) -> SnapshotPaths {
        SnapshotPaths { dir: self.dir.join(format!("snapshot-{snap}")) }
    }
    /// Present in a VM restored from a snapshot: where it came from and
    /// the guest's own MAC and address (a [`Restored`] as JSON).
    pub fn restored(&self) -> PathBuf {
        self.dir.join("restored.json")
    }
    /// The console's length when the current VMM was launched: where its
    /// own output begins.
    pub fn console_offset(&self) -> PathBuf {
        self.dir.join("console-offset")
    }
    /// When the VMM was started and how long it took to boot.
    pub fn started(&self) -> PathBuf {
        self.dir.join("started")
    }
    /// How the VMM process the agent launched ended (written when it is
    /// reaped: pid, exit status or signal).
    pub fn reaped(&self) -> PathBuf {
        self.dir.join("reaped.json")
    }
    /// How the last VMM that ended on its own ended.
    pub fn last_exit(&self) -> PathBuf {
        self.dir.join("last-exit.json")
    }
    /// Present while the restart policy keeps an ended VMM down.
    pub fn kept_down(&self) -> PathBuf {
        self.dir.join("kept-down")
    }
    /// How many times a VMM that ended on its own was started again.
    pub fn restarts(&self) -> PathBuf {
        self.dir.join("restarts")
    }
    /// The VM's own drive files (private copies, scratch disks).
    pub fn drives(&self) -> PathBuf {
        self.dir.join("drives")
    }
    /// The file of extra drive `name` (a checked drive name: a DNS label).
    pub fn drive(&self, name: &DriveName) -> PathBuf {
        self.drives().join(format!("{}.img", name.as_str()))
    }
    /// The drives the running VMM was started with (`[DriveStatus]`).
    pub fn started_drives(&self) -> PathBuf {
        self.dir.join("drives.json")
    }
    /// The I/O limits the running VMM applies (`AppliedLimits`).
    pub fn limits(&self) -> PathBuf {
        self.dir.join("limits.json")
    }
    /// The document the running VMM's metadata service holds.
    pub fn mmds(&self) -> PathBuf {
        self.dir.join("mmds.json")
    }
}

/// A drive name that was checked to be a DNS label, so it can name a file
/// and a Firecracker drive id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveName(String);

impl DriveName {
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        let ok = !raw.is_empty()
            && raw.len() <= 63
            && raw.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !raw.starts_with('-')
            && !raw.ends_with('-')
            && raw != nexus_api::storage::ROOT_DRIVE;
        if ok { Ok(DriveName(raw.to_string())) } else { Err(PathError::BadDriveName(raw.to_string())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The files of one volume.
#[derive(Debug, Clone)]
pub struct VolumePaths {
    pub dir: PathBuf,
}

impl VolumePaths {
    /// The disk a VM attaches.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }
    /// Written last: the volume is made when it exists.
    pub fn record(&self) -> PathBuf {
        self.dir.join("volume.json")
    }
}

/// The files of one snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotPaths {
    pub dir: PathBuf,
}

impl SnapshotPaths {
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn memory(&self) -> PathBuf {
        self.dir.join("mem")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
    /// Written last: the snapshot is complete when it exists.
    pub fn done(&self) -> PathBuf {
        self.dir.join("done.json")
    }
}

/// What a restored VM's directory records of its origin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Restored {
    pub snapshot_uid: String,
    /// The MAC the guest has (its source's).
    pub mac: String,
    /// The address the guest has (its source's), behind the VM's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<std::net::Ipv4Addr>,
}

/// The agent's run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// `root` must be absolute; it is canonicalized once it exists. `vms/`
    /// and `snapshots/` are made private to root (mode 0700): VMMs reach
    /// their files through their jails, host users not at all.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        for dir in ["vms", "snapshots", "volumes"] {
            std::fs::create_dir_all(root.join(dir))?;
            std::fs::set_permissions(root.join(dir), std::fs::Permissions::from_mode(0o700))?;
            spread_subdirectories(&root.join(dir));
        }
        Ok(Self { root: root.canonicalize()? })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory holding one directory per VM.
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// The files of VM `uid`; always directly under `vms()`.
    pub fn vm(&self, uid: &Uid) -> VmPaths {
        VmPaths { dir: self.vms().join(uid.as_str()) }
    }

    /// The root every VMM of the node sees (see `jail::Skeleton`).
    pub fn jail_skeleton(&self) -> PathBuf {
        self.root.join("jail-skeleton")
    }

    /// Directory holding one directory per warm VMM (see `host::warm`).
    pub fn warm(&self) -> PathBuf {
        self.root.join("warm")
    }

    /// Directory holding one directory per snapshot.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The files of snapshot `uid`; always directly under `snapshots()`.
    pub fn snapshot(&self, uid: &Uid) -> SnapshotPaths {
        SnapshotPaths { dir: self.snapshots().join(uid.as_str()) }
    }

    /// Directory holding one directory per volume.
    pub fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// The files of volume `uid`; always directly under `volumes()`.
    pub fn volume(&self, uid: &Uid) -> VolumePaths {
        VolumePaths { dir: self.volumes().join(uid.as_str()) }
    }
}

/// Asks ext2/3/4 to place each new directory under `dir` in a block group
/// of its own choosing, as it does for directories at the top of the
/// filesystem (the `T` attribute of chattr), rather than beside `dir`. A
/// VM's files then share a group with few others, so creating one does not
/// scan past the inodes that thousands of deleted VMs freed in `dir`'s
/// group (ext4 without a journal skips inodes freed in the last minutes,
/// reading each one to know). Other filesystems ignore it or refuse it;
/// either is fine.
fn spread_subdirectories(dir: &Path) {
    let Ok(handle) = std::fs::File::open(dir) else { return };
    let Some(flags) = inode_flags(&handle) else { return };
    if flags & FS_TOPDIR_FL == 0 {
        let flags = flags | FS_TOPDIR_FL;
        // SAFETY: the kernel reads one int; the descriptor is open.
        unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&handle), libc::FS_IOC_SETFLAGS, &flags) };
    }
}

/// ext2/3/4's "top of a directory hierarchy" inode flag (chattr's `T`).
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// The inode flags of the open file `handle` (chattr's attributes), when
/// its filesystem has them.
fn inode_flags(handle: &std::fs::File) -> Option<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: the kernel writes one int; the descriptor is open.
    let ret = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(handle), libc::FS_IOC_GETFLAGS, &mut flags) };
    (ret == 0).then_some(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_ext4_the_vm_directories_are_spread_over_block_groups() {
        // The system tests' scratch space; on another filesystem there is
        // nothing to check.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        // SAFETY: statfs fills the zeroed struct it is given.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::statfs(path.as_ptr(), &mut fs) }, 0);
        const EXT4_SUPER_MAGIC: i64 = 0xEF53;
        if fs.f_type as i64 != EXT4_SUPER_MAGIC {
            eprintln!("{} is not on ext4: nothing to check", dir.path().display());
            return;
        }
        let run = RunDir::new(dir.path()).unwrap();
        let flags = inode_flags(&std::fs::File::open(run.vms()).unwrap()).expect("ext4 has inode flags");
        assert_ne!(flags & FS_TOPDIR_FL, 0, "vms/ has the top-directory attribute (chattr +T)");
    }

    #[test]
    fn only_canonical_uuids_are_accepted_as_uids() {
        assert!(Uid::parse("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11").is_ok());
        for bad in [
            "",
            "..",
            "../../etc",
            "7F0C9A52-3A43-4D1B-9D44-0C3F0E7D1A11",
            "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a1",
            "7f0c9a52/3a43-4d1b-9d44-0c3f0e7d1a11",
            "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11\0",
        ] {
            assert!(Uid::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        let uid = Uid::parse("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11").unwrap();
        assert_eq!(uid.tap_name(), "nxt7f0c9a523a43");
        assert!(uid.tap_name().len() < 16);
    }
}
