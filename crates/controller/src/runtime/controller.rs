//! `Controller<R>`: runs one [`Reconciler`] over the objects of its kind.
//!
//! Changes of the kind, and of related kinds through mappers
//! ([`Controller::watches`], [`Controller::owns`]), only queue keys; workers
//! take keys from a deduplicating queue and reconcile each from the store,
//! never the same key twice at once. A reconcile says when to look again
//! ([`Action`]); a failure goes back on the queue after the reconciler's
//! error policy's delay. Every key is queued again every resync period.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nexus_api::{Object, ResourceSpec};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::queue::{Backoff, WorkQueue};
use super::store::{ObjectKey, Store};

/// What to do with a key after a successful reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look again after this long even if nothing changes.
    RequeueAfter(Duration),
    /// Wait for the next change (or the resync).
    AwaitChange,
}

/// The logic of one controller: converge one object towards its spec.
///
/// `reconcile` reads the object (and anything else) from stores, writes to
/// the apiserver, and must be idempotent: it may run again for the same
/// state at any time, after a crash or a leader change included. It must
/// never branch on what woke it.
pub trait Reconciler: Send + Sync + 'static {
    /// The kind reconciled.
    type Spec: ResourceSpec;
    /// Failures worth a retry after a backoff.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Converges `obj`, the current state of the key from the store.
    fn reconcile(&self, obj: Arc<Object<Self::Spec>>) -> impl Future<Output = Result<Action, Self::Error>> + Send;

    /// When to try again after `error`, the `failures`-th in a row for this
    /// object (1 for the first). Defaults to exponential backoff from 200 ms
    /// to 30 s.
    fn error_policy(&self, obj: &Object<Self::Spec>, error: &Self::Error, failures: u32) -> Duration {
        let _ = (obj, error);
        Backoff::default().delay(failures)
    }
}

/// Queues every object of the controller's kind (after lost changes).
type EnqueueAll = Arc<dyn Fn() + Send + Sync>;

/// Starts feeding a queue from one store's changes.
type Feed = Box<dyn Fn(Arc<WorkQueue<ObjectKey>>, EnqueueAll) -> BoxFuture<'static, ()> + Send + Sync>;

/// A source of keys: subscribes to a store and maps its changes.
struct Trigger {
    /// Feeds the queue until the store's feed ends; the `EnqueueAll` is
    /// called when the feed lagged and changes were lost.
    run: Feed,
    /// Returns once the store has its first list.
    synced: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
}

/// Runs a reconciler over the objects of its kind.
pub struct Controller<R: Reconciler> {
    name: &'static str,
    reconciler: Arc<R>,
    store: Store<R::Spec>,
    triggers: Vec<Trigger>,
    workers: usize,
    resync: Duration,
}

impl<R: Reconciler> std::fmt::Debug for Controller<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.name)
            .field("triggers", &self.triggers.len())
            .field("workers", &self.workers)
            .field("resync", &self.resync)
            .finish()
    }
}

/// Feeds `queue` with `map(obj)` for every change in `store`.
fn trigger<K: ResourceSpec>(
    store: Store<K>,
    map: impl Fn(Option<&Object<K>>, &Object<K>) -> Vec<ObjectKey> + Send + Sync + 'static,
) -> Trigger {
    let map = Arc::new(map);
    let synced_store = store.clone();
    Trigger {
        run: Box::new(move |queue, resync| {
            let mut feed = store.subscribe();
            let map = map.clone();
            Box::pin(async move {
                loop {
                    match feed.recv().await {
                        Ok(u) => map(u.old.as_deref(), &u.new).into_iter().for_each(|k| queue.add(k)),
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(kind = K::KIND, missed, "change feed lagged; looking at everything");
                            resync();
                        }
                        Err(RecvError::Closed) => return,
                    }
                }
            })
        }),
        synced: Box::new(move || {
            let s = synced_store.clone();
            Box::pin(async move { s.wait_synced().await })
        }),
    }
}

impl<R: Reconciler> Controller<R> {
    /// A controller named `name` (in logs and metrics) running `reconciler`
    /// over the objects in `store`, triggered by their changes.
    pub fn new(name: &'static str, store: Store<R::Spec>, reconciler: R) -> Self {
        let own = trigger(store.clone(), |_, o: &Object<R::Spec>| vec![ObjectKey::of(o)]);
        Controller {
            name,
            reconciler: Arc::new(reconciler),
            store,
            triggers: vec![own],
            workers: 4,
            resync: Duration::from_secs(300),
        }
    }

    /// Also reconciles the objects `map` names whenever an object of kind
    /// `K` in `store` changes.
    pub fn watches<K: ResourceSpec>(
        self,
        store: Store<K>,
        map: impl Fn(&Object<K>) -> Vec<ObjectKey> + Send + Sync + 'static,
    ) -> Self {
        self.watches_updates(store, move |_, new| map(new))
    }

    /// [`Controller::watches`], with the mapper also given the version of
    /// the object the store held before the change (`None` when it had
    /// none): a mapper that only cares about some changes compares the two,
    /// keeping no state of its own.
    pub fn watches_updates<K: ResourceSpec>(
        mut self,
        store: Store<K>,
        map: impl Fn(Option<&Object<K>>, &Object<K>) -> Vec<ObjectKey> + Send + Sync + 'static,
    ) -> Self {
        self.triggers.push(trigger(store, map));
        self
    }

    /// Also reconciles an object whenever an object of kind `C` it owns
    /// (by owner reference, in the same project) changes.
    pub fn owns<C: ResourceSpec>(self, store: Store<C>) -> Self {
        self.watches(store, |child: &Object<C>| {
            let project = child.metadata.project.clone().unwrap_or_default();
            child
                .metadata
                .owner_references
                .iter()
                .filter(|r| r.kind == R::Spec::KIND)
                .map(|r| ObjectKey { project: project.clone(), name: r.name.clone() })
                .collect()
        })
    }

    /// How many keys are reconciled at once (default 4).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// How often every object is queued again whatever happened (default 5 min).
    pub fn resync(mut self, every: Duration) -> Self {
        self.resync = every.max(Duration::from_millis(100));
        self
    }

    /// The controller's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs until the returned future is dropped: waits for every store it
    /// reads to be synced, queues every object, then reconciles forever.
    /// Dropping the future stops every task it started.
    pub async fn run(&self) {
        let queue: Arc<WorkQueue<ObjectKey>> = Arc::new(WorkQueue::new());
        let mut tasks = JoinSet::new();
        let enqueue_all: EnqueueAll = {
            let (store, queue) = (self.store.clone(), queue.clone());
            Arc::new(move || store.keys().into_iter().for_each(|k| queue.add(k)))
        };
        // Subscribe before anything is read, so no change falls in between.
        for t in &self.triggers {
            tasks.spawn((t.run)(queue.clone(), enqueue_all.clone()));
        }
        let started = Instant::now();
        for t in &self.triggers {
            (t.synced)().await;
        }
        tracing::info!(
            controller = self.name,
            objects = self.store.len(),
            millis = started.elapsed().as_millis() as u64,
            "caches synced; starting workers"
        );
        enqueue_all();
        {
            let (every, enqueue_all) = (self.resync, enqueue_all.clone());
            tasks.spawn(async move {
                let mut ticker = tokio::time::interval(every);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    enqueue_all();
                }
            });
        }
        for _ in 0..self.workers {
            let (queue, store, reconciler, name) =
                (queue.clone(), self.store.clone(), self.reconciler.clone(), self.name);
            tasks.spawn(async move {
                loop {
                    let key = queue.next().await;
                    work(name, &*reconciler, &store, &queue, &key).await;
                    queue.done(&key);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn work<R: Reconciler>(
    name: &'static str,
    reconciler: &R,
    store: &Store<R::Spec>,
    queue: &WorkQueue<ObjectKey>,
    key: &ObjectKey,
) {
    metrics::gauge!("nexus_controller_queue_depth", "controller" => name).set(queue.len() as f64);
    // Gone from the store: deleted, and nothing (no finalizer) keeps it.
    let Some(obj) = store.get(key) else {
        queue.forget(key);
        return;
    };
    let started = Instant::now();
    // The reconcile works for the request behind the object's latest
    // change: its id goes with every call made (see `nexus_client::trace`).
    let request_id = store.trace(key).unwrap_or_else(nexus_client::trace::new_id);
    let span = tracing::info_span!("reconcile", controller = name, object = %key, request_id = %request_id);
    // Boxed: a reconciler's future can be large (it holds objects across
    // its awaits), and the worker's stack should not have to hold it.
    let reconcile = Box::pin(reconciler.reconcile(obj.clone()));
    let result = nexus_client::trace::scope(request_id.clone(), reconcile.instrument(span.clone())).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    span.in_scope(|| {
        tracing::debug!(result = outcome, latency_ms = started.elapsed().as_secs_f64() * 1000.0, "reconciled");
    });
    metrics::counter!("nexus_controller_reconcile_total", "controller" => name, "result" => outcome).increment(1);
    metrics::histogram!("nexus_controller_reconcile_duration_seconds", "controller" => name, "result" => outcome)
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(Action::RequeueAfter(d)) => {
            queue.forget(key);
            queue.add_after(key.clone(), d);
        }
        Ok(Action::AwaitChange) => queue.forget(key),
        Err(e) => {
            let failures = queue.fail(key);
            let delay = reconciler.error_policy(&obj, &e, failures);
            queue.add_after(key.clone(), delay);
            metrics::counter!("nexus_controller_retries_total", "controller" => name).increment(1);
            tracing::warn!(
                controller = name,
                object = %key,
                error = %chain(&e),
                failures,
                retry_in_ms = delay.as_millis() as u64,
                "reconcile failed"
            );
        }
    }
}

/// An error and its causes, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

/// A controller of any kind, as the manager runs it: once per leadership
/// term, stopped by dropping the future.
pub trait Runnable: Send + Sync {
    fn name(&self) -> &'static str;
    fn run(&self) -> BoxFuture<'_, ()>;
}

impl<R: Reconciler> Runnable for Controller<R> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run(&self) -> BoxFuture<'_, ()> {
        Box::pin(Controller::run(self))
    }
}
