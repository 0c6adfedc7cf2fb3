//! Jails for VMMs. Each VMM runs as an unprivileged user of its own (one
//! uid and gid per VM, from a configured range), chrooted into its VM's
//! jail directory (`<vm dir>/root`), with no capabilities and
//! `no_new_privs` set, in a mount namespace of its own where the few host
//! files it needs are bind-mounted read-only.
//!
//! What a VMM sees (the same in every jail, so a snapshot taken in one
//! restores in another):
//!
//! | path | what |
//! |---|---|
//! | `/firecracker` | the VMM binary (bind mount, read-only) |
//! | `/kernel`, `/initrd` | the guest kernel and its initial ramdisk, if any (bind mounts, read-only) |
//! | `/rootfs.ext4`, `/fc.log`, `/metrics.json` | links to `/vm/...`: hard links to the VM's private files, owned by the VM's user |
//! | `/snapshot.state`, `/snapshot.mem` | links to a restored VM's snapshot files in `/vm/` (read-only to it) |
//! | `/run/` | a link to `/vm/run/`, the one directory it may create files in: its API socket, snapshots being written |
//! | `/dev/kvm`, `/dev/net/tun` | device nodes on a private tmpfs, owned by the VM's user |
//! | `/usr/lib`, `/lib`, ... | only for a dynamically linked binary: the host's libraries, read-only |
//!
//! The root the VMM sees is one skeleton shared by every jail of the node
//! (`<run dir>/jail-skeleton`: the mount points and links above), bound
//! read-only over the VM's jail directory in the VMM's mount namespace, with
//! the jail directory itself bound at `/vm`. So a VM start makes two
//! directories (the jail and its `run/`), not a dozen entries: creating
//! inodes is what costs most on a busy ext4 host.
//!
//! The jail directory belongs to root and is read-only to the VMM: it can
//! write into its files and `run/`, but cannot replace a name the agent
//! later opens with a link to a host file. Everything the agent reads
//! (logs, metrics, the disk) it reads through its own names in the private
//! VM directory, never through the jail.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::ops::RangeInclusive;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::paths::VmPaths;

mod entry;
pub use entry::Entry;

/// Paths as a jailed VMM sees them.
pub mod inside {
    pub const BINARY: &str = "/firecracker";
    pub const KERNEL: &str = "/kernel";
    pub const INITRD: &str = "/initrd";
    pub const ROOTFS: &str = "/rootfs.ext4";
    pub const LOG: &str = "/fc.log";
    pub const METRICS: &str = "/metrics.json";
    pub const API_SOCK: &str = "/run/fc.sock";
    /// Where the VM's jail directory is bound in the skeleton.
    pub const VM: &str = "/vm";
    /// Where a VM's extra drives are, one file per drive.
    pub const DRIVES: &str = "/drives";
    pub const SNAPSHOT_STATE: &str = "/snapshot.state";
    pub const SNAPSHOT_MEM: &str = "/snapshot.mem";

    /// Where the VMM writes snapshot `snap` before the agent moves it out.
    pub fn staging(snap: &crate::paths::Uid) -> String {
        format!("/run/snapshot-{snap}")
    }
}

/// The host directories holding shared libraries, bind-mounted into the
/// jail of a dynamically linked VMM binary (a static one gets none).
const LIBRARY_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64"];

/// The dynamic loader's cache of where libraries are.
const LOADER_CACHE: &str = "/etc/ld.so.cache";

/// Failures setting up a jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("every VMM user id in {first}-{last} is taken; widen --vmm-uids")]
    Exhausted { first: u32, last: u32 },
    #[error("{what} {path} cannot be read by a VMM's user (mode {mode:o}); make it readable to others (chmod a+r)")]
    Unreadable { what: &'static str, path: PathBuf, mode: u32 },
    #[error("preparing the jail: {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("path {0} cannot be passed to the kernel")]
    BadPath(PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Io { what, source }
}

/// Parses `first-last` (inclusive) as a range of user ids.
pub fn parse_uid_range(text: &str) -> Result<RangeInclusive<u32>, String> {
    let (a, b) = text.split_once('-').ok_or_else(|| format!("{text:?} is not in first-last form"))?;
    let first: u32 = a.trim().parse().map_err(|_| format!("{a:?} is not a user id"))?;
    let last: u32 = b.trim().parse().map_err(|_| format!("{b:?} is not a user id"))?;
    if first == 0 || last < first {
        return Err(format!("{text:?}: the range must be non-empty and must not include 0 (root)"));
    }
    Ok(first..=last)
}

/// The user ids of this node's VMMs: one per VM, kept in the VM's
/// directory (`vmm-uid`) for as long as the VM is on the node.
#[derive(Debug)]
pub struct Users {
    range: RangeInclusive<u32>,
    taken: Mutex<BTreeSet<u32>>,
}

impl Users {
    /// The range `range`, with the ids VMs under `vms_dir` already hold.
    pub fn new(range: RangeInclusive<u32>, vms_dir: &Path) -> Self {
        let taken = std::fs::read_dir(vms_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| read_user(&e.path().join("vmm-uid")))
            .collect();
        Self { range, taken: Mutex::new(taken) }
    }

    /// The user id of the VM at `paths`: the one it holds, or the lowest
    /// free one, recorded.
    pub fn user_of(&self, paths: &VmPaths) -> Result<u32, JailError> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(uid) = read_user(&paths.vmm_uid()) {
            taken.insert(uid);
            return Ok(uid);
        }
        let uid = self
            .range
            .clone()
            .find(|u| !taken.contains(u))
            .ok_or(JailError::Exhausted { first: *self.range.start(), last: *self.range.end() })?;
        std::fs::write(paths.vmm_uid(), uid.to_string()).map_err(io("recording the VMM's user id"))?;
        taken.insert(uid);
        Ok(uid)
    }

    /// Frees the user id of the VM at `paths` (its directory is going).
    pub fn release(&self, paths: &VmPaths) {
        if let Some(uid) = read_user(&paths.vmm_uid()) {
            self.taken.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
        }
    }
}

fn read_user(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|u| *u != 0)
}

/// Whether the ELF file at `binary` names a program interpreter, that is,
/// is dynamically linked (it then needs the host's libraries in its jail).
pub fn is_dynamic(binary: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(binary)?.take(64 * 1024).read_to_end(&mut head)?;
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        // Not a 64-bit little-endian ELF (a script, say): assume it needs them.
        return Ok(true);
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    Ok((0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        head.get(at..at + 4).is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP)
    }))
}

/// The jail of one VMM launch.
#[derive(Debug, Clone)]
pub struct Jail {
    /// The jail directory on the host (`<vm dir>/root`).
    pub root: PathBuf,
    /// The node's shared skeleton, which also says whether the binary
    /// needs the host's libraries.
    pub skeleton: Skeleton,
    pub uid: u32,
    pub gid: u32,
    /// The VMM binary on the host.
    pub binary: PathBuf,
    /// The guest kernel on the host (none for a restore).
    pub kernel: Option<PathBuf>,
    /// Its initial ramdisk, when the VM has one.
    pub initrd: Option<PathBuf>,
    /// Host files bound read-only into the jail, at these paths (under
    /// `/drives`, whose mount points the caller makes).
    pub read_only_binds: Vec<(PathBuf, String)>,
}

impl Jail {
    /// Makes the jail directory (owned by root) and its `run/` (owned by
    /// the VM's user), and the node's skeleton if it is missing. Safe to
    /// repeat.
    pub fn prepare(&self) -> Result<(), JailError> {
        if let Some(kernel) = &self.kernel {
            check_readable("kernel", kernel)?;
        }
        if let Some(initrd) = &self.initrd {
            check_readable("initrd", initrd)?;
        }
        for (file, _) in &self.read_only_binds {
            check_readable("drive image", file)?;
        }
        check_readable("VMM binary", &self.binary)?;
        self.skeleton.ensure()?;
        mkdir(&self.root, 0o755, None)?;
        mkdir(&self.root.join("run"), 0o700, Some((self.uid, self.gid)))
    }

    /// `inside` (a path as the VMM sees it) on the host.
    pub fn host(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// Makes `private` (a file in the VM directory, owned by the VM's user
    /// from now on) visible in the jail at `inside`, by a hard link.
    pub fn link(&self, private: &Path, inside: &str) -> Result<(), JailError> {
        let at = self.host(inside);
        std::os::unix::fs::chown(private, Some(self.uid), Some(self.gid))
            .map_err(io(format!("giving {} to the VMM's user", private.display())))?;
        let _ = std::fs::remove_file(&at);
        std::fs::hard_link(private, &at).map_err(io(format!("linking {} into the jail", private.display())))
    }

    /// The VMM's log and metrics files of the VM at `paths` (kept, or made
    /// empty), linked where its command line names them in the jail.
    pub fn link_log_files(&self, paths: &VmPaths) -> Result<(), JailError> {
        for (file, inside) in [(paths.log(), inside::LOG), (paths.metrics(), inside::METRICS)] {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
                .map_err(io(format!("creating {}", file.display())))?;
            self.link(&file, inside)?;
        }
        Ok(())
    }

    /// Makes the files of a snapshot readable in the jail (hard links: the
    /// snapshot's directory and the run directory share a filesystem).
    pub fn link_read_only(&self, file: &Path, inside: &str) -> Result<(), JailError> {
        let at = self.host(inside);
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644))
            .map_err(io(format!("opening {} to VMM users", file.display())))?;
        let _ = std::fs::remove_file(&at);
        std::fs::hard_link(file, &at).map_err(io(format!("linking {} into the jail", file.display())))
    }

    /// The system calls to make between the VMM's start and its exec,
    /// prepared in advance (the child may not allocate).
    pub fn entry(&self, net: VmmNet) -> Result<Entry, JailError> {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(p.to_path_buf()));
        let mut binds = vec![(c(&self.binary)?, c(&self.host(inside::BINARY))?)];
        if let Some(kernel) = &self.kernel {
            binds.push((c(kernel)?, c(&self.host(inside::KERNEL))?));
        }
        if let Some(initrd) = &self.initrd {
            binds.push((c(initrd)?, c(&self.host(inside::INITRD))?));
        }
        for (file, at) in &self.read_only_binds {
            binds.push((c(file)?, c(&self.host(at))?));
        }
        if self.skeleton.dynamic {
            for dir in LIBRARY_DIRS {
                let host = Path::new(dir);
                if std::fs::symlink_metadata(host).is_ok_and(|m| m.is_dir()) {
                    binds.push((c(host)?, c(&self.host(dir))?));
                }
            }
        }
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        Ok(Entry {
            namespaces: match net {
                VmmNet::Own => libc::CLONE_NEWNS | libc::CLONE_NEWNET,
                VmmNet::Host | VmmNet::Join(_) => libc::CLONE_NEWNS,
            },
            join_net: match net {
                VmmNet::Join(fd) => fd,
                VmmNet::Host | VmmNet::Own => -1,
            },
            slash: c(Path::new("/"))?,
            skeleton: c(&self.skeleton.dir)?,
            skeleton_vm: c(&self.skeleton.dir.join(inside::VM.trim_start_matches('/')))?,
            binds,
            root: c(&self.root)?,
            dev: c(&self.host("/dev"))?,
            dev_net: c(&self.host("/dev/net"))?,
            kvm: c(&self.host("/dev/kvm"))?,
            tun: c(&self.host("/dev/net/tun"))?,
            tmpfs: c(Path::new("tmpfs"))?,
            tmpfs_options: CString::new("mode=755,size=64k").unwrap_or_default(),
            uid: self.uid,
            gid: self.gid,
            last_cap,
        })
    }
}

/// The root every jail of the node shows its VMM: mount points for the
/// binary, kernel, initrd, `/dev`, `/vm` and (for a dynamically linked
/// binary) the library directories, and links from the fixed names to the
/// VM's files under `/vm`. Owned by root, never written by a VMM (it is
/// bound read-only).
#[derive(Debug, Clone)]
pub struct Skeleton {
    pub dir: PathBuf,
    /// Whether the VMM binary is dynamically linked: its jails then hold
    /// the host's library directories.
    pub dynamic: bool,
}

/// The names in the skeleton that lead to the VM's own jail directory.
const VM_LINKS: &[&str] = &[
    inside::ROOTFS,
    inside::LOG,
    inside::METRICS,
    inside::SNAPSHOT_STATE,
    inside::SNAPSHOT_MEM,
    inside::DRIVES,
    "/run",
];

impl Skeleton {
    /// Makes the skeleton unless a complete one is there (a marker beside
    /// it says so, written last).
    pub fn ensure(&self) -> Result<(), JailError> {
        if self.marker().exists() { Ok(()) } else { self.make() }
    }

    /// For a dynamically linked VMM, the host's dynamic loader cache, so
    /// that the loader finds its libraries at once instead of trying every
    /// directory it knows of first. Copied by [`Skeleton::make`], at each
    /// start of the agent (the host's changes when libraries are
    /// installed); a stale or missing cache only makes the loader search.
    fn copy_loader_cache(&self) -> Result<(), JailError> {
        if !self.dynamic {
            return Ok(());
        }
        let Ok(cache) = std::fs::read(LOADER_CACHE) else { return Ok(()) };
        let at = self.dir.join(LOADER_CACHE.trim_start_matches('/'));
        if std::fs::read(&at).ok().as_deref() == Some(cache.as_slice()) {
            return Ok(());
        }
        if let Some(dir) = at.parent() {
            mkdir(dir, 0o755, None)?;
        }
        let staged = at.with_extension("new");
        std::fs::write(&staged, &cache).map_err(io(format!("writing {}", staged.display())))?;
        std::fs::rename(&staged, &at).map_err(io(format!("writing {}", at.display())))
    }

    fn marker(&self) -> PathBuf {
        let mut done = self.dir.clone().into_os_string();
        done.push(if self.dynamic { ".ready-dynamic" } else { ".ready" });
        PathBuf::from(done)
    }

    /// Makes the skeleton, or repairs it, whatever the marker says. Safe
    /// to repeat.
    pub fn make(&self) -> Result<(), JailError> {
        let done = self.marker();
        mkdir(&self.dir, 0o755, None)?;
        for d in ["dev", inside::VM.trim_start_matches('/')] {
            mkdir(&self.dir.join(d), 0o755, None)?;
        }
        for point in [inside::BINARY, inside::KERNEL, inside::INITRD] {
            let path = self.dir.join(point.trim_start_matches('/'));
            if !path.exists() {
                std::fs::write(&path, b"").map_err(io(format!("creating {}", path.display())))?;
            }
        }
        for name in VM_LINKS {
            let name = name.trim_start_matches('/');
            let target = Path::new(inside::VM.trim_start_matches('/')).join(name);
            symlink_once(&target, &self.dir.join(name))?;
        }
        if self.dynamic {
            for dir in LIBRARY_DIRS {
                let host = Path::new(dir);
                let Ok(meta) = std::fs::symlink_metadata(host) else { continue };
                let at = self.dir.join(dir.trim_start_matches('/'));
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(host).map_err(io(format!("reading {dir}")))?;
                    symlink_once(&target, &at)?;
                } else if meta.is_dir() {
                    std::fs::create_dir_all(&at).map_err(io(format!("creating {}", at.display())))?;
                }
            }
        }
        self.copy_loader_cache()?;
        std::fs::write(&done, b"").map_err(io(format!("creating {}", done.display())))
    }
}

/// Makes `at` a symbolic link to `target`, replacing anything else there.
fn symlink_once(target: &Path, at: &Path) -> Result<(), JailError> {
    if std::fs::read_link(at).ok().as_deref() == Some(target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).map_err(io(format!("linking {}", at.display())))
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), JailError> {
    let mode = std::fs::metadata(path).map_err(io(format!("reading {what} {}", path.display())))?.permissions().mode();
    if mode & 0o004 == 0 {
        return Err(JailError::Unreadable { what, path: path.to_path_buf(), mode: mode & 0o7777 });
    }
    Ok(())
}

fn mkdir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<(), JailError> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(format!("creating {}", path.display()))(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(io(format!("reading {}", path.display())))?;
    if !meta.is_dir() {
        return Err(io(format!("{} is not a directory", path.display()))(std::io::ErrorKind::AlreadyExists.into()));
    }
    let (uid, gid) = owner.unwrap_or((0, 0));
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io(format!("owning {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("mode of {}", path.display())))
}

/// The network namespace a VMM runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmNet {
    /// The agent's.
    Host,
    /// A new one of its own.
    Own,
    /// The one this descriptor (open in the agent until the launch
    /// returns) refers to.
    Join(std::os::fd::RawFd),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_exclude_root_and_empty_ranges() {
        assert_eq!(parse_uid_range("1000000-1065535").unwrap(), 1_000_000..=1_065_535);
        for bad in ["0-10", "10-5", "10", "a-b"] {
            assert!(parse_uid_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_vm_gets_the_lowest_free_user_and_keeps_it_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let vm = |n: &str| {
            let p = VmPaths { dir: dir.path().join(n) };
            std::fs::create_dir_all(&p.dir).unwrap();
            p
        };
        let (a, b, c) = (vm("a"), vm("b"), vm("c"));
        let users = Users::new(5000..=5001, dir.path());
        assert_eq!(users.user_of(&a).unwrap(), 5000);
        assert_eq!(users.user_of(&b).unwrap(), 5001);
        assert_eq!(users.user_of(&a).unwrap(), 5000, "a VM keeps its user");
        assert!(matches!(users.user_of(&c), Err(JailError::Exhausted { .. })));
        // A restarted agent knows which are taken.
        let again = Users::new(5000..=5001, dir.path());
        assert!(again.user_of(&c).is_err());
        again.release(&a);
        std::fs::remove_dir_all(&a.dir).unwrap();
        assert_eq!(again.user_of(&c).unwrap(), 5000);
    }

    #[test]
    fn the_skeleton_holds_mount_points_and_links_into_the_vm_and_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let skeleton = Skeleton { dir: dir.path().join("jail-skeleton"), dynamic: false };
        skeleton.ensure().unwrap();
        let at = |p: &str| skeleton.dir.join(p.trim_start_matches('/'));
        for point in [inside::BINARY, inside::KERNEL, inside::INITRD] {
            assert!(at(point).is_file(), "{point} is a mount point");
        }
        assert!(at("/dev").is_dir() && at(inside::VM).is_dir());
        for name in VM_LINKS {
            let target = std::fs::read_link(at(name)).unwrap();
            assert_eq!(Path::new("/").join(target), Path::new(inside::VM).join(name.trim_start_matches('/')));
        }
        assert!(!at("/usr").exists(), "a static binary needs no libraries");
        // Once complete it is not looked at again; `make` (at the agent's
        // start) repairs it.
        std::fs::remove_file(at(inside::KERNEL)).unwrap();
        skeleton.ensure().unwrap();
        assert!(!at(inside::KERNEL).exists());
        skeleton.make().unwrap();
        // A dynamically linked binary's skeleton is completed with the
        // library directories (its own marker says so).
        Skeleton { dynamic: true, ..skeleton.clone() }.ensure().unwrap();
        assert!(at(inside::KERNEL).is_file() && at("/usr/lib").is_dir());
        // With the host's loader cache, so its libraries are found at once.
        if let Ok(cache) = std::fs::read(LOADER_CACHE) {
            assert_eq!(std::fs::read(at(LOADER_CACHE)).unwrap(), cache);
        }
        assert!(!at("/etc/ld.so.new").exists(), "nothing staged is left");
    }

    #[test]
    fn a_dynamically_linked_binary_is_told_from_a_static_one() {
        // This test binary is linked as the workspace is: dynamically.
        let me = std::env::current_exe().unwrap();
        assert!(is_dynamic(&me).unwrap());
        // A minimal static ELF: header only, no program headers.
        let dir = tempfile::tempdir().unwrap();
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        std::fs::write(dir.path().join("static"), &elf).unwrap();
        assert!(!is_dynamic(&dir.path().join("static")).unwrap());
    }
}
