//! Reflector stores: the in-memory copy of one kind that controllers read.
//!
//! A [`Writer`] belongs to the kind's reflector, the only thing that applies
//! what the apiserver streams. Everyone else holds a [`Store`]: reads,
//! indexes, a change feed, and [`Store::record_write`], through which a
//! controller makes its own just-acknowledged writes visible to its next
//! read (never replacing a newer version).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use nexus_api::{Object, ResourceSpec};
use tokio::sync::{broadcast, watch};

/// A project and a name: how controllers name the objects they work on.
/// The project is empty for cluster-wide kinds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub project: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(project: &str, name: &str) -> Self {
        ObjectKey { project: project.to_string(), name: name.to_string() }
    }

    /// The key of `obj`.
    pub fn of<S: ResourceSpec>(obj: &Object<S>) -> Self {
        ObjectKey { project: obj.metadata.project.clone().unwrap_or_default(), name: obj.name().to_string() }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.project.is_empty() { f.write_str(&self.name) } else { write!(f, "{}/{}", self.project, self.name) }
    }
}

/// The numeric `metadata.resourceVersion` of `obj` (0 when absent).
pub fn version_of<S: ResourceSpec>(obj: &Object<S>) -> u64 {
    obj.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Computes the index values of an object (`spec.nodeName`, owner uids).
pub type IndexFn<S> = Arc<dyn Fn(&Object<S>) -> Vec<String> + Send + Sync>;

/// Index of the objects in each project.
pub const BY_PROJECT: &str = "project";
/// Index of the objects owned by each owner uid.
pub const BY_OWNER: &str = "owner";

/// How many changes a slow subscriber may fall behind before it is told to
/// look at everything again.
const FEED_CAPACITY: usize = 4096;

/// Changes the store remembers for [`Store::changed_since`]: a reader
/// further behind than this starts over from every object.
pub(crate) const LOG_CAPACITY: usize = 8192;

struct Index<S: ResourceSpec> {
    compute: IndexFn<S>,
    entries: HashMap<String, BTreeSet<ObjectKey>>,
}

struct Inner<S: ResourceSpec> {
    objects: HashMap<ObjectKey, Arc<Object<S>>>,
    indexes: HashMap<&'static str, Index<S>>,
    /// The keys of the latest changes (puts and removals), oldest first;
    /// the last one is change number `changes`.
    log: VecDeque<ObjectKey>,
    changes: u64,
}

/// What changed in a store since a reader's cursor ([`Store::changed_since`]).
#[derive(Debug)]
pub enum Changes<S: ResourceSpec> {
    /// The keys changed since the cursor, each with its object as it is
    /// now (`None`: gone), and the cursor to pass next time.
    Since(u64, Vec<(ObjectKey, Option<Arc<Object<S>>>)>),
    /// Every object, and the cursor to pass next time: the reader had no
    /// cursor, or one older than the changes the store remembers.
    All(u64, Vec<Arc<Object<S>>>),
}

impl<S: ResourceSpec> Inner<S> {
    fn unindex(&mut self, key: &ObjectKey, old: &Object<S>) {
        for index in self.indexes.values_mut() {
            for value in (index.compute)(old) {
                if let Some(keys) = index.entries.get_mut(&value) {
                    keys.remove(key);
                    if keys.is_empty() {
                        index.entries.remove(&value);
                    }
                }
            }
        }
    }

    fn index(&mut self, key: &ObjectKey, obj: &Object<S>) {
        for index in self.indexes.values_mut() {
            for value in (index.compute)(obj) {
                index.entries.entry(value).or_default().insert(key.clone());
            }
        }
    }

    fn note(&mut self, key: &ObjectKey) {
        self.changes += 1;
        if self.log.len() == LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(key.clone());
    }

    fn put(&mut self, obj: Arc<Object<S>>) {
        let key = ObjectKey::of(&obj);
        self.note(&key);
        if let Some(old) = self.objects.remove(&key) {
            self.unindex(&key, &old);
        }
        self.index(&key, &obj);
        self.objects.insert(key, obj);
    }

    fn remove(&mut self, key: &ObjectKey) -> Option<Arc<Object<S>>> {
        let old = self.objects.remove(key)?;
        self.note(key);
        self.unindex(key, &old);
        Some(old)
    }
}

struct Shared<S: ResourceSpec> {
    inner: RwLock<Inner<S>>,
    synced: watch::Sender<bool>,
    feed: broadcast::Sender<Update<S>>,
    /// LISTs and watches the reflector made (for metrics and tests).
    lists: AtomicU64,
    watches: AtomicU64,
    /// The request id of each object's latest change, as its watch event
    /// carried it: a reconcile of the object works under that id.
    traces: std::sync::Mutex<HashMap<ObjectKey, String>>,
}

/// One change on a store's feed: the object as it now is (or was, when
/// it was deleted) and the version the store held before, if any. Mappers
/// compare the two to see what changed without keeping state of their own
/// (as an informer's update handler gets the old and the new object).
#[derive(Debug)]
pub struct Update<S: ResourceSpec> {
    pub old: Option<Arc<Object<S>>>,
    pub new: Arc<Object<S>>,
}

impl<S: ResourceSpec> Clone for Update<S> {
    fn clone(&self) -> Self {
        Update { old: self.old.clone(), new: self.new.clone() }
    }
}

/// Read access to the objects of one kind. Cheap to clone; clones share.
pub struct Store<S: ResourceSpec> {
    shared: Arc<Shared<S>>,
}

impl<S: ResourceSpec> Clone for Store<S> {
    fn clone(&self) -> Self {
        Store { shared: self.shared.clone() }
    }
}

impl<S: ResourceSpec> std::fmt::Debug for Store<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("kind", &S::KIND).field("len", &self.len()).finish()
    }
}

/// The reflector's side of a store: the only way to apply the apiserver's stream.
pub struct Writer<S: ResourceSpec> {
    store: Store<S>,
}

impl<S: ResourceSpec> std::fmt::Debug for Writer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("kind", &S::KIND).finish()
    }
}

/// A new, empty store and its writer, indexed by project and by owner.
pub fn store<S: ResourceSpec>() -> (Writer<S>, Store<S>) {
    let mut indexes = HashMap::new();
    let by_project: IndexFn<S> = Arc::new(|o| vec![o.metadata.project.clone().unwrap_or_default()]);
    let by_owner: IndexFn<S> = Arc::new(|o| o.metadata.owner_references.iter().map(|r| r.uid.clone()).collect());
    indexes.insert(BY_PROJECT, Index { compute: by_project, entries: HashMap::new() });
    indexes.insert(BY_OWNER, Index { compute: by_owner, entries: HashMap::new() });
    let shared = Arc::new(Shared {
        inner: RwLock::new(Inner { objects: HashMap::new(), indexes, log: VecDeque::new(), changes: 0 }),
        synced: watch::channel(false).0,
        feed: broadcast::channel(FEED_CAPACITY).0,
        lists: AtomicU64::new(0),
        watches: AtomicU64::new(0),
        traces: Default::default(),
    });
    let store = Store { shared };
    (Writer { store: store.clone() }, store)
}

impl<S: ResourceSpec> Store<S> {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner<S>> {
        self.shared.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner<S>> {
        self.shared.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The object under `key`.
    pub fn get(&self, key: &ObjectKey) -> Option<Arc<Object<S>>> {
        self.read().objects.get(key).cloned()
    }

    /// The object `project/name` (`""` project for cluster-wide kinds).
    pub fn get_named(&self, project: &str, name: &str) -> Option<Arc<Object<S>>> {
        self.get(&ObjectKey::new(project, name))
    }

    /// What changed since `cursor` (a value this returned before; `None`
    /// the first time), for a reader that keeps something derived from
    /// every object up to date at the cost of what changed. Includes the
    /// store's own [`Store::record_write`]s, which the change feed does not.
    pub fn changed_since(&self, cursor: Option<u64>) -> Changes<S> {
        let inner = self.read();
        let oldest = inner.changes - inner.log.len() as u64;
        match cursor {
            Some(c) if c >= oldest && c <= inner.changes => {
                let mut keys: Vec<&ObjectKey> = inner.log.iter().skip((c - oldest) as usize).collect();
                keys.sort_unstable();
                keys.dedup();
                let items = keys.into_iter().map(|k| (k.clone(), inner.objects.get(k).cloned())).collect();
                Changes::Since(inner.changes, items)
            }
            _ => Changes::All(inner.changes, inner.objects.values().cloned().collect()),
        }
    }

    /// Every object, in no particular order.
    pub fn list(&self) -> Vec<Arc<Object<S>>> {
        self.read().objects.values().cloned().collect()
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> Vec<ObjectKey> {
        self.read().objects.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds index `name`, computed by `compute`, over what is stored now and
    /// everything stored from now on. Adding a name twice keeps the first.
    pub fn add_index(&self, name: &'static str, compute: impl Fn(&Object<S>) -> Vec<String> + Send + Sync + 'static) {
        let mut inner = self.write();
        if inner.indexes.contains_key(name) {
            return;
        }
        let compute: IndexFn<S> = Arc::new(compute);
        let mut entries: HashMap<String, BTreeSet<ObjectKey>> = HashMap::new();
        for (key, obj) in &inner.objects {
            for value in compute(obj) {
                entries.entry(value).or_default().insert(key.clone());
            }
        }
        inner.indexes.insert(name, Index { compute, entries });
    }

    /// The objects whose index `name` has `value`, in key order. Empty for
    /// an index that does not exist.
    pub fn by_index(&self, name: &str, value: &str) -> Vec<Arc<Object<S>>> {
        let inner = self.read();
        let Some(keys) = inner.indexes.get(name).and_then(|i| i.entries.get(value)) else { return Vec::new() };
        keys.iter().filter_map(|k| inner.objects.get(k).cloned()).collect()
    }

    /// Whether the first list has been loaded.
    pub fn is_synced(&self) -> bool {
        *self.shared.synced.borrow()
    }

    /// Returns once the first list has been loaded.
    pub async fn wait_synced(&self) {
        let mut rx = self.shared.synced.subscribe();
        // The sender lives as long as the store: this cannot fail.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Every object the reflector applies from now on (also deletions, as
    /// the object's last state), after the store holds the change. A
    /// receiver that lags gets `Lagged` and should look at everything.
    pub fn subscribe(&self) -> broadcast::Receiver<Update<S>> {
        self.shared.feed.subscribe()
    }

    /// How many LISTs the reflector has made to fill this store.
    pub fn lists(&self) -> u64 {
        self.shared.lists.load(Ordering::Relaxed)
    }

    /// How many watches the reflector has opened.
    pub fn watches(&self) -> u64 {
        self.shared.watches.load(Ordering::Relaxed)
    }

    /// The id of the request behind `key`'s latest change, if the watch said.
    pub fn trace(&self, key: &ObjectKey) -> Option<String> {
        self.shared.traces.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Makes an object the apiserver just answered to one of our writes
    /// visible to our next read, unless the store already holds the same
    /// or a newer version (the reflector will deliver it too).
    pub fn record_write(&self, obj: Object<S>) {
        let key = ObjectKey::of(&obj);
        let mut inner = self.write();
        if inner.objects.get(&key).is_some_and(|old| version_of(old) >= version_of(&obj)) {
            return;
        }
        inner.put(Arc::new(obj));
    }
}

impl<S: ResourceSpec> Writer<S> {
    /// The readers' side.
    pub fn store(&self) -> Store<S> {
        self.store.clone()
    }

    /// Counts a LIST made for this store.
    pub fn count_list(&self) {
        self.store.shared.lists.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a watch opened for this store.
    pub fn count_watch(&self) {
        self.store.shared.watches.fetch_add(1, Ordering::Relaxed);
    }

    fn notify(&self, old: Option<Arc<Object<S>>>, new: Arc<Object<S>>) {
        // No subscriber is fine: nobody runs yet.
        let _ = self.store.shared.feed.send(Update { old, new });
    }

    /// [`Writer::apply`] of a change made by request `request_id`.
    pub fn apply_traced(&self, obj: Object<S>, request_id: String) {
        let key = ObjectKey::of(&obj);
        {
            let mut traces = self.store.shared.traces.lock().unwrap_or_else(|p| p.into_inner());
            if request_id.is_empty() {
                traces.remove(&key);
            } else {
                traces.insert(key, request_id);
            }
        }
        self.apply(obj);
    }

    /// Applies an ADDED or MODIFIED object, unless a newer one is stored.
    pub fn apply(&self, obj: Object<S>) {
        let obj = Arc::new(obj);
        let old = {
            let mut inner = self.store.write();
            let key = ObjectKey::of(&obj);
            let old = inner.objects.get(&key).cloned();
            if old.as_ref().is_none_or(|old| version_of(old) <= version_of(&obj)) {
                inner.put(obj.clone());
            }
            old
        };
        self.notify(old, obj);
    }

    /// Applies a DELETED object.
    pub fn delete(&self, obj: Object<S>) {
        self.store.shared.traces.lock().unwrap_or_else(|p| p.into_inner()).remove(&ObjectKey::of(&obj));
        let old = self.store.write().remove(&ObjectKey::of(&obj));
        self.notify(old, Arc::new(obj));
    }

    /// Replaces everything with a fresh list and marks the store synced.
    /// Every listed object, and every stored one the list no longer has,
    /// goes out on the change feed.
    pub fn replace(&self, items: Vec<Object<S>>) {
        let fresh: Vec<Arc<Object<S>>> = items.into_iter().map(Arc::new).collect();
        let changes = {
            let mut inner = self.store.write();
            let keep: std::collections::HashSet<ObjectKey> = fresh.iter().map(|o| ObjectKey::of(o)).collect();
            let stale: Vec<ObjectKey> = inner.objects.keys().filter(|k| !keep.contains(*k)).cloned().collect();
            let gone: Vec<Update<S>> = stale
                .iter()
                .filter_map(|k| inner.remove(k))
                .map(|old| Update { old: Some(old.clone()), new: old })
                .collect();
            let listed: Vec<Update<S>> = fresh
                .into_iter()
                .map(|obj| {
                    let old = inner.objects.get(&ObjectKey::of(&obj)).cloned();
                    inner.put(obj.clone());
                    Update { old, new: obj }
                })
                .collect();
            gone.into_iter().chain(listed).collect::<Vec<_>>()
        };
        self.store.shared.synced.send_replace(true);
        for Update { old, new } in changes {
            self.notify(old, new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::{Node, NodeSpec, VmSpec};

    fn node(name: &str, rv: u64) -> Node {
        let mut n = Node::new(name, None, NodeSpec::default());
        n.metadata.resource_version = Some(rv.to_string());
        n
    }

    #[test]
    fn a_reader_gets_each_key_changed_since_its_cursor_once_with_its_object_now() {
        let (writer, store) = store::<NodeSpec>();
        let Changes::All(cursor, all) = store.changed_since(None) else { panic!("a first read is everything") };
        assert!(all.is_empty());
        writer.apply(node("a", 1));
        writer.apply(node("a", 2));
        store.record_write(node("b", 3));
        writer.delete(node("c", 4));
        let Changes::Since(next, changed) = store.changed_since(Some(cursor)) else { panic!("within the log") };
        let seen: Vec<(String, Option<u64>)> =
            changed.iter().map(|(k, o)| (k.name.clone(), o.as_deref().map(version_of))).collect();
        assert_eq!(seen, [("a".to_string(), Some(2)), ("b".to_string(), Some(3))], "c was never stored");
        writer.delete(node("a", 5));
        let Changes::Since(_, changed) = store.changed_since(Some(next)) else { panic!("within the log") };
        assert_eq!(changed.len(), 1);
        assert!(changed[0].1.is_none(), "gone");
        // A cursor older than the log starts the reader over.
        for rv in 0..LOG_CAPACITY as u64 {
            writer.apply(node("b", 10 + rv));
        }
        assert!(matches!(store.changed_since(Some(next)), Changes::All(_, ref all) if all.len() == 1));
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let (writer, store) = store::<NodeSpec>();
        writer.apply(node("a", 5));
        store.record_write(node("a", 4));
        writer.apply(node("a", 3));
        assert_eq!(store.get_named("", "a").unwrap().metadata.resource_version.as_deref(), Some("5"));
        store.record_write(node("a", 6));
        assert_eq!(store.get_named("", "a").unwrap().metadata.resource_version.as_deref(), Some("6"));
    }

    #[tokio::test]
    async fn a_relist_reports_what_vanished_and_marks_the_store_synced() {
        let (writer, store) = store::<NodeSpec>();
        let mut feed = store.subscribe();
        assert!(!store.is_synced());
        writer.apply(node("a", 1));
        writer.apply(node("b", 2));
        writer.replace(vec![node("b", 3), node("c", 4)]);
        assert!(store.is_synced());
        let mut seen = Vec::new();
        while let Ok(u) = feed.try_recv() {
            let old = u.old.map(|o| format!("{}@{}->", o.name(), version_of(&o))).unwrap_or_default();
            seen.push(format!("{old}{}@{}", u.new.name(), version_of(&u.new)));
        }
        assert_eq!(
            seen,
            ["a@1", "b@2", "a@1->a@1", "b@2->b@3", "c@4"],
            "the vanished a is announced before the listed ones, each with what the store held"
        );
        tokio::time::timeout(std::time::Duration::from_millis(10), store.wait_synced()).await.expect("synced");
        let mut names: Vec<_> = store.keys().into_iter().map(|k| k.name).collect();
        names.sort();
        assert_eq!(names, ["b", "c"]);
    }

    #[test]
    fn indexes_follow_changes_and_deletions() {
        let (writer, store) = store::<VmSpec>();
        store.add_index("node", |vm| vm.spec.node_name.iter().cloned().collect());
        let mut vm = nexus_api::Vm::new("a", Some("p"), VmSpec { node_name: Some("n1".into()), ..Default::default() });
        vm.metadata.resource_version = Some("1".into());
        writer.apply(vm.clone());
        assert_eq!(store.by_index("node", "n1").len(), 1);
        assert_eq!(store.by_index(BY_PROJECT, "p").len(), 1);
        vm.spec.node_name = Some("n2".into());
        vm.metadata.resource_version = Some("2".into());
        writer.apply(vm.clone());
        assert!(store.by_index("node", "n1").is_empty(), "moved off n1");
        assert_eq!(store.by_index("node", "n2").len(), 1);
        writer.delete(vm);
        assert!(store.by_index("node", "n2").is_empty());
        assert!(store.by_index(BY_PROJECT, "p").is_empty());
        assert!(store.by_index("no-such-index", "x").is_empty());
    }
}
