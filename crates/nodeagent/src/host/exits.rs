//! Notices of VMM processes that ended without the agent stopping them, and
//! of VM removals the agent finished. The reaper (or the removal) records
//! each; the heartbeat loop beats at once and carries the last minute of
//! them in the Node's status, so the controller applies the VM's restart
//! policy, or drops a removed VM, within moments rather than at its next
//! recheck.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use nexus_api::node::VmmExitNotice;
use tokio::sync::Notify;

/// Most notices kept, however many VMMs end within the window.
const MAX_NOTICES: usize = 256;

/// The recent unasked exits of this agent's VMMs.
#[derive(Debug, Default)]
pub struct Exits {
    recent: Mutex<VecDeque<VmmExitNotice>>,
    /// Removals finished, announced the same way.
    removals: Mutex<VecDeque<VmmExitNotice>>,
    /// Pids the agent is stopping itself: their end is no news.
    expected: Mutex<HashSet<u32>>,
    changed: Notify,
}

impl Exits {
    /// Marks VMM `pid` as being stopped by the agent.
    pub fn expect(&self, pid: u32) {
        self.expected.lock().unwrap_or_else(|p| p.into_inner()).insert(pid);
    }

    /// Records that VMM `pid` of VM `uid` ended, unless the agent stopped it.
    pub fn record(&self, uid: &str, pid: u32) {
        if self.expected.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid) {
            return;
        }
        push(&self.recent, uid);
        self.changed.notify_one();
    }

    /// Records that the removal of VM `uid` is done.
    pub fn removed(&self, uid: &str) {
        push(&self.removals, uid);
        self.changed.notify_one();
    }

    /// The notices of the last `window`, oldest first (older ones are dropped).
    pub fn recent(&self, window: Duration) -> Vec<VmmExitNotice> {
        within(&self.recent, window)
    }

    /// Whether the removal of VM `uid` finished within the last minute.
    pub fn recently_removed(&self, uid: &str) -> bool {
        self.removals.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|n| n.uid == uid)
    }

    /// The finished removals of the last `window`, oldest first.
    pub fn recent_removals(&self, window: Duration) -> Vec<VmmExitNotice> {
        within(&self.removals, window)
    }

    /// Returns when a notice was recorded since the last call.
    pub async fn recorded(&self) {
        self.changed.notified().await;
    }
}

/// Adds a notice about `uid` to `notices`, dropping the oldest beyond the bound.
fn push(notices: &Mutex<VecDeque<VmmExitNotice>>, uid: &str) {
    let mut notices = notices.lock().unwrap_or_else(|p| p.into_inner());
    notices.push_back(VmmExitNotice { uid: uid.to_string(), at: Utc::now() });
    while notices.len() > MAX_NOTICES {
        notices.pop_front();
    }
}

/// The notices of the last `window` in `notices`, oldest first; older ones
/// are dropped.
fn within(notices: &Mutex<VecDeque<VmmExitNotice>>, window: Duration) -> Vec<VmmExitNotice> {
    let cutoff = Utc::now() - chrono::Duration::from_std(window).unwrap_or_else(|_| chrono::Duration::zero());
    let mut notices = notices.lock().unwrap_or_else(|p| p.into_inner());
    while notices.front().is_some_and(|n| n.at < cutoff) {
        notices.pop_front();
    }
    notices.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unasked_exits_are_news_and_asked_ones_are_not() {
        let exits = Exits::default();
        exits.expect(10);
        exits.record("a", 10);
        assert!(exits.recent(Duration::from_secs(60)).is_empty(), "the agent stopped pid 10 itself");
        exits.record("b", 11);
        let recent = exits.recent(Duration::from_secs(60));
        assert_eq!(recent.iter().map(|n| n.uid.as_str()).collect::<Vec<_>>(), ["b"]);
        tokio::time::timeout(Duration::from_millis(10), exits.recorded()).await.expect("a waiter is woken");
        assert!(exits.recent(Duration::ZERO).is_empty(), "old notices are dropped");
        exits.removed("c");
        let removed = exits.recent_removals(Duration::from_secs(60));
        assert_eq!(removed.iter().map(|n| n.uid.as_str()).collect::<Vec<_>>(), ["c"]);
        assert!(exits.recent(Duration::from_secs(60)).iter().all(|n| n.uid != "c"), "a removal is not an exit");
        assert!(exits.recently_removed("c") && !exits.recently_removed("b"));
    }
}
