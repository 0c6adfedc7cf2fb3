//! Resolution: a VM's spec laid over its Template, with Image names turned
//! into host paths, gives the complete machine configuration a node agent
//! needs; a VM restored from a Snapshot takes the snapshot's. Reads the
//! stores only.

use nexus_api::guest::GuestConfig;
use nexus_api::image::{ImagePhase, ImageType};
use nexus_api::snapshot::SnapshotPhase;
use nexus_api::storage::{DriveSource, DriveSpec, ResolvedDrive, merge_drives};
use nexus_api::vm::{DEFAULT_BOOT_ARGS, ResolvedConfig, ResolvedRestore, RestoreSource};
use nexus_api::volume::VolumePhase;
use nexus_api::{Template, TemplateSpec, Vm};

use super::Stores;

/// Why a VM's configuration cannot be resolved yet. Each is waited out
/// (GitOps may apply the VM before its template or images).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    #[error("template {name} does not exist in project {project}; create it or fix spec.template")]
    TemplateNotFound { project: String, name: String },
    #[error(
        "{field} names image {name}, which does not exist in project {project}; create the Image or give an absolute host path"
    )]
    ImageNotFound { field: String, project: String, name: String },
    #[error("{field} names image {name} of type {got:?}; it needs a {want:?} image")]
    WrongImageType { field: String, name: String, want: ImageType, got: ImageType },
    #[error("{field} names image {name}, which is Invalid: {message}")]
    ImageInvalid { field: String, name: String, message: String },
    #[error("{field} is set neither on the VM nor on its template")]
    Incomplete { field: &'static str },
    #[error("snapshot {name} does not exist in project {project}; create it or fix spec.restoreFrom.snapshot")]
    SnapshotNotFound { project: String, name: String },
    #[error("snapshot {name} is {phase:?}, not Ready yet")]
    SnapshotNotReady { name: String, phase: SnapshotPhase },
    #[error("snapshot {name} failed ({message}); take another and restore from that")]
    SnapshotFailed { name: String, message: String },
    #[error(
        "{field} names volume {name}, which does not exist in project {project}; create the Volume or fix the drive"
    )]
    VolumeNotFound { field: String, project: String, name: String },
    #[error("{field} names volume {name}, which is not made yet ({phase:?}); it is used once its node has made it")]
    VolumeNotReady { field: String, name: String, phase: VolumePhase },
    #[error("{field} names volume {name}, which failed: {message}; delete it and make another")]
    VolumeFailed { field: String, name: String, message: String },
}

impl Unresolved {
    /// The condition reason for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Unresolved::TemplateNotFound { .. } => "TemplateNotFound",
            Unresolved::ImageNotFound { .. } => "ImageNotFound",
            Unresolved::WrongImageType { .. } => "WrongImageType",
            Unresolved::ImageInvalid { .. } => "ImageInvalid",
            Unresolved::Incomplete { .. } => "Incomplete",
            Unresolved::SnapshotNotFound { .. } => "SnapshotNotFound",
            Unresolved::SnapshotNotReady { .. } => "SnapshotNotReady",
            Unresolved::SnapshotFailed { .. } => "SnapshotFailed",
            Unresolved::VolumeNotFound { .. } => "VolumeNotFound",
            Unresolved::VolumeNotReady { .. } => "VolumeNotReady",
            Unresolved::VolumeFailed { .. } => "VolumeFailed",
        }
    }
}

/// Resolves `vm` against the cached templates and images (or snapshots).
pub fn resolve(vm: &Vm, stores: &Stores) -> Result<ResolvedConfig, Unresolved> {
    let project = vm.metadata.project.clone().unwrap_or_default();
    if let Some(from) = &vm.spec.restore_from {
        return restored(vm, &project, from, stores);
    }
    let template: Option<std::sync::Arc<Template>> = match &vm.spec.template {
        Some(name) => Some(
            stores
                .templates
                .get_named(&project, name)
                .ok_or_else(|| Unresolved::TemplateNotFound { project: project.clone(), name: name.clone() })?,
        ),
        None => None,
    };
    let t = template.as_ref().map(|t| &t.spec);
    let spec = &vm.spec;
    let vcpu = spec.vcpu.or(t.map(|t| t.vcpu)).ok_or(Unresolved::Incomplete { field: "spec.vcpu" })?;
    let mem_mib = spec.mem_mib.or(t.map(|t| t.mem_mib)).ok_or(Unresolved::Incomplete { field: "spec.memMib" })?;
    let kernel =
        spec.kernel.clone().or(t.map(|t| t.kernel.clone())).ok_or(Unresolved::Incomplete { field: "spec.kernel" })?;
    let rootfs =
        spec.rootfs.clone().or(t.map(|t| t.rootfs.clone())).ok_or(Unresolved::Incomplete { field: "spec.rootfs" })?;
    let kernel = image_path(stores, &project, "spec.kernel", &kernel, ImageType::Kernel)?;
    let rootfs = image_path(stores, &project, "spec.rootfs", &rootfs, ImageType::Rootfs)?;
    let initrd = match spec.initrd.clone().or(t.and_then(|t| t.initrd.clone())) {
        Some(r) => Some(image_path(stores, &project, "spec.initrd", &r, ImageType::Initrd)?),
        None => None,
    };
    let wanted = merge_drives(t.map(|t| t.drives.as_slice()).unwrap_or_default(), &spec.drives);
    let drives = wanted
        .iter()
        .enumerate()
        .map(|(i, d)| drive(stores, &project, &format!("spec.drives[{i}]"), d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut node_selector = t.map(|t| t.node_selector.clone()).unwrap_or_default();
    node_selector.extend(spec.node_selector.clone());
    Ok(ResolvedConfig {
        generation: vm.metadata.generation.unwrap_or_default(),
        template: template.as_ref().map(|t| format!("{}@{}", t.name(), t.metadata.generation.unwrap_or_default())),
        vcpu,
        mem_mib,
        kernel_path: kernel.path,
        rootfs_path: rootfs.path,
        kernel_image: kernel.image,
        rootfs_image: rootfs.image,
        kernel_sha256: kernel.sha256,
        rootfs_sha256: rootfs.sha256,
        kernel_source: kernel.source,
        rootfs_source: rootfs.source,
        initrd_path: initrd.as_ref().map(|i| i.path.clone()),
        initrd_image: initrd.as_ref().and_then(|i| i.image.clone()),
        initrd_sha256: initrd.as_ref().and_then(|i| i.sha256.clone()),
        initrd_source: initrd.and_then(|i| i.source),
        boot_args: spec
            .boot_args
            .clone()
            .or(t.and_then(|t| t.boot_args.clone()))
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string()),
        node_selector,
        network: spec.network.clone().or(t.and_then(|t| t.network.clone())),
        restore: None,
        drives,
        rootfs_rate_limiter: spec.rootfs_rate_limiter.clone().or(t.and_then(|t| t.rootfs_rate_limiter.clone())),
        guest: GuestConfig::merge(&t.map(TemplateSpec::guest).unwrap_or_default(), &spec.guest()),
    })
}

/// What backs drive `d` (at `field`): its Image's file, its Volume (once
/// made), or a scratch disk.
fn drive(stores: &Stores, project: &str, field: &str, d: &DriveSpec) -> Result<ResolvedDrive, Unresolved> {
    let source = match (&d.image, &d.volume, d.size_mib) {
        (Some(image), _, _) => {
            let r = image_path(stores, project, &format!("{field}.image"), image, ImageType::Rootfs)?;
            DriveSource::Image {
                image: r.image.unwrap_or_else(|| image.clone()),
                path: r.path,
                sha256: r.sha256,
                source: r.source,
            }
        }
        (_, Some(name), _) => {
            let field = format!("{field}.volume");
            let v = stores.volumes.get_named(project, name).ok_or_else(|| Unresolved::VolumeNotFound {
                field: field.clone(),
                project: project.to_string(),
                name: name.clone(),
            })?;
            if v.is_deleting() {
                let message = "it is being deleted".to_string();
                return Err(Unresolved::VolumeFailed { field, name: name.clone(), message });
            }
            let status = v.status_or_default();
            match status.phase {
                VolumePhase::Available | VolumePhase::InUse => {}
                VolumePhase::Failed => {
                    let message = status.message.unwrap_or_else(|| "no reason recorded".into());
                    return Err(Unresolved::VolumeFailed { field, name: name.clone(), message });
                }
                phase => return Err(Unresolved::VolumeNotReady { field, name: name.clone(), phase }),
            }
            DriveSource::Volume { volume: name.clone(), uid: v.uid().to_string() }
        }
        (_, _, Some(size_mib)) => DriveSource::Scratch { size_mib },
        // Validation refuses a drive with no source.
        _ => DriveSource::Scratch { size_mib: 0 },
    };
    Ok(ResolvedDrive { name: d.name.clone(), read_only: d.read_only, rate_limiter: d.rate_limiter.clone(), source })
}

/// The configuration of a VM restored from snapshot `from`: the machine the
/// snapshot was taken of, on the node holding its files.
fn restored(vm: &Vm, project: &str, from: &RestoreSource, stores: &Stores) -> Result<ResolvedConfig, Unresolved> {
    let name = from.snapshot.clone();
    let snap = stores
        .snapshots
        .get_named(project, &name)
        .ok_or_else(|| Unresolved::SnapshotNotFound { project: project.to_string(), name: name.clone() })?;
    let status = snap.status_or_default();
    match status.phase {
        SnapshotPhase::Ready => {}
        SnapshotPhase::Failed => {
            let message = status.last_error.map(|e| e.message).unwrap_or_else(|| "no reason recorded".into());
            return Err(Unresolved::SnapshotFailed { name, message });
        }
        phase => return Err(Unresolved::SnapshotNotReady { name, phase }),
    }
    let (Some(config), Some(node)) = (status.config, status.node_name) else {
        return Err(Unresolved::SnapshotNotReady { name, phase: SnapshotPhase::Creating });
    };
    Ok(ResolvedConfig {
        generation: vm.metadata.generation.unwrap_or_default(),
        node_selector: Default::default(),
        // The source's guest data, with the restored VM's own over it (its
        // identity is always its own: see `ensure_request`).
        guest: GuestConfig::merge(&config.guest, &vm.spec.guest()),
        restore: Some(ResolvedRestore {
            snapshot: format!("{name}@{}", snap.uid()),
            snapshot_uid: snap.uid().to_string(),
            node,
        }),
        ..config
    })
}

/// A kernel or root filesystem as a VM uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub path: String,
    /// `name@generation` of the Image, when one was named.
    pub image: Option<String>,
    pub sha256: Option<String>,
    /// Where the node downloads it (an Image with a source).
    pub source: Option<String>,
}

/// What a kernel or rootfs reference stands for: itself when it is a host
/// path, else the named Image of the wanted type (with its checksum).
pub(crate) fn image_path(
    stores: &Stores,
    project: &str,
    field: &str,
    reference: &str,
    want: ImageType,
) -> Result<Resolved, Unresolved> {
    if reference.starts_with('/') {
        return Ok(Resolved { path: reference.to_string(), image: None, sha256: None, source: None });
    }
    let name = reference.to_string();
    let image = stores.images.get_named(project, reference).ok_or_else(|| Unresolved::ImageNotFound {
        field: field.to_string(),
        project: project.to_string(),
        name: name.clone(),
    })?;
    if image.spec.type_ != want {
        return Err(Unresolved::WrongImageType { field: field.to_string(), name, want, got: image.spec.type_ });
    }
    let status = image.status_or_default();
    // Found Invalid at its current generation (an edit makes it trusted again).
    if status.phase == ImagePhase::Invalid
        && status.observed_generation.is_none_or(|g| Some(g) == image.metadata.generation)
    {
        let message = status.message.unwrap_or_else(|| "no reason given".into());
        return Err(Unresolved::ImageInvalid { field: field.to_string(), name, message });
    }
    Ok(Resolved {
        path: image.spec.path.clone(),
        image: Some(format!("{}@{}", image.name(), image.metadata.generation.unwrap_or_default())),
        sha256: image.spec.sha256.clone(),
        source: image.spec.source.as_ref().and_then(|s| s.location(project, image.name())),
    })
}

/// vCPUs and MiB a VM takes on its node: from its resolved configuration,
/// else resolved now, else what its spec says (0 when unknown).
pub fn resources(vm: &Vm, stores: &Stores) -> (u8, u32) {
    if let Some(c) = vm.status.as_ref().and_then(|s| s.config.as_ref()) {
        return (c.vcpu, c.mem_mib);
    }
    match resolve(vm, stores) {
        Ok(c) => (c.vcpu, c.mem_mib),
        Err(_) => (vm.spec.vcpu.unwrap_or(0), vm.spec.mem_mib.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nexus_api::image::ImageStatus;
    use nexus_api::{Image, ImageSpec, TemplateSpec, VmSpec};

    use super::*;

    fn stores() -> Stores {
        let stores = Stores::empty();
        let mut t = Template::new(
            "ci",
            Some("p"),
            TemplateSpec {
                initrd: None,
                vcpu: 2,
                mem_mib: 1024,
                kernel: "vmlinux".into(),
                rootfs: "/images/rootfs.ext4".into(),
                boot_args: Some("console=ttyS0".into()),
                network: None,
                node_selector: BTreeMap::from([("pool".into(), "ci".into()), ("zone".into(), "a".into())]),
                ..Default::default()
            },
        );
        t.metadata.generation = Some(3);
        stores.templates.record_write(t);
        let kernel = ImageSpec {
            type_: ImageType::Kernel,
            path: "/images/vmlinux-6.1".into(),
            sha256: None,
            size_bytes: None,
            source: None,
        };
        stores.images.record_write(Image::new("vmlinux", Some("p"), kernel));
        let rootfs = ImageSpec {
            type_: ImageType::Rootfs,
            path: "/images/debian.ext4".into(),
            sha256: None,
            size_bytes: None,
            source: None,
        };
        stores.images.record_write(Image::new("debian", Some("p"), rootfs.clone()));
        let mut bad = Image::new("broken", Some("p"), rootfs);
        bad.status = Some(ImageStatus {
            phase: ImagePhase::Invalid,
            message: Some("sha256 mismatch".into()),
            ..Default::default()
        });
        stores.images.record_write(bad);
        stores
    }

    fn vm(spec: VmSpec) -> Vm {
        let mut vm = Vm::new("job", Some("p"), spec);
        vm.metadata.generation = Some(7);
        vm
    }

    #[test]
    fn a_vm_overrides_its_template_field_by_field() {
        let spec = VmSpec {
            template: Some("ci".into()),
            mem_mib: Some(2048),
            rootfs: Some("debian".into()),
            node_selector: BTreeMap::from([("zone".into(), "b".into())]),
            ..Default::default()
        };
        let c = resolve(&vm(spec), &stores()).unwrap();
        assert_eq!((c.vcpu, c.mem_mib), (2, 2048));
        assert_eq!(c.kernel_path, "/images/vmlinux-6.1", "the template's image name is resolved");
        assert_eq!(c.rootfs_path, "/images/debian.ext4");
        assert_eq!(c.boot_args, "console=ttyS0");
        assert_eq!(c.template.as_deref(), Some("ci@3"));
        assert_eq!(c.generation, 7);
        assert_eq!(c.node_selector, BTreeMap::from([("pool".into(), "ci".into()), ("zone".into(), "b".into())]));
    }

    #[test]
    fn missing_and_mismatched_references_say_what_to_fix() {
        let missing = VmSpec { template: Some("nope".into()), ..Default::default() };
        let err = resolve(&vm(missing), &stores()).unwrap_err();
        assert_eq!(err.reason(), "TemplateNotFound");
        assert!(err.to_string().contains("template nope does not exist in project p"), "{err}");
        let wrong = VmSpec { template: Some("ci".into()), kernel: Some("debian".into()), ..Default::default() };
        let err = resolve(&vm(wrong), &stores()).unwrap_err();
        assert_eq!(err.reason(), "WrongImageType");
        assert!(err.to_string().contains("spec.kernel names image debian of type Rootfs"), "{err}");
        let invalid = VmSpec { template: Some("ci".into()), rootfs: Some("broken".into()), ..Default::default() };
        assert!(resolve(&vm(invalid), &stores()).unwrap_err().to_string().contains("sha256 mismatch"));
        let absent = VmSpec { template: Some("ci".into()), rootfs: Some("ubuntu".into()), ..Default::default() };
        assert_eq!(resolve(&vm(absent), &stores()).unwrap_err().reason(), "ImageNotFound");
    }

    #[test]
    fn paths_pass_through_and_boot_args_default() {
        let spec = VmSpec {
            vcpu: Some(1),
            mem_mib: Some(128),
            kernel: Some("/k".into()),
            rootfs: Some("/r".into()),
            ..Default::default()
        };
        let c = resolve(&vm(spec), &Stores::empty()).unwrap();
        assert_eq!((c.kernel_path.as_str(), c.rootfs_path.as_str()), ("/k", "/r"));
        assert_eq!(c.boot_args, DEFAULT_BOOT_ARGS);
        assert_eq!(c.template, None);
    }
}
