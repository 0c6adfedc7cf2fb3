//! `nexusctl image import NAME --from PATH`: turns a root filesystem
//! directory, a tarball (plain or gzip) or an OCI image layout (as `skopeo
//! copy ... oci:DIR` or `docker save` of an OCI exporter write it) into an
//! ext4 image with `mkfs.ext4 -d` (no loop mount, no root needed to build
//! it), records its size and sha256 in an Image, and uploads the file to the
//! apiserver. Nodes download it on first use and check it against the
//! sha256 (`source: {uploaded: true}`). A kernel (`--type Kernel`) or an
//! ext4 file is uploaded as it is.
//!
//! Owners: files keep the uids and gids of the tarball or layers when
//! nexusctl runs as root; otherwise they belong to the user who imports.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use nexus_api::image::{ImageSource, ImageSpec, ImageType};
use sha2::Digest;

use crate::context::{Context, Failure};
use crate::progress::Progress;

/// What to import and how.
#[derive(Debug)]
pub struct ImportOptions<'a> {
    pub from: &'a Path,
    pub type_: ImageType,
    /// Size of the ext4 image in MiB (default: the content and a margin).
    pub size_mib: Option<u64>,
    /// Where nodes keep the file (default: under /var/lib/nexus/images).
    pub node_path: Option<&'a str>,
}

/// Failures building an image.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Io(String),
    #[error("{path} is not a tarball, an OCI image layout, an ext4 image or a directory")]
    UnknownSource { path: String },
    #[error("OCI layout {path}: {why}")]
    Oci { path: String, why: String },
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ImportError {
    let what = what.to_string();
    move |e| {
        // tar's errors carry their cause as the source.
        let cause = std::error::Error::source(&e).map(|c| format!(" ({c})")).unwrap_or_default();
        ImportError::Io(format!("{what}: {e}{cause}"))
    }
}

/// The source, as found on disk.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    /// A file uploaded as it is (a kernel, an ext4 image).
    File,
    Directory,
    Tarball,
    OciLayout,
}

fn sniff(path: &Path, type_: ImageType) -> Result<Source, ImportError> {
    let meta = std::fs::metadata(path).map_err(io(path.display()))?;
    if meta.is_dir() {
        return Ok(if path.join("oci-layout").is_file() { Source::OciLayout } else { Source::Directory });
    }
    if type_ != ImageType::Rootfs {
        return Ok(Source::File);
    }
    let mut head = vec![0u8; 1082];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).map_err(io(path.display()))?;
    head.truncate(n);
    // The ext4 superblock's magic, 0xEF53, at byte 1080.
    if head.len() >= 1082 && head[1080..1082] == [0x53, 0xef] {
        return Ok(Source::File);
    }
    let gzip = head.starts_with(&[0x1f, 0x8b]);
    let ustar = head.len() > 262 && &head[257..262] == b"ustar";
    if gzip || ustar {
        return Ok(Source::Tarball);
    }
    Err(ImportError::UnknownSource { path: path.display().to_string() })
}

/// A reader of a possibly gzip-compressed file.
fn open_maybe_gzip(path: &Path) -> Result<Box<dyn Read>, ImportError> {
    let mut f = std::fs::File::open(path).map_err(io(path.display()))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(io(path.display()))?;
    let f = std::fs::File::open(path).map_err(io(path.display()))?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] { Box::new(flate2::read::GzDecoder::new(f)) } else { Box::new(f) })
}

fn archive<R: Read>(r: R) -> tar::Archive<R> {
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(nix_is_root());
    a.set_unpack_xattrs(false);
    a.set_overwrite(true);
    a
}

/// Whether nexusctl runs as root (`/proc/self` belongs to the effective user).
fn nix_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Unpacks the tarball at `path` into `root`.
fn unpack_tarball(path: &Path, root: &Path) -> Result<(), ImportError> {
    archive(open_maybe_gzip(path)?).unpack(root).map_err(io(format!("unpacking {}", path.display())))
}

/// `rel` under `root`, if every component is a plain name and none of the
/// existing ones is a symbolic link (a layer's link must not lead a
/// whiteout out of the root filesystem).
fn inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(name) => {
                if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                    return None;
                }
                at.push(name);
            }
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(at)
}

fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Applies one OCI layer: its whiteouts first (a `.wh.NAME` removes NAME
/// of the layers below, `.wh..wh..opq` empties its directory), then its
/// files.
fn apply_layer(blob: &Path, root: &Path) -> Result<(), ImportError> {
    let mut whiteouts = archive(open_maybe_gzip(blob)?);
    for entry in whiteouts.entries().map_err(io(blob.display()))? {
        let entry = entry.map_err(io(blob.display()))?;
        let path = entry.path().map_err(io(blob.display()))?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let dir = path.parent().unwrap_or(Path::new(""));
        if name == ".wh..wh..opq" {
            if let Some(d) = inside(root, dir) {
                for child in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    remove_any(&child.path());
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.")
            && let Some(target) = inside(root, &dir.join(hidden))
        {
            remove_any(&target);
        }
    }
    let mut files = archive(open_maybe_gzip(blob)?);
    for entry in files.entries().map_err(io(blob.display()))? {
        let mut entry = entry.map_err(io(blob.display()))?;
        let path = entry.path().map_err(io(blob.display()))?.into_owned();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".wh.")) {
            continue;
        }
        entry.unpack_in(root).map_err(io(format!("unpacking {} from {}", path.display(), blob.display())))?;
    }
    Ok(())
}

/// The blob of `digest` (`sha256:<hex>`) in the layout at `layout`.
fn blob(layout: &Path, digest: &str) -> Result<PathBuf, ImportError> {
    let oci = |why: String| ImportError::Oci { path: layout.display().to_string(), why };
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| oci(format!("digest {digest:?} is not sha256")))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(oci(format!("digest {digest:?} is malformed")));
    }
    Ok(layout.join("blobs/sha256").join(hex))
}

fn read_json(layout: &Path, path: &Path) -> Result<serde_json::Value, ImportError> {
    let text = std::fs::read(path).map_err(io(path.display()))?;
    serde_json::from_slice(&text).map_err(|e| ImportError::Oci {
        path: layout.display().to_string(),
        why: format!("{} is not JSON: {e}", path.display()),
    })
}

/// Unpacks the image of the OCI layout at `layout` (its first manifest for
/// linux/amd64, or its only one) into `root`, layer by layer.
fn unpack_oci(layout: &Path, root: &Path) -> Result<usize, ImportError> {
    let oci = |why: &str| ImportError::Oci { path: layout.display().to_string(), why: why.to_string() };
    let mut doc = read_json(layout, &layout.join("index.json"))?;
    // An index may point at another index; follow to a manifest.
    for _ in 0..4 {
        let Some(manifests) = doc["manifests"].as_array() else { break };
        let pick = manifests
            .iter()
            .find(|m| m["platform"]["architecture"] == "amd64" && m["platform"]["os"] == "linux")
            .or_else(|| manifests.first())
            .ok_or_else(|| oci("index.json lists no manifest"))?;
        let digest = pick["digest"].as_str().ok_or_else(|| oci("a manifest without a digest"))?;
        doc = read_json(layout, &blob(layout, digest)?)?;
    }
    let layers = doc["layers"].as_array().ok_or_else(|| oci("the manifest lists no layers"))?;
    for layer in layers {
        let media = layer["mediaType"].as_str().unwrap_or_default();
        if media.contains("zstd") {
            return Err(oci("zstd layers are not supported: export with gzip or uncompressed layers"));
        }
        let digest = layer["digest"].as_str().ok_or_else(|| oci("a layer without a digest"))?;
        apply_layer(&blob(layout, digest)?, root)?;
    }
    Ok(layers.len())
}

/// Bytes the files under `root` take (what mkfs.ext4 will copy).
fn content_bytes(root: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            files += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                bytes += m.len();
            }
        }
    }
    (bytes, files)
}

/// Makes an ext4 image of the directory `root` at `out`.
fn mkfs(root: &Path, out: &Path, size_mib: Option<u64>) -> Result<u64, ImportError> {
    let (bytes, files) = content_bytes(root);
    // The content, a block and an inode's worth per file, a quarter more
    // for the filesystem's own, and 16 MiB to write into.
    let need = (bytes + files * 4352) / (1 << 20) * 5 / 4 + 16;
    let size = size_mib.unwrap_or(need).max(8);
    if size < need {
        return Err(ImportError::Mkfs(format!("--size-mib {size} is too small for {need} MiB of content")));
    }
    let out_put = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-L", "rootfs", "-d"])
        .arg(root)
        .arg(out)
        .arg(format!("{size}M"))
        .output()
        .map_err(|e| {
            ImportError::Mkfs(format!(
                "cannot run mkfs.ext4 ({e}); install e2fsprogs 1.43 or later (apt install e2fsprogs)"
            ))
        })?;
    if !out_put.status.success() {
        return Err(ImportError::Mkfs(String::from_utf8_lossy(&out_put.stderr).trim().to_string()));
    }
    Ok(size)
}

fn sha256_of(path: &Path) -> Result<(String, u64), ImportError> {
    let mut f = std::fs::File::open(path).map_err(io(path.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Builds the file to upload; returns it, what it was made from, and the
/// directory holding it (removed when dropped).
fn build(opts: &ImportOptions<'_>) -> Result<(PathBuf, String, Option<tempfile::TempDir>), ImportError> {
    let source = sniff(opts.from, opts.type_)?;
    if source == Source::File {
        return Ok((opts.from.to_path_buf(), "the file as it is".into(), None));
    }
    if opts.type_ != ImageType::Rootfs {
        return Err(ImportError::UnknownSource {
            path: format!("{} (a {:?} is one file)", opts.from.display(), opts.type_),
        });
    }
    let work = tempfile::Builder::new().prefix("nexusctl-import-").tempdir().map_err(io("making a work directory"))?;
    let root = work.path().join("root");
    std::fs::create_dir(&root).map_err(io("making a work directory"))?;
    let how = match source {
        Source::Directory => {
            let out = work.path().join("rootfs.ext4");
            mkfs(opts.from, &out, opts.size_mib)?;
            return Ok((out, "a directory".into(), Some(work)));
        }
        Source::Tarball => {
            unpack_tarball(opts.from, &root)?;
            "a tarball".to_string()
        }
        Source::OciLayout => {
            let layers = unpack_oci(opts.from, &root)?;
            format!("an OCI image layout ({layers} layers)")
        }
        Source::File => unreachable!("handled above"),
    };
    let out = work.path().join("rootfs.ext4");
    mkfs(&root, &out, opts.size_mib)?;
    Ok((out, how, Some(work)))
}

/// Imports `opts.from` as Image `name` in the context's project.
pub async fn import(ctx: &Context, name: &str, opts: &ImportOptions<'_>) -> Result<(), Failure> {
    let on = crate::progress::wanted(None);
    let making = Progress::spinner(on, &format!("reading {}", opts.from.display()));
    let (file, how, _work) = {
        let opts_from = opts.from.to_path_buf();
        let (type_, size_mib, node_path) = (opts.type_, opts.size_mib, opts.node_path.map(str::to_string));
        tokio::task::spawn_blocking(move || {
            build(&ImportOptions { from: &opts_from, type_, size_mib, node_path: node_path.as_deref() })
        })
        .await
        .map_err(|e| Failure::error(format!("the import task failed: {e}")))?
        .map_err(|e| Failure::error(e.to_string()))?
    };
    making.set_message("checksumming".into());
    let (sha256, size) = sha256_of(&file).map_err(|e| Failure::error(e.to_string()))?;
    making.finish();
    let ext = match opts.type_ {
        ImageType::Rootfs => "ext4",
        ImageType::Kernel => "vmlinux",
        ImageType::Initrd => "initrd",
    };
    let path = opts
        .node_path
        .map(str::to_string)
        .unwrap_or_else(|| format!("/var/lib/nexus/images/{}/{name}-{}.{ext}", ctx.project, &sha256[..12]));
    let spec = ImageSpec {
        type_: opts.type_,
        path: path.clone(),
        sha256: Some(sha256.clone()),
        size_bytes: Some(size),
        source: Some(ImageSource { url: None, uploaded: true }),
    };
    let client = &ctx.client;
    let stored = match client.get::<ImageSpec>(&ctx.project, name).await {
        Ok(mut existing) => {
            existing.spec = spec;
            client.replace(&existing).await
        }
        Err(e) if e.is_not_found() => client.create(&nexus_api::Image::new(name, Some(&ctx.project), spec)).await,
        Err(e) => Err(e),
    };
    stored.map_err(|e| Failure::api(&e))?;
    let f = tokio::fs::File::open(&file).await.map_err(|e| Failure::error(format!("{}: {e}", file.display())))?;
    let bar = Progress::bytes(on, size, &format!("uploading image/{name}"));
    let _: serde_json::Value = client
        .put_file(&nexus_api::image::content_path(&ctx.project, name), bar.reader(f), size)
        .await
        .map_err(|e| Failure::api(&e))?;
    bar.finish();
    println!(
        "image/{name} imported from {how}: {:.1} MiB, sha256 {sha256}; nodes download it to {path} when a VM needs it",
        size as f64 / f64::from(1 << 20)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])], gzip: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        let raw = b.into_inner().unwrap();
        if !gzip {
            return raw;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
        let dir = tempfile::tempdir().unwrap();
        let (l1, l2) = (dir.path().join("l1"), dir.path().join("l2"));
        std::fs::write(&l1, tar_of(&[("etc/removed", b"x"), ("opt/old/a", b"a"), ("etc/kept", b"k")], false)).unwrap();
        std::fs::write(
            &l2,
            tar_of(&[("etc/.wh.removed", b""), ("opt/old/.wh..wh..opq", b""), ("opt/old/b", b"b")], true),
        )
        .unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        apply_layer(&l1, &root).unwrap();
        apply_layer(&l2, &root).unwrap();
        assert!(!root.join("etc/removed").exists());
        assert!(root.join("etc/kept").exists());
        assert!(!root.join("opt/old/a").exists(), "the opaque directory hides the lower layer");
        assert_eq!(std::fs::read(root.join("opt/old/b")).unwrap(), b"b");
        assert!(!root.join("opt/old/.wh..wh..opq").exists());
    }

    #[test]
    fn a_whiteout_does_not_follow_a_link_out_of_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"v").unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("lib")).unwrap();
        let l = dir.path().join("l");
        std::fs::write(&l, tar_of(&[("lib/.wh.victim", b"")], false)).unwrap();
        apply_layer(&l, &root).unwrap();
        assert!(outside.join("victim").exists());
    }

    #[test]
    fn sources_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t.tar.gz");
        std::fs::write(&t, tar_of(&[("a", b"a")], true)).unwrap();
        assert_eq!(sniff(&t, ImageType::Rootfs).unwrap(), Source::Tarball);
        let plain = dir.path().join("t.tar");
        std::fs::write(&plain, tar_of(&[("a", b"a")], false)).unwrap();
        assert_eq!(sniff(&plain, ImageType::Rootfs).unwrap(), Source::Tarball);
        assert_eq!(sniff(dir.path(), ImageType::Rootfs).unwrap(), Source::Directory);
        std::fs::write(dir.path().join("oci-layout"), b"{}").unwrap();
        assert_eq!(sniff(dir.path(), ImageType::Rootfs).unwrap(), Source::OciLayout);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(sniff(&junk, ImageType::Rootfs).is_err());
        assert_eq!(sniff(&junk, ImageType::Kernel).unwrap(), Source::File);
    }
}
