//! Status writes every reconciler makes the same way: through the status
//! endpoint, only when the status changed, and remembered in the store so
//! the next read sees it before the watch delivers it.

use nexus_api::{Object, ResourceSpec};
use nexus_client::{Client, ClientError};

use super::store::Store;

/// Writes `status` for `obj` unless the store already shows exactly it,
/// and records what the apiserver answered. Returns the object as written
/// (or as it is, with `status`, when nothing needed writing).
///
/// # Errors
/// The apiserver's refusal, a conflict included (the caller's copy is
/// stale: its reconcile runs again on the newer version).
pub async fn write_status<S: ResourceSpec>(
    api: &Client,
    store: &Store<S>,
    obj: &Object<S>,
    status: S::Status,
) -> Result<Object<S>, ClientError> {
    let project = obj.metadata.project.as_deref().unwrap_or_default();
    let cached = store.get_named(project, obj.name());
    let mut next = obj.clone();
    if cached.as_ref().and_then(|c| c.status.as_ref()) == Some(&status) {
        next.status = Some(status);
        return Ok(next);
    }
    next.status = Some(status);
    let written = api.replace_status(&next).await?;
    store.record_write(written.clone());
    Ok(written)
}
