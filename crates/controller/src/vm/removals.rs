//! Removals under way: a VM whose agent answered that it is removing it is
//! not asked again until its node announces the removal done, or the
//! recheck period passes (for a notice that never comes). Its own status
//! write (`Terminating`) wakes the VM at once, and without this that
//! reconcile would ask the agent a second time for nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When each removal under way was last asked for, by VM uid.
#[derive(Debug, Clone, Default)]
pub struct Removals {
    inner: Arc<Mutex<Asked>>,
}

#[derive(Debug, Default)]
struct Asked {
    at: HashMap<String, Instant>,
    /// The map's size after its last pruning: it is pruned again once it
    /// has doubled, so that an entry no teardown forgot (a VM whose
    /// finalizer someone else removed) does not stay for ever.
    pruned: usize,
}

/// How long an entry is kept at most (well past any recheck period).
const KEEP: Duration = Duration::from_secs(600);

impl Removals {
    /// Records that the agent of VM `uid` answered that it is removing it.
    pub fn asked(&self, uid: &str) {
        let mut asked = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if asked.at.len() >= 2 * asked.pruned + 64 {
            asked.at.retain(|_, at| now.duration_since(*at) < KEEP);
            asked.pruned = asked.at.len();
        }
        asked.at.insert(uid.to_string(), now);
    }

    /// How long to leave VM `uid` be, if its removal was asked for less
    /// than `period` ago.
    pub fn wait(&self, uid: &str, period: Duration) -> Option<Duration> {
        let asked = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let at = asked.at.get(uid)?;
        period.checked_sub(at.elapsed()).filter(|left| !left.is_zero())
    }

    /// Forgets VM `uid` (its removal is done).
    pub fn forget(&self, uid: &str) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).at.remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_asked_for_is_left_be_for_the_period_and_forgotten_when_done() {
        let removals = Removals::default();
        assert_eq!(removals.wait("u1", Duration::from_secs(10)), None, "never asked");
        removals.asked("u1");
        let left = removals.wait("u1", Duration::from_secs(10)).expect("asked just now");
        assert!(left > Duration::from_secs(9), "{left:?}");
        assert_eq!(removals.wait("u1", Duration::ZERO), None, "the period has passed");
        assert_eq!(removals.wait("u2", Duration::from_secs(10)), None, "another VM");
        removals.forget("u1");
        assert_eq!(removals.wait("u1", Duration::from_secs(10)), None, "done");
    }

    #[test]
    fn entries_nobody_forgot_are_pruned_once_old() {
        let removals = Removals::default();
        let long_ago = Instant::now().checked_sub(KEEP + Duration::from_secs(1));
        if let Some(long_ago) = long_ago {
            removals.inner.lock().unwrap().at.extend((0..100).map(|i| (format!("old-{i}"), long_ago)));
        }
        for i in 0..200 {
            removals.asked(&format!("new-{i}"));
        }
        let asked = removals.inner.lock().unwrap();
        assert!(asked.at.keys().all(|k| k.starts_with("new-")), "the old ones are gone");
        assert_eq!(asked.at.len(), 200);
    }
}
