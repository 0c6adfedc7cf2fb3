//! The `Image` kind: a named kernel or root filesystem on the hosts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{NodeAccess, Policy, QuotaUse};
use crate::rbac::Role;
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
    /// The file's size in bytes (set by `nexusctl image import`); an upload
    /// of another size is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Where nodes get the file when theirs is missing or does not match
    /// `sha256` (which a source requires): they download it to `path`,
    /// check it, and only then use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ImageSource>,
}

/// Where nodes download an image from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSource {
    /// An `http://` or `https://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The file was uploaded to the apiserver (`nexusctl image import`):
    /// nodes download it from `.../images/{name}/content`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uploaded: bool,
}

impl ImageSource {
    /// Where a node downloads the file of Image `name` in `project`: an
    /// absolute URL, or a path on the apiserver (starting with `/v1/`).
    pub fn location(&self, project: &str, name: &str) -> Option<String> {
        match (&self.url, self.uploaded) {
            (Some(url), _) => Some(url.clone()),
            (None, true) => Some(content_path(project, name)),
            (None, false) => None,
        }
    }
}

/// The apiserver path of an Image's uploaded file.
pub fn content_path(project: &str, name: &str) -> String {
    format!("/v1/projects/{project}/images/{name}/content")
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
    const POLICY: Policy = Policy::project(Role::Admin).nodes(NodeAccess::Get).quota(QuotaUse::Input);
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
        if let Some(source) = &self.source {
            if self.sha256.is_none() {
                errors.add(
                    "spec.sha256",
                    "",
                    "is required with spec.source: nodes check what they download against it",
                );
            }
            match (&source.url, source.uploaded) {
                (Some(_), true) => errors.add(
                    "spec.source",
                    "url and uploaded",
                    "give one: a URL, or uploaded: true for a file in the apiserver",
                ),
                (None, false) => errors.add(
                    "spec.source",
                    "{}",
                    "give url: https://... or uploaded: true (set by nexusctl image import)",
                ),
                (Some(url), false) => {
                    let ok = (url.starts_with("https://") || url.starts_with("http://"))
                        && url.len() <= 2048
                        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
                    if !ok {
                        errors.add(
                            "spec.source.url",
                            url,
                            "must be an http:// or https:// URL without spaces, at most 2048 characters",
                        );
                    }
                }
                (None, true) => {}
            }
        }
    }
}
