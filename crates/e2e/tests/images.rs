//! Guest images imported with `nexusctl image import` from a tarball and
//! from an OCI image layout made here, uploaded to the apiserver, and
//! downloaded, checked and used by a node; a copy corrupted on the node is
//! found and downloaded again; an Image with a URL source is downloaded
//! from there.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nexus_e2e::{Cluster, in_private_netns, run_ok, wait_until};

fn sha256(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_string()
}

/// What `debugfs` finds at `path` inside the ext4 image `image`.
fn ext4_cat(image: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(image).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    (!err.contains("File not found")).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A tar of the directory `dir`, gzip-compressed when `gzip`.
fn tar_dir(dir: &Path, out: &Path, gzip: bool) {
    let mut c = Command::new("tar");
    c.arg(if gzip { "-czf" } else { "-cf" }).arg(out).args(["--owner=0", "--group=0", "-C"]).arg(dir).arg(".");
    run_ok(&mut c);
}

/// Writes `files` (path, content) under `dir`.
fn tree(dir: &Path, files: &[(&str, &str)]) {
    for (p, content) in files {
        let at = dir.join(p);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, content).unwrap();
    }
}

/// An OCI image layout at `layout` with two layers: the second removes a
/// file of the first (a whiteout) and hides a directory's content (opaque).
fn oci_layout(work: &Path, layout: &Path) {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |file: &Path| -> (String, u64) {
        let sum = sha256(file);
        let size = std::fs::metadata(file).unwrap().len();
        std::fs::copy(file, blobs.join(&sum)).unwrap();
        (format!("sha256:{sum}"), size)
    };
    let (l1_dir, l2_dir) = (work.join("l1"), work.join("l2"));
    tree(
        &l1_dir,
        &[
            ("etc/os-release", "ID=layered\n"),
            ("etc/removed", "gone\n"),
            ("opt/old/a", "a\n"),
            ("sbin/init", "#!/bin/sh\n"),
        ],
    );
    tree(&l2_dir, &[("etc/.wh.removed", ""), ("opt/old/.wh..wh..opq", ""), ("opt/old/b", "b\n")]);
    let (l1, l2) = (work.join("l1.tar"), work.join("l2.tar.gz"));
    tar_dir(&l1_dir, &l1, false);
    tar_dir(&l2_dir, &l2, true);
    let (d1, s1) = put(&l1);
    let (d2, s2) = put(&l2);
    let config = work.join("config.json");
    std::fs::write(&config, r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#)
        .unwrap();
    let (dc, sc) = put(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": sc},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d1, "size": s1},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d2, "size": s2},
        ],
    });
    let mf = work.join("manifest.json");
    std::fs::write(&mf, manifest.to_string()).unwrap();
    let (dm, sm) = put(&mf);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": dm, "size": sm,
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Serves `file` over plain HTTP on a free port of 127.0.0.1, to any GET,
/// from a thread of its own (the test's runtime blocks on nexusctl);
/// returns its URL.
fn serve_file(file: std::path::PathBuf) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let body = std::fs::read(&file).unwrap();
            let mut head = vec![0u8; 4096];
            let _ = conn.read(&mut head);
            let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(reply.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    format!("http://127.0.0.1:{port}/images/served.ext4")
}

#[test]
fn a_tarball_and_an_oci_layout_become_images_nodes_download_check_and_refetch() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let node_images = dir.path().join("node-images");
        let root = node_images.display().to_string();
        let cluster =
            Cluster::start_with(dir.path(), "n1", &["--image-root", "/var/lib/nexus/images", "--image-root", &root])
                .await;
        let ctl = |args: &[&str]| {
            let (ok, out, err) = cluster.nexusctl(args);
            assert!(ok, "nexusctl {args:?}: {out}{err}\n{}", cluster.logs());
            out
        };

        // A tarball.
        let work = dir.path().join("work");
        tree(&work.join("tar-root"), &[("etc/hostname", "from-a-tarball\n"), ("sbin/init", "#!/bin/sh\n")]);
        let tarball = work.join("root.tar.gz");
        tar_dir(&work.join("tar-root"), &tarball, true);
        let tar_copy = node_images.join("from-tar.ext4");
        let out = ctl(&[
            "image",
            "import",
            "from-tar",
            "--from",
            &tarball.display().to_string(),
            "--node-path",
            &tar_copy.display().to_string(),
        ]);
        println!("{out}");
        assert!(out.contains("imported from a tarball"), "{out}");

        // An OCI layout.
        let layout = work.join("layout");
        oci_layout(&work, &layout);
        let oci_copy = node_images.join("from-oci.ext4");
        let out = ctl(&[
            "image",
            "import",
            "from-oci",
            "--from",
            &layout.display().to_string(),
            "--node-path",
            &oci_copy.display().to_string(),
        ]);
        println!("{out}");
        assert!(out.contains("an OCI image layout (2 layers)"), "{out}");

        // A kernel, as it is.
        let kernel_copy = node_images.join("vmlinux");
        ctl(&[
            "image",
            "import",
            "kernel",
            "--type",
            "Kernel",
            "--from",
            "/var/lib/nexus/images/vmlinux",
            "--node-path",
            &kernel_copy.display().to_string(),
        ]);

        let image: serde_json::Value = serde_json::from_str(&ctl(&["get", "image", "from-oci", "-o", "json"])).unwrap();
        let sum = image["spec"]["sha256"].as_str().unwrap().to_string();
        assert_eq!(sum.len(), 64);
        assert_eq!(image["spec"]["source"]["uploaded"], true);
        assert!(image["spec"]["sizeBytes"].as_u64().unwrap() >= 8 << 20, "its size is recorded: {image}");
        assert!(!oci_copy.exists() && !tar_copy.exists(), "nothing is on the node before a VM needs it");

        // VMs from them: the node downloads and checks each image.
        let vm = |name: &str, rootfs: &str| {
            format!(
                "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  vcpu: 1\n  memMib: 128\n  kernel: kernel\n  rootfs: {rootfs}\n  state: Running\n"
            )
        };
        let manifests = work.join("vms.yaml");
        std::fs::write(&manifests, format!("{}---\n{}", vm("oci-vm", "from-oci"), vm("tar-vm", "from-tar"))).unwrap();
        ctl(&["apply", "-f", &manifests.display().to_string()]);
        for name in ["oci-vm", "tar-vm"] {
            ctl(&["wait", "vm", name, "--for=jsonpath={.status.phase}=Running", "--timeout", "30"]);
        }
        assert_eq!(sha256(&oci_copy), sum, "the node's copy is the uploaded file");
        assert_eq!(ext4_cat(&tar_copy, "/etc/hostname").as_deref(), Some("from-a-tarball\n"));
        assert_eq!(ext4_cat(&oci_copy, "/etc/os-release").as_deref(), Some("ID=layered\n"));
        assert_eq!(ext4_cat(&oci_copy, "/opt/old/b").as_deref(), Some("b\n"));
        assert_eq!(ext4_cat(&oci_copy, "/etc/removed"), None, "a whiteout removes a file of the layer below");
        assert_eq!(ext4_cat(&oci_copy, "/opt/old/a"), None, "an opaque directory hides the layer below");
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
        assert_eq!(
            log.matches("image downloaded and verified").count(),
            3,
            "kernel and two root filesystems, once each"
        );

        // A corrupted copy on the node is found and downloaded again.
        let mut bytes = std::fs::read(&oci_copy).unwrap();
        bytes[4096] ^= 0xff;
        std::fs::write(&oci_copy, &bytes).unwrap();
        std::fs::write(&manifests, vm("oci-vm-2", "from-oci")).unwrap();
        ctl(&["apply", "-f", &manifests.display().to_string()]);
        ctl(&["wait", "vm", "oci-vm-2", "--for=jsonpath={.status.phase}=Running", "--timeout", "30"]);
        assert_eq!(sha256(&oci_copy), sum, "downloaded again");
        wait_until(Duration::from_secs(5), "the refetch in the agent's log", || async {
            let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
            log.contains("copy of the image is corrupt") && log.matches("image downloaded and verified").count() == 4
        })
        .await;

        // An Image with a URL source: the node downloads it from there.
        let served = work.join("served.ext4");
        std::fs::copy(&tar_copy, &served).unwrap();
        let url = serve_file(served.clone());
        let url_copy = node_images.join("from-url.ext4");
        let image = format!(
            "apiVersion: nexus/v1\nkind: Image\nmetadata:\n  name: from-url\nspec:\n  type: Rootfs\n  path: {}\n  sha256: {}\n  source:\n    url: {url}\n",
            url_copy.display(),
            sha256(&served)
        );
        std::fs::write(&manifests, format!("{image}---\n{}", vm("url-vm", "from-url"))).unwrap();
        ctl(&["apply", "-f", &manifests.display().to_string()]);
        ctl(&["wait", "vm", "url-vm", "--for=jsonpath={.status.phase}=Running", "--timeout", "30"]);
        assert_eq!(sha256(&url_copy), sha256(&served), "downloaded from the URL");
        for name in ["oci-vm", "tar-vm", "oci-vm-2", "url-vm"] {
            ctl(&["delete", "vm", name, "--wait"]);
        }
    });
}
