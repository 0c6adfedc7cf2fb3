//! Leader election on a `Lease` object: several controllers may run, one
//! acts. The holder renews the lease; another takes it over once it has
//! seen no renewal for the lease's duration, measured on its own clock (so
//! clock skew between hosts does not matter) from the moment it saw the
//! last renewal arrive on its watch of the lease.
//!
//! A leader that cannot renew in time stops acting before anyone else may
//! start, then campaigns again in the same process: when the apiserver was
//! only away for a while, the lease still names it and it leads again at
//! once.
//!
//! Timing alone cannot keep two leaders apart: a leader paused (SIGSTOP, a
//! stalled VM, a long GC) does not know that its term ended. So every
//! write of a leader carries a fence naming its term (holder and the
//! lease's transition count, see [`nexus_api::lease::Fence`]); the
//! apiserver checks it against the lease in the write's own transaction
//! and refuses it once another holds the lease, and the first such
//! refusal ends this process's term at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use nexus_api::lease::Fence;
use nexus_api::{Lease, LeaseSpec};
use nexus_client::{Client, ClientError};

use super::store::Store;

/// Name of the controllers' lease.
pub const LEASE: &str = "nexus-controller";

/// One contender for the lease.
#[derive(Debug)]
pub struct Elector {
    api: Client,
    identity: String,
    duration: Duration,
    /// The lease as the reflector sees it.
    leases: Store<LeaseSpec>,
    /// The lease's holder and renewal as last seen, and since when.
    observed: Mutex<Option<Observation>>,
}

/// A lease's holder and renewal time, as seen at `since`.
#[derive(Debug, Clone, PartialEq)]
struct Observation {
    holder: Option<String>,
    renewed: Option<String>,
    since: Instant,
}

impl Elector {
    /// A contender called `identity` for a lease lasting `duration`.
    pub fn new(api: Client, leases: Store<LeaseSpec>, identity: String, duration: Duration) -> Self {
        Elector { api, identity, duration, leases, observed: Mutex::new(None) }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How often the holder renews.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(200))
    }

    /// Records the lease as seen now; returns whether it has looked
    /// unrenewed for a whole duration (or is released).
    fn observe(&self, lease: &LeaseSpec) -> bool {
        let holder = lease.holder_identity.clone();
        let renewed = lease.renew_time.map(|t| t.to_rfc3339());
        let mut seen = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        match seen.as_ref() {
            Some(o) if o.holder == holder && o.renewed == renewed => {
                holder.is_none() || o.since.elapsed() > self.duration
            }
            _ => {
                let released = holder.is_none();
                *seen = Some(Observation { holder, renewed, since: Instant::now() });
                released
            }
        }
    }

    /// How long until the lease, as last observed, turns stale.
    fn until_stale(&self) -> Duration {
        let seen = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        match seen.as_ref() {
            Some(o) => (self.duration + Duration::from_millis(10)).saturating_sub(o.since.elapsed()),
            None => self.retry_period(),
        }
    }

    /// One attempt to take or renew the lease; `Ok(true)` if we hold it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, ClientError> {
        let now = Utc::now();
        let secs = self.duration.as_secs().max(1) as u32;
        let mut lease: Lease = match self.api.get::<LeaseSpec>("", LEASE).await {
            Ok(l) => l,
            Err(e) if e.is_not_found() => {
                let spec = LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: secs,
                    acquire_time: Some(now),
                    renew_time: Some(now),
                    lease_transitions: 0,
                };
                return match self.api.create(&Lease::new(LEASE, None, spec)).await {
                    Ok(held) => Ok(self.holding(&held)),
                    Err(e) if e.is_conflict() => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let mine = lease.spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !mine && !self.observe(&lease.spec) {
            return Ok(false);
        }
        if !mine {
            lease.spec.holder_identity = Some(self.identity.clone());
            lease.spec.acquire_time = Some(now);
            lease.spec.lease_transitions += 1;
        }
        lease.spec.renew_time = Some(now);
        lease.spec.lease_duration_seconds = secs;
        // Optimistic concurrency: of two contenders, one write wins.
        match self.api.replace(&lease).await {
            Ok(held) => Ok(self.holding(&held)),
            Err(e) if e.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Fences this process's writes with the term of `held` (the lease as
    /// just written by this process); true.
    fn holding(&self, held: &Lease) -> bool {
        self.api.set_fence(Some(&Fence {
            lease: LEASE.to_string(),
            holder: self.identity.clone(),
            transitions: held.spec.lease_transitions,
        }));
        true
    }

    /// Returns once this process holds the lease. Between attempts it waits
    /// for the lease to change on its watch or to turn stale, whichever
    /// comes first, so a dead leader is replaced a lease duration after its
    /// last renewal arrived.
    pub async fn acquire(&self) {
        let mut feed = self.leases.subscribe();
        let mut delays = super::retry_delays();
        loop {
            let cached = self.leases.get_named("", LEASE);
            let attempt = match &cached {
                // Absent, or not listed yet: the apiserver decides.
                None => true,
                Some(l) => {
                    let stale = self.observe(&l.spec);
                    stale || l.spec.holder_identity.as_deref() == Some(self.identity.as_str())
                }
            };
            if attempt {
                match self.try_acquire_or_renew().await {
                    Ok(true) => return,
                    Ok(false) => delays = super::retry_delays(),
                    Err(e) => {
                        tracing::warn!(error = %e, "contending for the lease failed");
                        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
                        continue;
                    }
                }
            }
            let wait = self.until_stale().min(self.retry_period());
            tokio::select! {
                _ = feed.recv() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Renews the lease until it cannot: returns when leadership is lost
    /// (another holder, or no successful renewal for nearly a duration —
    /// early enough that nobody else may have started, or a write refused
    /// as fenced off: another holds the lease already).
    pub async fn hold(&self) {
        let mut last_renewed = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.retry_period()) => {}
                _ = self.api.fenced_off() => {
                    tracing::warn!(identity = %self.identity, "a write was refused: another holds the lease");
                    return;
                }
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the lease failed");
                    if last_renewed.elapsed() + self.retry_period() >= self.duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (on shutdown), so a successor need not wait.
    pub async fn release(&self) {
        if let Ok(mut lease) = self.api.get::<LeaseSpec>("", LEASE).await
            && lease.spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            lease.spec.holder_identity = None;
            let _ = self.api.replace(&lease).await;
        }
    }
}
