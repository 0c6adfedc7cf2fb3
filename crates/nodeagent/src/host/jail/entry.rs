//! The steps into a jail, prepared by [`super::Jail::entry`] and made by
//! the VMM's process between its start and its exec.
//!
//! They run in a child that shares the agent's memory until it execs (see
//! [`crate::host::spawn`]), so they allocate nothing and change nothing
//! but the child: every step is one system call on strings prepared
//! before. Credentials are changed with the raw system calls, which change
//! the calling process alone, rather than libc's wrappers, which also work
//! on every thread libc knows of (in this child, the agent's).

use std::ffi::CString;

/// The steps into a jail.
#[derive(Debug)]
pub struct Entry {
    pub(super) namespaces: libc::c_int,
    /// A network namespace to join first (-1: none).
    pub(super) join_net: libc::c_int,
    pub(super) slash: CString,
    pub(super) skeleton: CString,
    pub(super) skeleton_vm: CString,
    pub(super) binds: Vec<(CString, CString)>,
    pub(super) root: CString,
    pub(super) dev: CString,
    pub(super) dev_net: CString,
    pub(super) kvm: CString,
    pub(super) tun: CString,
    pub(super) tmpfs: CString,
    pub(super) tmpfs_options: CString,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) last_cap: u32,
}

fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

impl Entry {
    /// Enters the jail: new namespaces, the skeleton over the jail
    /// directory (which it holds at `/vm`), the bind mounts, a private
    /// `/dev`, chroot, then the VM's user without capabilities.
    ///
    /// # Safety
    /// Only to be called in a new child before exec (a forked one, or one
    /// sharing the agent's memory): it makes system calls on the prepared
    /// strings and nothing else.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is to a NUL-terminated string owned by
        // `self` or null where the call allows it.
        unsafe {
            if self.join_net >= 0 {
                check(libc::setns(self.join_net, libc::CLONE_NEWNET))?;
            }
            check(libc::unshare(self.namespaces))?;
            // Keep the jail's mounts from propagating back to the host.
            check(libc::mount(null, self.slash.as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            // The jail directory at the skeleton's `/vm`, then the skeleton
            // (with that mount) over the jail directory, read-only.
            check(libc::mount(self.root.as_ptr(), self.skeleton_vm.as_ptr(), null, libc::MS_BIND, std::ptr::null()))?;
            check(libc::mount(
                self.skeleton.as_ptr(),
                self.root.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            check(libc::mount(null, self.root.as_ptr(), null, ro, std::ptr::null()))?;
            for (src, dst) in &self.binds {
                check(libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND | libc::MS_REC, std::ptr::null()))?;
                let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
                check(libc::mount(null, dst.as_ptr(), null, ro, std::ptr::null()))?;
            }
            check(libc::mount(
                self.tmpfs.as_ptr(),
                self.dev.as_ptr(),
                self.tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                self.tmpfs_options.as_ptr().cast(),
            ))?;
            check(libc::mkdir(self.dev_net.as_ptr(), 0o755))?;
            for (node, minor) in [(&self.kvm, 232), (&self.tun, 200)] {
                check(libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, minor)))?;
                check(libc::chown(node.as_ptr(), self.uid, self.gid))?;
            }
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(self.slash.as_ptr()))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            for cap in 0..=self.last_cap {
                check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0))?;
            }
            check(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as libc::c_int)?;
            check(libc::syscall(libc::SYS_setresgid, self.gid, self.gid, self.gid) as libc::c_int)?;
            // Leaving uid 0 without SECBIT_KEEP_CAPS clears the permitted,
            // effective and ambient sets.
            check(libc::syscall(libc::SYS_setresuid, self.uid, self.uid, self.uid) as libc::c_int)?;
        }
        Ok(())
    }
}
