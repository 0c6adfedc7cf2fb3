//! `hack/guest.sh` builds a guest from Debian packages: a kernel ELF of the
//! form Firecracker loads, an initrd holding its init and the virtio and
//! ext4 modules, and a root filesystem holding an init that brings the
//! network up from `ip=`. Imported as Images, the three make a VM that runs
//! (on the simulator: booting it needs KVM, see docs/guests.md) with its
//! initrd handed to the VMM.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::Path;
use std::process::Command;

use nexus_e2e::{Cluster, host, in_private_netns};

/// The checks Firecracker's ELF loader makes of a kernel (linux-loader's
/// `Elf::load`): a 64-bit little-endian x86-64 executable whose program
/// headers are where it says, each loadable segment above 1 MiB.
fn firecracker_loads(elf: &[u8]) -> Result<(usize, u64), String> {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("no ELF magic".into());
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not ELF64 little-endian".into());
    }
    if u16_at(16) != 2 || u16_at(18) != 62 {
        return Err(format!("type {} machine {}: not an x86-64 executable", u16_at(16), u16_at(18)));
    }
    let entry = u64_at(24);
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56) as usize);
    if phentsize != 56 || phoff < 64 || phoff + phentsize * phnum > elf.len() {
        return Err("program headers out of place".into());
    }
    let mut loads = 0;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if u32_at(at) == 1 {
            let paddr = u64_at(at + 24);
            if paddr < 0x10_0000 {
                return Err(format!("a PT_LOAD segment at {paddr:#x}, below 1 MiB"));
            }
            loads += 1;
        }
    }
    if loads == 0 {
        return Err("no PT_LOAD segment".into());
    }
    Ok((loads, entry))
}

fn debugfs_cat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(image).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_guest_script_builds_a_kernel_firecracker_loads_an_initrd_and_a_rootfs_with_its_init() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("guest");
    let built = Command::new("bash").arg(repo.join("hack/guest.sh")).arg("--out").arg(&out).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&built.stdout), String::from_utf8_lossy(&built.stderr));
    assert!(built.status.success(), "hack/guest.sh: {said}");
    println!("{said}");

    let kernel = std::fs::read(out.join("vmlinux")).unwrap();
    let (loads, entry) = firecracker_loads(&kernel).unwrap_or_else(|e| panic!("vmlinux: {e}"));
    println!("vmlinux: {} bytes, {loads} PT_LOAD segments, entry {entry:#x}", kernel.len());
    assert!(firecracker_loads(b"\x7fELF\x01\x01").is_err(), "the check refuses what Firecracker refuses");

    let init = debugfs_cat(&out.join("rootfs.ext4"), "/sbin/init");
    assert!(init.starts_with("#!/bin/busybox sh") && init.contains("ip=*)"), "the rootfs's init: {init}");
    for step in [
        "X-metadata-token-ttl-seconds",
        "latest/meta-data/local-hostname",
        "public-keys/$i/openssh-key",
        "latest/user-data",
    ] {
        assert!(init.contains(step), "the rootfs's init reads {step} from the metadata service: {init}");
    }
    assert!(!debugfs_cat(&out.join("rootfs.ext4"), "/bin/busybox").is_empty(), "busybox in the rootfs");
    let listing = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc {} | cpio -t --quiet", out.join("initrd.img").display()))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for want in
        ["init", "bin/busybox", "lib/modules/virtio_mmio.ko", "lib/modules/virtio_blk.ko", "lib/modules/ext4.ko"]
    {
        assert!(listing.lines().any(|l| l == want), "{want} in the initrd:\n{listing}");
    }

    // Imported as Images, they make a VM; its VMM is given the initrd.
    let cdir = dir.path().join("cluster");
    in_private_netns(move || async move {
        let images = cdir.join("node-images");
        let root = images.display().to_string();
        let cluster =
            Cluster::start_with(&cdir, "n1", &["--image-root", "/var/lib/nexus/images", "--image-root", &root]).await;
        let ctl = |args: &[&str]| {
            let (ok, stdout, stderr) = cluster.nexusctl(args);
            assert!(ok, "nexusctl {args:?}: {stdout}{stderr}\n{}", cluster.logs());
            stdout
        };
        for (name, type_, file) in [
            ("debian-kernel", "Kernel", "vmlinux"),
            ("debian-initrd", "Initrd", "initrd.img"),
            ("debian", "Rootfs", "rootfs.ext4"),
        ] {
            let from = out.join(file).display().to_string();
            let at = images.join(file).display().to_string();
            ctl(&["image", "import", name, "--type", type_, "--from", &from, "--node-path", &at]);
        }
        let vm = cdir.join("vm.yaml");
        std::fs::write(
            &vm,
            "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: debian\nspec:\n  vcpu: 1\n  memMib: 256\n  kernel: debian-kernel\n  initrd: debian-initrd\n  rootfs: debian\n  network:\n    ip: auto\n  state: Running\n",
        )
        .unwrap();
        ctl(&["apply", "-f", &vm.display().to_string()]);
        ctl(&["wait", "vm", "debian", "--for=jsonpath={.status.phase}=Running", "--timeout", "60"]);
        let uid = ctl(&["get", "vm", "debian", "-o", "jsonpath={.metadata.uid}"]);
        let socket = cluster.run_dir.join("vms").join(uid.trim()).join("root/run/fc.sock");
        let (status, config) = host::fc_request(&socket, "GET", "/vm/config", None).await.unwrap();
        assert_eq!(status, 200, "{config}");
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        assert_eq!(config["boot-source"]["initrd_path"], "/initrd", "{config}");
        let args = config["boot-source"]["boot_args"].as_str().unwrap();
        assert!(args.contains("ip=172.30.0."), "nexus writes the address the guest's init reads: {args}");
        ctl(&["delete", "vm", "debian", "--wait"]);
    });
}
