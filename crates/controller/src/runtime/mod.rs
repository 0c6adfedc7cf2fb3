//! The reusable controller runtime, apart from the controllers built on it
//! (the way kube-runtime is apart from the controllers that use it). It
//! knows `ResourceSpec`, never a particular kind:
//!
//! - [`reflector`]: one list-then-watch per kind keeps a [`store::Store`]
//!   current, resuming from the last version seen;
//! - [`store`]: readers, indexes and a change feed over what reflectors keep;
//! - [`queue`]: a deduplicating work queue with delayed requeues;
//! - [`controller`]: `Controller<R>` runs a [`controller::Reconciler`] from
//!   changes of its kind and, through mappers, of related kinds;
//! - [`leader`]: leader election on a Lease;
//! - [`manager`]: runs every controller while this process leads;
//! - [`finalizer`], [`status`], [`events`]: the steps reconcilers share
//!   (deletion behind a finalizer, status writes, Events).

pub mod controller;
pub mod events;
pub mod finalizer;
pub mod leader;
pub mod manager;
pub mod queue;
pub mod reflector;
pub mod status;
pub mod store;

use std::time::Duration;

use backon::BackoffBuilder;

pub use controller::{Action, Controller, Reconciler, Runnable};
pub use manager::Manager;
pub use reflector::Reflectors;
pub use store::{ObjectKey, Store, Update};

/// Delays between attempts while the apiserver does not answer: short, so
/// a returning apiserver is followed within a second. The jitter adds up to
/// the delay itself, so the delay is capped at half of that second.
pub(crate) fn retry_delays() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_retry_waits_a_second_or_more() {
        let longest = retry_delays().take(1000).max().unwrap_or_default();
        assert!(longest < Duration::from_secs(1), "{longest:?}");
        assert!(longest >= Duration::from_millis(500), "the delays grow to their cap: {longest:?}");
    }
}
