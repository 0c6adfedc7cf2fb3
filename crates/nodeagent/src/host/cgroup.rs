//! cgroup v2 limits for VMMs run as plain children (systemd does this for
//! scoped ones): where a cgroup2 hierarchy with the `memory` and `cpu`
//! controllers is mounted, each VMM goes into `<root>/nexus/fc-<uid>` with
//! its memory and CPU capped at what the VM was given, plus overhead.

use std::path::{Path, PathBuf};

use crate::paths::Uid;

/// Memory a VMM needs beyond its guest's, in MiB.
pub const VMM_OVERHEAD_MIB: u64 = 64;
const PARENT: &str = "nexus";

/// A cgroup2 hierarchy the agent may create groups in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    root: PathBuf,
}

impl Cgroups {
    /// The first cgroup2 mount offering `memory` and `cpu`, if any.
    pub fn detect() -> Option<Cgroups> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
            })
            .find(|root| Cgroups::usable(root))
            .map(|root| Cgroups { root })
    }

    /// Uses `root` as the hierarchy (tests point it at a directory of their own).
    pub fn at(root: &Path) -> Cgroups {
        Cgroups { root: root.to_path_buf() }
    }

    fn usable(root: &Path) -> bool {
        std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory") && c.split_whitespace().any(|x| x == "cpu"))
    }

    /// The group of VM `uid`.
    pub fn group(&self, uid: &Uid) -> PathBuf {
        self.root.join(PARENT).join(format!("fc-{uid}"))
    }

    /// Creates the VM's group with its limits and moves `pid` into it.
    pub fn confine(&self, uid: &Uid, pid: u32, vcpu: u8, mem_mib: u32) -> std::io::Result<()> {
        let parent = self.root.join(PARENT);
        std::fs::create_dir_all(&parent)?;
        // Controllers must be enabled top-down for the leaf to have them.
        for dir in [&self.root, &parent] {
            std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu")?;
        }
        let group = self.group(uid);
        std::fs::create_dir_all(&group)?;
        let bytes = (u64::from(mem_mib) + VMM_OVERHEAD_MIB) << 20;
        std::fs::write(group.join("memory.max"), bytes.to_string())?;
        std::fs::write(group.join("cpu.max"), format!("{} 100000", u64::from(vcpu) * 100_000))?;
        std::fs::write(group.join("cgroup.procs"), pid.to_string())
    }

    /// Removes the VM's group once its processes are gone; absent is fine.
    pub fn remove(&self, uid: &Uid) -> std::io::Result<()> {
        match std::fs::remove_dir(self.group(uid)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confine_writes_the_limits_and_the_pid_where_the_kernel_reads_them() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        assert!(Cgroups::usable(root.path()));
        let cg = Cgroups::at(root.path());
        let uid = Uid::parse("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11").unwrap();
        cg.confine(&uid, 4242, 2, 256).unwrap();
        let g = cg.group(&uid);
        assert_eq!(std::fs::read_to_string(g.join("memory.max")).unwrap(), ((256u64 + 64) << 20).to_string());
        assert_eq!(std::fs::read_to_string(g.join("cpu.max")).unwrap(), "200000 100000");
        assert_eq!(std::fs::read_to_string(g.join("cgroup.procs")).unwrap(), "4242");
        assert_eq!(std::fs::read_to_string(root.path().join("nexus/cgroup.subtree_control")).unwrap(), "+memory +cpu");
    }

    #[test]
    fn hierarchies_without_the_controllers_are_not_used() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        assert!(!Cgroups::usable(root.path()));
    }
}
