//! Locks by name, for the files on the node that are not a VM's: a
//! snapshot's files are written by the owner of the VM they are taken of,
//! and read or removed by whoever asks about the snapshot, never at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::paths::Uid;

/// One lock per uid, made when first asked for.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<Uid, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Waits for `uid`'s lock; it is held until the guard drops.
    pub async fn hold(&self, uid: &Uid) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(uid.clone()).or_default().clone();
        lock.lock_owned().await
    }

    /// Forgets `uid`'s lock (its files are gone).
    pub fn forget(&self, uid: &Uid) {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
}
