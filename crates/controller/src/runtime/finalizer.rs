//! The finalizer state machine: what to do with an object given whether it
//! carries our finalizer and whether its deletion was requested.

use nexus_api::{Object, ResourceSpec};

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
