//! The work queue of one controller: a key waits at most once, is never
//! handed to two workers at once, and a key added while it is being worked
//! on is handed out again when that work is done.
//!
//! Delayed adds are deduplicated too: a key has at most one pending delay,
//! the earliest asked for wins, and no task or timer is made per delay —
//! workers waiting in [`WorkQueue::next`] sleep until the earliest one.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

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

impl Backoff {
    /// The delay after the `failures`-th failure in a row (1 for the first),
    /// with up to a quarter of jitter added.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << failures.clamp(1, 17).saturating_sub(1));
        let delay = exp.min(self.max);
        delay + jitter(delay / 4)
    }
}

#[derive(Debug)]
struct State<K> {
    ready: VecDeque<K>,
    queued: HashSet<K>,
    active: HashSet<K>,
    /// Keys added while active: handed out again by `done`.
    dirty: HashSet<K>,
    /// Pending delays by due time (with a sequence number for uniqueness)...
    delayed: BTreeMap<(Instant, u64), K>,
    /// ... and by key.
    due: HashMap<K, (Instant, u64)>,
    seq: u64,
    failures: HashMap<K, u32>,
}

/// The queue, shared by the producers (triggers) and the workers.
#[derive(Debug)]
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    ready: Notify,
}

impl<K: Clone + Eq + Hash + Send> Default for WorkQueue<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash + Send> WorkQueue<K> {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                queued: HashSet::new(),
                active: HashSet::new(),
                dirty: HashSet::new(),
                delayed: BTreeMap::new(),
                due: HashMap::new(),
                seq: 0,
                failures: HashMap::new(),
            }),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `key` now unless it is already waiting; drops a pending delay
    /// of it (now is earlier).
    pub fn add(&self, key: K) {
        let mut s = self.lock();
        if let Some(at) = s.due.remove(&key) {
            s.delayed.remove(&at);
        }
        if Self::enqueue(&mut s, key) {
            drop(s);
            self.ready.notify_one();
        }
    }

    /// Makes `key` ready; returns whether a worker should be woken.
    fn enqueue(s: &mut State<K>, key: K) -> bool {
        if s.active.contains(&key) {
            s.dirty.insert(key);
            return false;
        }
        if s.queued.insert(key.clone()) {
            s.ready.push_back(key);
            return true;
        }
        false
    }

    /// Queues `key` after `delay`. If it is already waiting, or already due
    /// sooner, nothing changes; if it was due later, the earlier time wins.
    pub fn add_after(&self, key: K, delay: Duration) {
        let at = Instant::now() + delay;
        let mut s = self.lock();
        if s.queued.contains(&key) {
            return;
        }
        if let Some(&(old, seq)) = s.due.get(&key) {
            if old <= at {
                return;
            }
            s.delayed.remove(&(old, seq));
        }
        s.seq += 1;
        let slot = (at, s.seq);
        s.delayed.insert(slot, key.clone());
        s.due.insert(key, slot);
        drop(s);
        // A sleeping worker may need to wake sooner than it planned.
        self.ready.notify_waiters();
    }

    /// Records a failure of `key`; returns the failures in a row so far.
    pub fn fail(&self, key: &K) -> u32 {
        let mut s = self.lock();
        let f = s.failures.entry(key.clone()).or_insert(0);
        *f += 1;
        *f
    }

    /// Failures of `key` in a row so far.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// Clears the failure count of `key` after a success.
    pub fn forget(&self, key: &K) {
        self.lock().failures.remove(key);
    }

    /// Moves every delay that is due into the ready queue; returns the next
    /// due time, if any remain.
    fn promote(s: &mut State<K>, now: Instant) -> Option<Instant> {
        while let Some((&(at, seq), _)) = s.delayed.iter().next() {
            if at > now {
                return Some(at);
            }
            let key = s.delayed.remove(&(at, seq)).expect("just seen");
            s.due.remove(&key);
            Self::enqueue(s, key);
        }
        None
    }

    /// Waits for the next key and marks it active.
    pub async fn next(&self) -> K {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Register before looking, so no notification falls in between.
            notified.as_mut().enable();
            let wake_at = {
                let mut s = self.lock();
                let wake_at = Self::promote(&mut s, Instant::now());
                if let Some(key) = s.ready.pop_front() {
                    s.queued.remove(&key);
                    s.active.insert(key.clone());
                    let more = !s.ready.is_empty();
                    drop(s);
                    if more {
                        self.ready.notify_one();
                    }
                    return key;
                }
                wake_at
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Marks `key` no longer active; queues it again if it was added meanwhile.
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

    /// Keys ready to be handed out (not counting active or delayed ones).
    pub fn len(&self) -> usize {
        self.lock().ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys waiting for a delay to pass.
    pub fn delayed(&self) -> usize {
        self.lock().delayed.len()
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
        let q = WorkQueue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.next().await, "a");
        assert_eq!(q.next().await, "b");
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_key_added_while_active_comes_back_after_done_not_before() {
        let q = WorkQueue::new();
        q.add("a");
        let k = q.next().await;
        q.add("a");
        assert!(q.is_empty(), "must not be handed to a second worker while active");
        q.done(&k);
        assert_eq!(q.len(), 1);
        assert_eq!(q.next().await, "a");
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_adds_of_one_key_deduplicate_and_the_earliest_wins() {
        let q = WorkQueue::new();
        let start = Instant::now();
        q.add_after("a", Duration::from_secs(10));
        q.add_after("a", Duration::from_secs(3));
        q.add_after("a", Duration::from_secs(7));
        assert_eq!(q.delayed(), 1, "one pending delay per key");
        assert_eq!(q.next().await, "a");
        assert_eq!(start.elapsed(), Duration::from_secs(3), "the earliest delay won");
        q.done(&"a");
        assert_eq!(q.delayed(), 0, "the later delays were dropped, not kept");
        let nothing = tokio::time::timeout(Duration::from_secs(60), q.next()).await;
        assert!(nothing.is_err(), "a is not handed out again");
    }

    #[tokio::test(start_paused = true)]
    async fn an_immediate_add_overrides_a_pending_delay_and_delays_come_out_in_order() {
        let q = WorkQueue::new();
        q.add_after("late", Duration::from_secs(5));
        q.add_after("soon", Duration::from_secs(1));
        q.add_after("now", Duration::from_secs(30));
        q.add("now");
        assert_eq!(q.next().await, "now");
        assert_eq!(q.delayed(), 2);
        assert_eq!(q.next().await, "soon");
        assert_eq!(q.next().await, "late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_added_while_a_worker_sleeps_wakes_it_in_time() {
        let q = std::sync::Arc::new(WorkQueue::new());
        q.add_after("far", Duration::from_secs(100));
        let worker = {
            let q = q.clone();
            tokio::spawn(async move { (q.next().await, Instant::now()) })
        };
        tokio::task::yield_now().await;
        let start = Instant::now();
        q.add_after("near", Duration::from_secs(2));
        let (key, at) = worker.await.unwrap();
        assert_eq!(key, "near");
        assert_eq!(at - start, Duration::from_secs(2));
    }

    #[test]
    fn backoff_grows_is_capped_and_failures_reset_after_success() {
        let q = WorkQueue::new();
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1) };
        assert!(b.delay(q.fail(&"a")) < Duration::from_millis(130));
        let n = q.fail(&"a");
        assert_eq!(n, 2);
        assert!(b.delay(n) >= Duration::from_millis(200));
        for _ in 0..30 {
            q.fail(&"a");
        }
        assert!(b.delay(q.fail(&"a")) <= Duration::from_millis(1250), "capped, and no overflow");
        q.forget(&"a");
        assert_eq!(q.failures(&"a"), 0);
    }
}
