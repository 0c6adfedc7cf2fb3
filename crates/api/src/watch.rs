//! Watch events as they travel on the wire: one JSON object per line.

use serde::{Deserialize, Serialize};

/// What happened to the object carried by a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WatchEventType {
    Added,
    Modified,
    Deleted,
    /// No change: `object.metadata.resourceVersion` says how far the stream got.
    Bookmark,
    /// The stream ends; `object` is an `ErrorBody` (410 when the version expired).
    Error,
}

/// One line of a watch stream. `object` is the full object, except for
/// BOOKMARK (only `metadata.resourceVersion`) and ERROR (an `ErrorBody`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub type_: WatchEventType,
    pub object: serde_json::Value,
    /// The request the change came from (the id its caller sent, else the
    /// apiserver's): whoever acts on the change passes it on as its own
    /// `X-Request-Id`, so one id follows a request through every component.
    #[serde(default, rename = "requestId", skip_serializing_if = "String::is_empty")]
    pub request_id: String,
}
