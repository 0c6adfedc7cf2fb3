//! Notices of VMM processes that ended without the agent stopping them. The
//! reaper records each; the heartbeat loop beats at once and carries the
//! last minute of them in the Node's status, so the controller applies the
//! VM's restart policy within moments rather than at its next recheck.

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
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.push_back(VmmExitNotice { uid: uid.to_string(), at: Utc::now() });
        while recent.len() > MAX_NOTICES {
            recent.pop_front();
        }
        drop(recent);
        self.changed.notify_one();
    }

    /// The notices of the last `window`, oldest first (older ones are dropped).
    pub fn recent(&self, window: Duration) -> Vec<VmmExitNotice> {
        let cutoff = Utc::now() - chrono::Duration::from_std(window).unwrap_or_else(|_| chrono::Duration::zero());
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent.front().is_some_and(|n| n.at < cutoff) {
            recent.pop_front();
        }
        recent.iter().cloned().collect()
    }

    /// Returns when a notice was recorded since the last call.
    pub async fn recorded(&self) {
        self.changed.notified().await;
    }
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
    }
}
