//! `nexus-nodeagent check`: whether this host can run VMs, item by item,
//! with what to do about each problem. `hack/install.sh` prints the same.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How an item came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    /// Works, with less than the best (a slower path, a missing extra).
    Warn,
    /// VMs cannot run until it is fixed.
    Fail,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        })
    }
}

/// One checked item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub item: &'static str,
    pub verdict: Verdict,
    /// What was found, and for a problem, what to do.
    pub detail: String,
}

/// What to check.
#[derive(Debug, Clone)]
pub struct Target {
    /// The VMM binary as configured (a path, or a name looked up on PATH).
    pub firecracker: PathBuf,
    pub run_dir: PathBuf,
    pub vmm_uids: std::ops::RangeInclusive<u32>,
}

fn finding(item: &'static str, verdict: Verdict, detail: impl Into<String>) -> Finding {
    Finding { item, verdict, detail: detail.into() }
}

/// Checks the host.
pub fn check(target: &Target) -> Vec<Finding> {
    vec![
        kvm(Path::new("/dev/kvm")),
        tun(),
        firecracker(&target.firecracker),
        nat(),
        reflink(&target.run_dir),
        cgroups(),
        uid_range(&target.vmm_uids),
        root(),
    ]
}

/// The report as text, one line per item, worst verdict last line.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!("{:<5} {:<12} {}\n", f.verdict.to_string(), f.item, f.detail));
    }
    let fails = findings.iter().filter(|f| f.verdict == Verdict::Fail).count();
    let warns = findings.iter().filter(|f| f.verdict == Verdict::Warn).count();
    out.push_str(&match fails {
        0 => format!("this host can run VMs ({warns} warnings)\n"),
        n => format!("this host cannot run VMs yet: {n} problems to fix ({warns} warnings)\n"),
    });
    out
}

/// KVM: present, a character device, and openable read-write by us.
pub fn kvm(dev: &Path) -> Finding {
    let meta = match std::fs::metadata(dev) {
        Ok(m) => m,
        Err(_) => {
            return finding(
                "kvm",
                Verdict::Fail,
                format!(
                    "{} is missing: enable virtualisation in the firmware and load kvm_intel or kvm_amd (modprobe kvm_intel); in a VM, enable nested virtualisation",
                    dev.display()
                ),
            );
        }
    };
    if !meta.file_type().is_char_device() {
        return finding("kvm", Verdict::Fail, format!("{} is not a character device", dev.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => finding(
            "kvm",
            Verdict::Ok,
            format!(
                "{} opens read-write (mode {mode:o}, group {}); each VMM gets its own node in its jail",
                dev.display(),
                meta.gid()
            ),
        ),
        Err(e) => finding(
            "kvm",
            Verdict::Fail,
            format!("{} cannot be opened read-write ({e}): run the agent as root", dev.display()),
        ),
    }
}

fn tun() -> Finding {
    match std::fs::metadata("/dev/net/tun") {
        Ok(m) if m.file_type().is_char_device() => finding("tun", Verdict::Ok, "/dev/net/tun is there for TAP devices"),
        _ => finding("tun", Verdict::Fail, "/dev/net/tun is missing: load the tun module (modprobe tun)"),
    }
}

/// The VMM binary: found, executable, and what `--version` says.
pub fn firecracker(binary: &Path) -> Finding {
    let found = if binary.components().count() > 1 {
        binary.is_file().then(|| binary.to_path_buf())
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path).map(|d| d.join(binary)).find(|c| c.is_file())
    };
    let Some(path) = found else {
        return finding(
            "firecracker",
            Verdict::Fail,
            format!(
                "{} not found: install a Firecracker release binary (github.com/firecracker-microvm/firecracker/releases) into /usr/local/bin, or pass --firecracker PATH",
                binary.display()
            ),
        );
    };
    let version = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_default();
    let linking = match crate::host::jail::is_dynamic(&path) {
        Ok(false) => "statically linked: its jail holds no libraries",
        _ => "dynamically linked: its jail holds the host's libraries, read-only",
    };
    if version.is_empty() {
        return finding("firecracker", Verdict::Fail, format!("{} does not answer --version", path.display()));
    }
    finding("firecracker", Verdict::Ok, format!("{} ({version}), {linking}", path.display()))
}

fn nat() -> Finding {
    match crate::host::nat::detect() {
        crate::host::nat::Firewall::Nftables => {
            finding("nat", Verdict::Ok, "nftables: the agent adds its own table for the VMs' NAT")
        }
        crate::host::nat::Firewall::Iptables => {
            finding("nat", Verdict::Ok, "iptables: the agent adds a MASQUERADE rule for the VMs")
        }
        crate::host::nat::Firewall::None => {
            finding("nat", Verdict::Warn, "neither nft nor iptables found: VMs get no way out (apt install nftables)")
        }
    }
}

fn reflink(run_dir: &Path) -> Finding {
    // The run directory may not exist yet: ask its nearest existing parent.
    let probe = run_dir.ancestors().find(|p| p.is_dir()).unwrap_or(Path::new("/"));
    if crate::host::disk::supports_reflink(probe) {
        finding("reflink", Verdict::Ok, format!("{} clones disks by reflink: constant time", probe.display()))
    } else {
        finding(
            "reflink",
            Verdict::Warn,
            format!(
                "{} has no reflinks: each VM's disk is a full (sparse) copy; put the run directory on XFS or btrfs for constant-time disks",
                probe.display()
            ),
        )
    }
}

fn cgroups() -> Finding {
    if crate::host::scope::systemd_is_init() {
        return finding("cgroups", Verdict::Ok, "systemd: each VMM gets a transient scope with its limits");
    }
    match crate::host::cgroup::Cgroups::detect() {
        Some(_) => finding("cgroups", Verdict::Ok, "cgroup v2 with memory and cpu: each VMM gets its own group"),
        None => finding(
            "cgroups",
            Verdict::Warn,
            "no cgroup v2 hierarchy with the memory and cpu controllers: VMMs run without CPU or memory limits",
        ),
    }
}

fn uid_range(range: &std::ops::RangeInclusive<u32>) -> Finding {
    let taken: Vec<String> = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let uid: u32 = f.get(2)?.parse().ok()?;
            range.contains(&uid).then(|| format!("{} ({uid})", f[0]))
        })
        .collect();
    if taken.is_empty() {
        finding("vmm-uids", Verdict::Ok, format!("{}-{} holds no account: one per VMM", range.start(), range.end()))
    } else {
        finding(
            "vmm-uids",
            Verdict::Fail,
            format!("accounts in the VMM uid range: {}; choose another --vmm-uids", taken.join(", ")),
        )
    }
}

fn root() -> Finding {
    if nix::unistd::geteuid().is_root() {
        finding("privileges", Verdict::Ok, "running as root: the agent makes bridges, TAPs and jails")
    } else {
        finding("privileges", Verdict::Fail, "the agent must run as root (bridges, TAPs, jails)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_reported_and_a_problem_says_what_to_do() {
        let findings = check(&Target {
            firecracker: PathBuf::from("no-such-vmm-binary"),
            run_dir: PathBuf::from("/nonexistent/run"),
            vmm_uids: 1_000_000..=1_065_535,
        });
        let items: Vec<&str> = findings.iter().map(|f| f.item).collect();
        assert_eq!(items, ["kvm", "tun", "firecracker", "nat", "reflink", "cgroups", "vmm-uids", "privileges"]);
        let fc = &findings[2];
        assert_eq!(fc.verdict, Verdict::Fail);
        assert!(fc.detail.contains("--firecracker"), "{}", fc.detail);
        let text = render(&findings);
        assert!(text.contains("cannot run VMs yet"), "{text}");
        assert!(kvm(Path::new("/nonexistent/kvm")).detail.contains("modprobe"));
        let root_range = uid_range(&(0..=0));
        assert_eq!(root_range.verdict, Verdict::Fail, "root's account is in 0-0");
    }

    #[test]
    fn a_binary_that_answers_version_is_found_on_path() {
        // A binary that says nothing on --version is refused; `ls` answers.
        let dir = tempfile::tempdir().unwrap();
        let mute = dir.path().join("mute");
        std::fs::write(&mute, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&mute, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(firecracker(&mute).verdict, Verdict::Fail);
        let ls = firecracker(Path::new("ls"));
        assert_eq!(ls.verdict, Verdict::Ok, "{}", ls.detail);
    }
}
