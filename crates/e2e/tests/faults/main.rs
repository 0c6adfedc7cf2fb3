//! Faults a real host has, on real processes: full disks on a node and on
//! the apiserver (`disks`), a VMM stopped with SIGSTOP (`vmm`), a node cut
//! off from the control plane (`partition`) and a host that reboots
//! (`reboot`). Each test prints when the fault began and ended, what the
//! status said meanwhile, how long it took to converge, and what was left
//! behind. This file holds what they share.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

mod disks;
mod partition;
mod reboot;
mod slow;
mod vmm;

use std::path::Path;

use nexus_api::Vm;
use nexus_api::conditions;
use nexus_api::meta::find_condition;

/// Mounts a tmpfs of `mib` MiB at `at` (in the test's own mount namespace).
pub fn small_tmpfs(at: &Path, mib: u64) {
    std::fs::create_dir_all(at).unwrap();
    let options = format!("size={mib}m,mode=0755");
    nix::mount::mount(Some("tmpfs"), at, Some("tmpfs"), nix::mount::MsFlags::empty(), Some(options.as_str()))
        .expect("a small tmpfs");
}

/// A file of `mib` MiB of data (no holes: a copy takes its full size).
pub fn dense_file(path: &Path, mib: usize) {
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let mut data = Vec::with_capacity(mib << 20);
    for _ in 0..mib {
        data.extend_from_slice(&block);
    }
    std::fs::write(path, data).unwrap();
}

pub fn vm_yaml(name: &str, rootfs: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  vcpu: 1\n  memMib: 64\n  kernel: \
         /var/lib/nexus/images/vmlinux\n  rootfs: {rootfs}\n"
    )
}

pub fn ready(vm: &Vm) -> Option<(String, String, String)> {
    let s = vm.status_or_default();
    find_condition(&s.conditions, conditions::READY)
        .map(|c| (format!("{:?}", c.status), c.reason.clone(), c.message.clone()))
}

/// Files under `dir` whose names end in `suffix`.
pub fn leftovers(dir: &Path, suffix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p.display().to_string());
            }
        }
    }
    out
}
