//! The `Image` kind: a named kernel or root filesystem on the hosts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::registry::{AGE, Column, Format, NAME};

use crate::meta::{Object, ResourceSpec};
use crate::validation::{FieldErrors, validate_host_path};

/// A kernel or root filesystem image.
pub type Image = Object<ImageSpec>;

/// What an image is and where it lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// What the image holds.
    #[serde(rename = "type")]
    pub type_: ImageType,
    /// Absolute host path of the image file.
    pub path: String,
    /// Expected SHA-256 of the file, as 64 lower-case hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Kinds of image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImageType {
    Kernel,
    Rootfs,
    Initrd,
}

/// Whether an image was found and verified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePhase {
    #[default]
    Pending,
    Ready,
    Invalid,
}

/// Observed state of an image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageStatus {
    #[serde(default)]
    pub phase: ImagePhase,
    /// The `metadata.generation` this status is about: an Image edited
    /// since it was found Invalid is trusted again until checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ResourceSpec for ImageSpec {
    type Status = ImageStatus;
    const KIND: &'static str = "Image";
    const PLURAL: &'static str = "images";
    const NAMESPACED: bool = true;
    const ALIASES: &'static [&'static str] = &["image", "img"];
    const FIELD_SELECTORS: &'static [&'static str] = &["status.phase"];
    const COLUMNS: &'static [Column] = &[
        NAME,
        Column::new("TYPE", &["spec.type"], Format::Text),
        Column::new("PATH", &["spec.path"], Format::Text),
        Column::new("PHASE", &["status.phase"], Format::Text).or("Pending"),
        AGE,
    ];

    fn validate(&self, errors: &mut FieldErrors) {
        validate_host_path(errors, "spec.path", &self.path);
        if let Some(sum) = &self.sha256
            && !(sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            errors.add("spec.sha256", sum, "must be 64 lower-case hex digits (the output of sha256sum)");
        }
    }
}
