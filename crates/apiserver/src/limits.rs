//! Per-identity budgets: a token bucket of requests (429 with Retry-After
//! when empty) and a cap on open watches, per identity and in all. The
//! system's own components (the controller, the nodes) have budgets of
//! their own, higher, so a noisy user never starves them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_api::rbac::Subject;

use crate::error::ApiError;

/// Requests per second and burst of one class of identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// The configured budgets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budgets {
    /// People and service accounts.
    pub users: Rate,
    /// The controller and node agents.
    pub system: Rate,
    /// Open watches per person or service account.
    pub user_watches: usize,
    /// Open watches per system component.
    pub system_watches: usize,
    /// Open watches in all.
    pub total_watches: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            users: Rate { per_second: 200.0, burst: 1000.0 },
            system: Rate { per_second: 5000.0, burst: 10_000.0 },
            user_watches: 50,
            system_watches: 500,
            total_watches: 5000,
        }
    }
}

fn is_system(s: &Subject) -> bool {
    matches!(s, Subject::Controller | Subject::Node(_))
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Open {
    by_identity: HashMap<String, usize>,
    total: usize,
}

/// The budgets in force and what is spent.
#[derive(Debug, Default)]
pub struct Limits {
    budgets: Budgets,
    buckets: Mutex<HashMap<String, Bucket>>,
    open: Arc<Mutex<Open>>,
}

/// Holds a watch's place; gives it back when dropped.
#[derive(Debug)]
pub struct WatchSlot {
    open: Arc<Mutex<Open>>,
    identity: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_identity.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.by_identity.remove(&self.identity);
            }
        }
        metrics::gauge!("nexus_apiserver_open_watches").set(o.total as f64);
    }
}

impl Limits {
    pub fn new(budgets: Budgets) -> Self {
        Limits { budgets, ..Default::default() }
    }

    /// Spends one request of `subject`'s budget, or says when to come back.
    pub fn take(&self, subject: &Subject) -> Result<(), ApiError> {
        let rate = if is_system(subject) { self.budgets.system } else { self.budgets.users };
        let key = subject.to_string();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let b = buckets.entry(key).or_insert(Bucket { tokens: rate.burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_second).min(rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - b.tokens) / rate.per_second.max(0.001));
        metrics::counter!("nexus_apiserver_throttled_total").increment(1);
        Err(ApiError::TooManyRequests {
            message: format!(
                "{subject} is over its budget of {} requests per second (burst {})",
                rate.per_second, rate.burst
            ),
            retry_after_secs: wait.as_secs().max(1),
        })
    }

    /// Opens a watch for `subject`, within its cap and the total.
    pub fn open_watch(&self, subject: &Subject) -> Result<WatchSlot, ApiError> {
        let cap = if is_system(subject) { self.budgets.system_watches } else { self.budgets.user_watches };
        let identity = subject.to_string();
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = o.by_identity.get(&identity).copied().unwrap_or(0);
        if mine >= cap {
            return Err(ApiError::TooManyRequests {
                message: format!("{subject} already has {mine} open watches (at most {cap})"),
                retry_after_secs: 5,
            });
        }
        if o.total >= self.budgets.total_watches {
            return Err(ApiError::TooManyRequests {
                message: format!("the server has {} open watches (at most {})", o.total, self.budgets.total_watches),
                retry_after_secs: 5,
            });
        }
        *o.by_identity.entry(identity.clone()).or_insert(0) += 1;
        o.total += 1;
        metrics::gauge!("nexus_apiserver_open_watches").set(o.total as f64);
        Ok(WatchSlot { open: self.open.clone(), identity })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_over_its_budget_waits_and_the_system_is_not_held_up() {
        let limits = Limits::new(Budgets {
            users: Rate { per_second: 1.0, burst: 3.0 },
            system: Rate { per_second: 1000.0, burst: 1000.0 },
            ..Default::default()
        });
        let alice = Subject::User("alice".into());
        for _ in 0..3 {
            limits.take(&alice).unwrap();
        }
        match limits.take(&alice) {
            Err(ApiError::TooManyRequests { retry_after_secs, .. }) => assert_eq!(retry_after_secs, 1),
            other => panic!("{other:?}"),
        }
        for _ in 0..500 {
            limits.take(&Subject::Controller).unwrap();
        }
        limits.take(&Subject::User("bob".into())).unwrap();
    }

    #[test]
    fn watches_are_capped_per_identity_and_given_back_when_they_end() {
        let limits = Limits::new(Budgets { user_watches: 2, total_watches: 3, ..Default::default() });
        let alice = Subject::User("alice".into());
        let a1 = limits.open_watch(&alice).unwrap();
        let _a2 = limits.open_watch(&alice).unwrap();
        assert!(limits.open_watch(&alice).is_err(), "alice's cap");
        let _b = limits.open_watch(&Subject::User("bob".into())).unwrap();
        assert!(limits.open_watch(&Subject::Controller).is_err(), "the total");
        drop(a1);
        assert!(limits.open_watch(&alice).is_ok());
    }
}
