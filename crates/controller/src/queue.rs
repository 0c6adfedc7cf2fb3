//! A deduplicating work queue: a key waits at most once, is never handed to
//! two workers at once, and a key added while it is being worked on is
//! handed out again when that work is done.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug)]
struct State<K> {
    queue: VecDeque<K>,
    queued: HashSet<K>,
    active: HashSet<K>,
    /// Keys added while active: re-queued by `done`.
    dirty: HashSet<K>,
    failures: HashMap<K, u32>,
}

/// Exponential backoff bounds for keys whose reconcile failed.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(200), max: Duration::from_secs(30) }
    }
}

/// The queue; cheap to clone, shared by producers and workers.
#[derive(Debug)]
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    ready: Notify,
    backoff: Backoff,
}

impl<K: Clone + Eq + Hash + Send + 'static> WorkQueue<K> {
    pub fn new(backoff: Backoff) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued: HashSet::new(),
                active: HashSet::new(),
                dirty: HashSet::new(),
                failures: HashMap::new(),
            }),
            ready: Notify::new(),
            backoff,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `key` unless it is already waiting.
    pub fn add(&self, key: K) {
        let mut s = self.lock();
        if s.active.contains(&key) {
            s.dirty.insert(key);
            return;
        }
        if s.queued.insert(key.clone()) {
            s.queue.push_back(key);
            drop(s);
            self.ready.notify_one();
        }
    }

    /// Queues `key` after `delay`.
    pub fn add_after(self: &Arc<Self>, key: K, delay: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.add(key);
        });
    }

    /// Queues `key` after its next backoff delay (with jitter) and returns it.
    pub fn add_rate_limited(self: &Arc<Self>, key: K) -> Duration {
        let failures = {
            let mut s = self.lock();
            let f = s.failures.entry(key.clone()).or_insert(0);
            *f += 1;
            *f
        };
        let exp = self.backoff.base.saturating_mul(1u32 << failures.min(16).saturating_sub(1));
        let delay = exp.min(self.backoff.max);
        let delay = delay + jitter(delay / 4);
        self.add_after(key, delay);
        delay
    }

    /// Clears the backoff of `key` after a success.
    pub fn forget(&self, key: &K) {
        self.lock().failures.remove(key);
    }

    /// Waits for the next key and marks it active.
    pub async fn next(&self) -> K {
        loop {
            let notified = self.ready.notified();
            {
                let mut s = self.lock();
                if let Some(key) = s.queue.pop_front() {
                    s.queued.remove(&key);
                    s.active.insert(key.clone());
                    let more = !s.queue.is_empty();
                    drop(s);
                    if more {
                        self.ready.notify_one();
                    }
                    return key;
                }
            }
            notified.await;
        }
    }

    /// Marks `key` no longer active; re-queues it if it was added meanwhile.
    pub fn done(&self, key: &K) {
        let requeue = {
            let mut s = self.lock();
            s.active.remove(key);
            s.dirty.remove(key)
        };
        if requeue {
            self.add(key.clone());
        }
    }

    /// Keys waiting (not counting active ones).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn jitter(max: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let max_ns = max.as_nanos().max(1) as u64;
    Duration::from_nanos(u64::from(nanos) % max_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_added_twice_is_handed_out_once() {
        let q = WorkQueue::new(Backoff::default());
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.next().await, "a");
        assert_eq!(q.next().await, "b");
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_key_added_while_active_comes_back_after_done_not_before() {
        let q = WorkQueue::new(Backoff::default());
        q.add("a");
        let k = q.next().await;
        q.add("a");
        assert!(q.is_empty(), "must not be handed to a second worker while active");
        q.done(&k);
        assert_eq!(q.len(), 1);
        assert_eq!(q.next().await, "a");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_and_is_capped() {
        let q = WorkQueue::new(Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1) });
        let d1 = q.add_rate_limited("a");
        let d2 = q.add_rate_limited("a");
        for _ in 0..10 {
            q.add_rate_limited("a");
        }
        let d_last = q.add_rate_limited("a");
        assert!(d1 < Duration::from_millis(130), "{d1:?}");
        assert!(d2 >= Duration::from_millis(200), "{d2:?}");
        assert!(d_last <= Duration::from_millis(1250), "{d_last:?}");
        q.forget(&"a");
        assert!(q.add_rate_limited("a") < Duration::from_millis(130));
    }
}
