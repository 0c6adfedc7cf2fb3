//! Deletion behind a finalizer, as kube-runtime's `finalizer()` does it:
//! [`Finalizer::run`] adds the finalizer to a live object, hands the
//! reconciler an [`Event`] (apply while it lives, clean up once its
//! deletion was asked for), and removes the finalizer after a cleanup that
//! finished. [`step`] is the state machine underneath: what to do given
//! whether the object carries the finalizer and whether it is deleting.

use std::future::Future;
use std::sync::Arc;

use nexus_api::{Object, ResourceSpec};
use nexus_client::{Client, ClientError};

use super::controller::Action;
use super::store::Store;

/// What the reconciler is asked to do with an object.
#[derive(Debug)]
pub enum Event<S: ResourceSpec> {
    /// The object lives: converge it. It carries the finalizer, unless the
    /// finalizer's [`Finalizer::added_by_reconciler`] says the reconciler
    /// adds it in its own first write.
    Apply(Object<S>),
    /// Its deletion was asked for: clean up what the finalizer guards.
    /// Answering [`Action::AwaitChange`] means the cleanup is complete
    /// (the finalizer is then removed); [`Action::RequeueAfter`] means it is
    /// under way and the object is looked at again.
    Cleanup(Object<S>),
}

/// A finalizer of one kind and the clients to write it with.
#[derive(Debug, Clone)]
pub struct Finalizer<S: ResourceSpec> {
    api: Client,
    store: Store<S>,
    name: &'static str,
    deferred: fn(&Object<S>) -> bool,
}

impl<S: ResourceSpec> Finalizer<S> {
    /// Finalizer `name` on the objects of `store`, written through `api`.
    pub fn new(api: Client, store: Store<S>, name: &'static str) -> Self {
        Finalizer { api, store, name, deferred: |_| false }
    }

    /// This finalizer, left for the reconciler to add with its own first
    /// write on the objects `deferred` picks (saving a write: a VM the
    /// scheduler places gets it with its node).
    pub fn added_by_reconciler(mut self, deferred: fn(&Object<S>) -> bool) -> Self {
        self.deferred = deferred;
        self
    }

    /// The finalizer's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// One reconcile of `obj` through the finalizer's states.
    ///
    /// # Errors
    /// The reconciler's own, and failures to write the finalizer (as `E`).
    pub async fn run<E, F, Fut>(&self, obj: Arc<Object<S>>, reconcile: F) -> Result<Action, E>
    where
        E: From<ClientError>,
        F: FnOnce(Event<S>) -> Fut,
        Fut: Future<Output = Result<Action, E>>,
    {
        let obj = (*obj).clone();
        match step(&obj, self.name) {
            Step::Done => Ok(Action::AwaitChange),
            Step::Apply => reconcile(Event::Apply(obj)).await,
            Step::Add if (self.deferred)(&obj) => reconcile(Event::Apply(obj)).await,
            Step::Add => {
                let written = self.api.replace(&with(&obj, self.name)).await?;
                self.store.record_write(written.clone());
                reconcile(Event::Apply(written)).await
            }
            Step::Cleanup => match reconcile(Event::Cleanup(obj.clone())).await? {
                Action::AwaitChange => {
                    self.remove(&obj).await?;
                    Ok(Action::AwaitChange)
                }
                under_way => Ok(under_way),
            },
        }
    }

    /// Removes the finalizer from the freshest copy of `obj` the store
    /// holds; when that copy turns out stale (its list of finalizers may
    /// have changed since), from the apiserver's. An object already gone
    /// is fine.
    async fn remove(&self, obj: &Object<S>) -> Result<(), ClientError> {
        let project = obj.metadata.project.as_deref().unwrap_or_default();
        let cached = self.store.get_named(project, obj.name()).filter(|c| c.metadata.uid == obj.metadata.uid);
        let cached = cached.map_or_else(|| obj.clone(), |c| (*c).clone());
        match self.api.replace(&without(&cached, self.name)).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e),
        }
        let latest = match self.api.get::<S>(project, obj.name()).await {
            Ok(latest) => latest,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        match self.api.replace(&without(&latest, self.name)).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The step a reconcile takes for the finalizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not ours yet: add the finalizer (and come back on the resulting change).
    Add,
    /// Live and ours: reconcile as usual.
    Apply,
    /// Deleting and still ours: clean up, then remove the finalizer.
    Cleanup,
    /// Deleting and no longer ours: nothing to do.
    Done,
}

/// Decides the step for `obj` and finalizer `name`.
pub fn step<S: ResourceSpec>(obj: &Object<S>, name: &str) -> Step {
    let ours = obj.metadata.finalizers.iter().any(|f| f == name);
    match (obj.is_deleting(), ours) {
        (false, false) => Step::Add,
        (false, true) => Step::Apply,
        (true, true) => Step::Cleanup,
        (true, false) => Step::Done,
    }
}

/// `obj` with finalizer `name` added (once).
pub fn with<S: ResourceSpec>(obj: &Object<S>, name: &str) -> Object<S> {
    let mut next = obj.clone();
    if !next.metadata.finalizers.iter().any(|f| f == name) {
        next.metadata.finalizers.push(name.to_string());
    }
    next
}

/// `obj` with finalizer `name` removed.
pub fn without<S: ResourceSpec>(obj: &Object<S>, name: &str) -> Object<S> {
    let mut next = obj.clone();
    next.metadata.finalizers.retain(|f| f != name);
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::{NodeSpec, Object};

    #[test]
    fn each_combination_maps_to_one_step_and_edits_are_idempotent() {
        let mut o: Object<NodeSpec> = Object::new("n", None, NodeSpec::default());
        assert_eq!(step(&o, "f"), Step::Add);
        o = with(&with(&o, "f"), "f");
        assert_eq!(o.metadata.finalizers, vec!["f".to_string()]);
        assert_eq!(step(&o, "f"), Step::Apply);
        o.metadata.deletion_timestamp = Some(chrono::Utc::now());
        assert_eq!(step(&o, "f"), Step::Cleanup);
        o = without(&o, "f");
        assert_eq!(step(&o, "f"), Step::Done);
    }
}
