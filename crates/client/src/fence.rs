//! The lease fence a client's writes carry (see [`nexus_api::lease::Fence`]):
//! set by a leader when it takes a lease, shared by every clone of the
//! client, and noticed when the apiserver refuses a write because the term
//! it names has ended.

use std::sync::RwLock;

use nexus_api::lease::Fence;
use tokio::sync::Notify;

/// Error name the apiserver answers a fenced-off write with.
pub const FENCED: &str = "Fenced";

/// The fence, and who waits to hear that it was refused.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    header: RwLock<Option<String>>,
    refused: Notify,
}

impl Slot {
    pub(crate) fn set(&self, fence: Option<&Fence>) {
        *self.header.write().unwrap_or_else(|p| p.into_inner()) = fence.map(Fence::header_value);
    }

    pub(crate) fn header(&self) -> Option<String> {
        self.header.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Called when the apiserver refused a write as fenced off.
    pub(crate) fn refused(&self) {
        self.refused.notify_waiters();
    }

    /// Returns at the next refusal after this call.
    pub(crate) async fn wait_refused(&self) {
        self.refused.notified().await
    }
}
