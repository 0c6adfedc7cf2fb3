//! `hack/install.sh` into a temporary root: the binaries, directories and
//! systemd units it writes, the units checked by `systemd-analyze verify`,
//! and the host check the installed agent prints.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nexus_e2e::bin;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

#[test]
fn install_into_a_destdir_writes_units_systemd_accepts() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let bins = bin("nexus-nodeagent").parent().unwrap().to_path_buf();
    let out = std::process::Command::new("bash")
        .arg(repo.join("hack/install.sh"))
        .args(["--destdir", &d.display().to_string(), "--bin-dir", &bins.display().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for b in ["nexus-apiserver", "nexus-controller", "nexus-nodeagent", "nexusctl"] {
        assert_eq!(mode(&d.join("usr/local/bin").join(b)), 0o755, "{b}");
    }
    assert_eq!(mode(&d.join("var/lib/nexus/agent")), 0o700);
    assert_eq!(mode(&d.join("var/lib/nexus/run")), 0o700);
    let units = d.join("etc/systemd/system");
    let unit = |name: &str| std::fs::read_to_string(units.join(name)).unwrap();
    let (apiserver, controller, agent) =
        (unit("nexus-apiserver.service"), unit("nexus-controller.service"), unit("nexus-nodeagent.service"));
    for (name, text) in [("apiserver", &apiserver), ("controller", &controller), ("agent", &agent)] {
        for want in
            ["NoNewPrivileges=yes", "ProtectSystem=", "ProtectHome=yes", "Restart=", "WantedBy=multi-user.target"]
        {
            assert!(text.contains(want), "{name} unit lacks {want}:\n{text}");
        }
    }
    for text in [&apiserver, &controller] {
        for want in
            ["DynamicUser=yes", "CapabilityBoundingSet=\n", "ProtectSystem=strict", "MemoryDenyWriteExecute=yes"]
        {
            assert!(text.contains(want), "an unprivileged service lacks {want}:\n{text}");
        }
    }
    assert!(agent.contains("KillMode=process"), "VMMs outlive an agent restart:\n{agent}");
    assert!(controller.contains("LoadCredential=token:"), "the controller's token reaches it as a credential");

    // systemd resolves the units' dependencies against its standard units:
    // the temporary root gets a copy of this host's.
    std::fs::create_dir_all(d.join("usr/lib/systemd")).unwrap();
    let copied = std::process::Command::new("cp")
        .args(["-r", "/usr/lib/systemd/system", &d.join("usr/lib/systemd/").display().to_string()])
        .status()
        .unwrap();
    assert!(copied.success());
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", d.display()))
        .args(["nexus-apiserver.service", "nexus-controller.service", "nexus-nodeagent.service"].map(|u| units.join(u)))
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    println!("systemd-analyze verify: exit {:?}, {} bytes of output", verify.status.code(), said.len());
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify objects:\n{said}");

    // The installed agent checks the host, item by item.
    let check = std::process::Command::new(d.join("usr/local/bin/nexus-nodeagent"))
        .args(["check", "--firecracker", &bin("firecracker-sim").display().to_string()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    println!("{report}");
    for item in ["kvm", "tun", "firecracker", "nat", "reflink", "cgroups", "vmm-uids", "privileges"] {
        assert!(report.lines().any(|l| l.split_whitespace().nth(1) == Some(item)), "{item} in the report:\n{report}");
    }
    let fails = report.lines().filter(|l| l.starts_with("FAIL")).count();
    assert_eq!(check.status.code(), Some(if fails > 0 { 1 } else { 0 }), "exit status follows the report:\n{report}");
}
