//! What a VM's storage is made of beyond its root filesystem: extra drives
//! (from an Image, a Volume or an empty scratch disk), and the I/O limits
//! of each drive and of the network interface, in Firecracker's shape (a
//! bandwidth and an ops token bucket). Types and their validation only.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{FieldErrors, validate_dns_label};

/// Most extra drives a VM may have. Firecracker gives each virtio device
/// one of the guest's few interrupt lines (19 on x86-64); the root drive
/// and the network interface take two.
pub const MAX_EXTRA_DRIVES: usize = 16;
/// Largest scratch disk or volume, in MiB (1 TiB).
pub const MAX_DISK_MIB: u64 = 1 << 20;
/// The drive id Firecracker knows the root drive by (an extra drive may
/// not be called so).
pub const ROOT_DRIVE: &str = "rootfs";

/// One extra drive, attached after the root drive in the order given (the
/// guest sees them as `/dev/vdb`, `/dev/vdc`, ...). Exactly one of
/// `image`, `volume` and `sizeMib` says what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriveSpec {
    /// The drive's name: a DNS label, unique among the VM's drives (a
    /// template's drive of the same name is replaced by this one).
    pub name: String,
    /// A `Rootfs` Image in the VM's project. Read-only: attached from the
    /// node's copy, never copied. Writable: the VM gets its own copy (a
    /// reflink where the node's filesystem has them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A Volume in the VM's project: a disk on one node that outlives the
    /// VM. The VM runs on the Volume's node; one VM uses a Volume at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// An empty scratch disk of this many MiB, sparse and unformatted (the
    /// guest makes its filesystem), the VM's own, gone with the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// Attached read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// I/O limits of the drive; changed on a running VM without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Limits of one device, as Firecracker applies them: a token bucket of
/// bytes and one of operations, each optional (absent: unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations (block requests, network packets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// A token bucket: `size` tokens, refilled in full every `refillTimeMs`,
/// plus a one-time burst spent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds (bytes or operations); at least 1.
    pub size: u64,
    /// Milliseconds to refill the whole bucket; at least 1.
    pub refill_time_ms: u64,
    /// Tokens granted once, on top of `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

/// The I/O limits of a VM's network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkLimits {
    /// What the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx: Option<RateLimiter>,
    /// What the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<RateLimiter>,
}

impl RateLimiter {
    /// Checks both buckets under `field`.
    pub fn validate(&self, errors: &mut FieldErrors, field: &str) {
        for (name, bucket) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = bucket {
                b.validate(errors, &format!("{field}.{name}"));
            }
        }
    }
}

impl TokenBucket {
    /// Checks the bucket under `field`: a bucket of no tokens or no refill
    /// time would limit nothing (Firecracker ignores it), so it is refused.
    pub fn validate(&self, errors: &mut FieldErrors, field: &str) {
        if self.size == 0 {
            errors.add(
                &format!("{field}.size"),
                0,
                "must be at least 1 (bytes or operations); leave the bucket out for no limit",
            );
        }
        if self.refill_time_ms == 0 {
            errors.add(&format!("{field}.refillTimeMs"), 0, "must be at least 1 millisecond");
        }
    }
}

impl NetworkLimits {
    /// Checks both directions under `field`.
    pub fn validate(&self, errors: &mut FieldErrors, field: &str) {
        for (name, limiter) in [("rx", &self.rx), ("tx", &self.tx)] {
            if let Some(l) = limiter {
                l.validate(errors, &format!("{field}.{name}"));
            }
        }
    }
}

impl DriveSpec {
    /// What the drive holds, in words (`image debian`, `volume data`,
    /// `64 MiB scratch`).
    pub fn source(&self) -> String {
        match (&self.image, &self.volume, self.size_mib) {
            (Some(i), _, _) => format!("image {i}"),
            (_, Some(v), _) => format!("volume {v}"),
            (_, _, Some(mib)) => format!("{mib} MiB scratch"),
            _ => "nothing".into(),
        }
    }
}

/// Checks a list of drives under `field` (`spec.drives`): names, sources,
/// sizes and limits, and how many there are.
pub fn validate_drives(errors: &mut FieldErrors, field: &str, drives: &[DriveSpec]) {
    if drives.len() > MAX_EXTRA_DRIVES {
        errors.add(
            field,
            format!("{} drives", drives.len()),
            &format!("at most {MAX_EXTRA_DRIVES} extra drives per VM (each takes one of the guest's interrupt lines)"),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, d) in drives.iter().enumerate() {
        let at = format!("{field}[{i}]");
        validate_dns_label(errors, &format!("{at}.name"), &d.name);
        if d.name == ROOT_DRIVE {
            errors.add(&format!("{at}.name"), &d.name, "is the root drive's id; choose another name");
        }
        if !seen.insert(d.name.as_str()) {
            errors.add(&format!("{at}.name"), &d.name, "is used by another drive of this VM; drive names are unique");
        }
        let sources = [d.image.is_some(), d.volume.is_some(), d.size_mib.is_some()].iter().filter(|s| **s).count();
        if sources != 1 {
            errors.add(
                &at,
                &d.name,
                "set exactly one of image (a Rootfs Image), volume (a Volume) and sizeMib (a scratch disk)",
            );
        }
        if let Some(image) = &d.image {
            validate_dns_label(errors, &format!("{at}.image"), image);
        }
        if let Some(volume) = &d.volume {
            if volume.contains('/') {
                errors.add(
                    &format!("{at}.volume"),
                    volume,
                    "names a Volume of the VM's own project (volumes of other projects cannot be attached)",
                );
            } else {
                validate_dns_label(errors, &format!("{at}.volume"), volume);
            }
        }
        if let Some(mib) = d.size_mib
            && (mib == 0 || mib > MAX_DISK_MIB)
        {
            errors.add(&format!("{at}.sizeMib"), mib, "must be from 1 to 1048576 (1 TiB)");
        }
        if let Some(l) = &d.rate_limiter {
            l.validate(errors, &format!("{at}.rateLimiter"));
        }
    }
}

/// A drive as the controller resolved it for the agent: what backs it on
/// the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolvedDrive {
    pub name: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    pub source: DriveSource,
}

/// What backs a drive on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum DriveSource {
    /// An Image's file on the node (checked against its sha256, downloaded
    /// from `source` when missing or wrong).
    Image {
        /// The Image and its generation (`name@generation`).
        image: String,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// A Volume's file on its node.
    Volume { volume: String, uid: String },
    /// An empty sparse file of the VM's own.
    Scratch { size_mib: u64 },
}

/// A drive of a running VM, as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriveStatus {
    pub name: String,
    /// What backs it, in words (`image debian@2`, `volume data`, `64 MiB scratch`).
    pub source: String,
    /// The backing file on the node.
    pub path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// The I/O limits a running VM's VMM applies, and the VM generation they
/// came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppliedLimits {
    /// The VM's `metadata.generation` whose spec set them.
    pub generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RateLimiter>,
    /// By drive name; a drive without limits is absent.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub drives: std::collections::BTreeMap<String, RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkLimits>,
}

/// The Images `drives` (at `field`) name, as (field, image name).
pub fn drive_images(field: &str, drives: &[DriveSpec]) -> Vec<(String, String)> {
    drives
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.image.as_ref().map(|image| (format!("{field}[{i}].image"), image.clone())))
        .collect()
}

/// `base`'s drives with `over`'s merged in by name: a drive of `over`
/// replaces the one of `base` with its name, in its place; the others
/// follow, in `over`'s order.
pub fn merge_drives(base: &[DriveSpec], over: &[DriveSpec]) -> Vec<DriveSpec> {
    let mut merged: Vec<DriveSpec> =
        base.iter().map(|b| over.iter().find(|o| o.name == b.name).unwrap_or(b).clone()).collect();
    merged.extend(over.iter().filter(|o| !base.iter().any(|b| b.name == o.name)).cloned());
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, mib: u64) -> DriveSpec {
        DriveSpec {
            name: name.into(),
            image: None,
            volume: None,
            size_mib: Some(mib),
            read_only: false,
            rate_limiter: None,
        }
    }

    #[test]
    fn bad_drives_are_named_by_field_with_what_to_do() {
        let mut errors = FieldErrors::default();
        let mut both = scratch("data", 64);
        both.image = Some("debian".into());
        let mut other_project = scratch("v", 1);
        other_project.size_mib = None;
        other_project.volume = Some("team-b/cache".into());
        let mut zero = scratch("z", 8);
        zero.rate_limiter = Some(RateLimiter {
            bandwidth: Some(TokenBucket { size: 0, refill_time_ms: 100, one_time_burst: None }),
            ops: None,
        });
        validate_drives(
            &mut errors,
            "spec.drives",
            &[
                scratch("cache", 64),
                scratch("cache", 32),
                both,
                scratch("rootfs", 1),
                scratch("big", MAX_DISK_MIB + 1),
                other_project,
                zero,
            ],
        );
        let text = errors.to_string();
        for want in [
            "spec.drives[1].name",
            "spec.drives[2]",
            "spec.drives[3].name",
            "spec.drives[4].sizeMib",
            "spec.drives[5].volume",
            "spec.drives[6].rateLimiter.bandwidth.size",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert!(!text.contains("spec.drives[0]"), "{text}");
        let mut many = FieldErrors::default();
        let drives: Vec<DriveSpec> = (0..=MAX_EXTRA_DRIVES).map(|i| scratch(&format!("d{i}"), 1)).collect();
        validate_drives(&mut many, "spec.drives", &drives);
        assert!(many.to_string().contains("at most 16 extra drives"), "{many}");
    }

    #[test]
    fn a_templates_drives_merge_with_the_vms_by_name() {
        let base = [scratch("cache", 64), scratch("logs", 16)];
        let over = [scratch("logs", 32), scratch("extra", 8)];
        let merged = merge_drives(&base, &over);
        let shape: Vec<(String, Option<u64>)> = merged.iter().map(|d| (d.name.clone(), d.size_mib)).collect();
        assert_eq!(
            shape,
            [("cache".into(), Some(64)), ("logs".into(), Some(32)), ("extra".into(), Some(8))],
            "the template's order, the VM's value, then the VM's own"
        );
    }
}
