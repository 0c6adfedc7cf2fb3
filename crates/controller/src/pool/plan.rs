//! What one pass over a pool decides, as a pure function of the pool, the
//! VMs it owns and the time: which revision is rolled out and at which
//! step, how many VMs of each revision are wanted, which VMs to delete and
//! which to create, and the status and events that go with it.
//!
//! The rollout's state lives in the pool's status (revision, step, phase,
//! when the step began), so a new leader picks it up where the old one
//! left it; everything else is read from the VMs themselves, so running
//! the same pass twice decides the same thing.
//!
//! Replacing VMs respects the strategy's limits: at most `replicas +
//! maxSurge` VMs exist, and an available VM is deleted only while at
//! least `replicas - maxUnavailable` stay available. VMs that are not
//! available (still booting, failing their probe) go first.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nexus_api::conditions;
use nexus_api::event::EventType;
use nexus_api::meta::set_condition;
use nexus_api::pool::{PoolRevision, RolloutPhase, RolloutStatus, VmPool, VmPoolStatus, VmTemplate, selector_text};
use nexus_api::{ConditionStatus, VmPhase};

/// One VM of the pool, as the plan sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    /// The hash of the revision it was made from.
    pub revision: String,
    pub created: DateTime<Utc>,
    pub phase: VmPhase,
    /// Since when it is Ready, while it is.
    pub ready_since: Option<DateTime<Utc>>,
    /// Why it is not Ready (its Ready condition's reason and message).
    pub why: String,
}

impl Member {
    /// Ended on its own for good (`Succeeded` or `Failed`).
    fn dead(&self) -> bool {
        matches!(self.phase, VmPhase::Succeeded | VmPhase::Failed)
    }

    fn ready(&self) -> bool {
        self.phase == VmPhase::Running && self.ready_since.is_some()
    }

    /// Ready for at least `min_ready`.
    fn available(&self, now: DateTime<Utc>, min_ready: chrono::Duration) -> bool {
        self.ready() && self.ready_since.is_some_and(|t| now - t >= min_ready)
    }
}

/// An event to record on the pool: its type, reason and message.
pub type Note = (EventType, &'static str, String);

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// One entry per VM to create: the hash of its revision.
    pub create: Vec<String>,
    /// VMs to delete, by name.
    pub delete: Vec<String>,
    /// The pool's status after this pass.
    pub status: VmPoolStatus,
    pub events: Vec<Note>,
    /// When to look again though nothing changes (a VM's minReadySeconds
    /// or progress deadline, or the end of a pause, comes due).
    pub requeue: Option<Duration>,
}

/// Decides one pass over `pool`, whose live VMs (not being deleted) are
/// `members`, at `now`.
pub fn plan(pool: &VmPool, members: &[Member], now: DateTime<Utc>) -> Plan {
    let spec = &pool.spec;
    let strategy = &spec.update_strategy;
    let replicas = spec.replicas;
    let min_ready = chrono::Duration::seconds(i64::from(strategy.min_ready_seconds));
    let deadline = chrono::Duration::seconds(i64::from(strategy.progress_deadline_seconds));
    let pause = chrono::Duration::seconds(i64::from(strategy.pause_seconds));
    let mut status = pool.status_or_default();
    let mut events: Vec<Note> = Vec::new();

    let update = record_revision(&mut status, &spec.template, now);
    let update_hash = spec.template.hash();
    // A new pool starts on its first revision: nothing to roll out.
    let current = *status.current_revision.get_or_insert(update);
    let stable_hash = status.revision(current).map(|r| r.hash.clone()).unwrap_or_else(|| update_hash.clone());

    let count = |hash: &str| members.iter().filter(|m| m.revision == hash).count() as u32;
    let available_of =
        |hash: &str| members.iter().filter(|m| m.revision == hash && m.available(now, min_ready)).count() as u32;
    let steps = strategy.steps.len().max(1) as u32;
    let last = steps - 1;

    let mut rollout = match status.rollout.clone() {
        Some(r) if r.revision == update => r,
        _ if update == current => RolloutStatus {
            revision: update,
            from_revision: None,
            step: last,
            steps,
            step_target: replicas,
            phase: RolloutPhase::Progressing,
            step_started_at: Some(now),
            message: String::new(),
            failed_vms: Vec::new(),
            failure: String::new(),
        },
        _ => {
            events.push((
                EventType::Normal,
                "RolloutStarted",
                format!("rolling out revision {update} over revision {current} in {steps} step(s)"),
            ));
            RolloutStatus {
                revision: update,
                from_revision: Some(current),
                step: 0,
                steps,
                step_target: strategy.step_target(0, replicas),
                phase: RolloutPhase::Progressing,
                step_started_at: Some(now),
                message: String::new(),
                failed_vms: Vec::new(),
                failure: String::new(),
            }
        }
    };
    rollout.steps = steps;
    rollout.step = rollout.step.min(last);

    let mut desired: BTreeMap<String, u32> = BTreeMap::new();
    if update == current {
        // One revision: every VM is of it.
        desired.insert(update_hash.clone(), replicas);
        rollout.step_target = replicas;
        let converged = count(&update_hash) == replicas
            && members.len() as u32 == replicas
            && available_of(&update_hash) == replicas;
        if rollout.phase != RolloutPhase::Complete {
            if converged {
                rollout.phase = RolloutPhase::Complete;
                rollout.failed_vms.clear();
                rollout.failure.clear();
                if status.revisions.len() > 1 {
                    events.push((EventType::Normal, "RolloutComplete", format!("every VM runs revision {update}")));
                }
            } else {
                rollout.phase = RolloutPhase::Progressing;
            }
        }
    } else {
        let held = matches!(rollout.phase, RolloutPhase::Halted | RolloutPhase::RolledBack);
        if spec.paused && !held {
            rollout.phase = RolloutPhase::Paused;
        } else if rollout.phase == RolloutPhase::Paused {
            rollout.phase = RolloutPhase::Progressing;
            rollout.step_started_at = Some(now);
        }
        // The gate: a VM of the new revision that ended, or was not
        // available within the progress deadline, stops the rollout.
        if matches!(rollout.phase, RolloutPhase::Progressing | RolloutPhase::StepPause) {
            let failing: Vec<&Member> = members
                .iter()
                .filter(|m| m.revision == update_hash)
                .filter(|m| m.dead() || (!m.available(now, min_ready) && now - m.created > deadline))
                .collect();
            if let Some(first) = failing.first() {
                rollout.failed_vms = failing.iter().map(|m| m.name.clone()).collect();
                rollout.failure = format!("{}: {}", first.name, first.why);
                let names = rollout.failed_vms.join(", ");
                let why = format!(
                    "{names} of revision {update} did not become available within {}s ({}: {})",
                    strategy.progress_deadline_seconds, first.name, first.why
                );
                if strategy.auto_rollback {
                    rollout.phase = RolloutPhase::RolledBack;
                    events.push((
                        EventType::Warning,
                        "RolloutRolledBack",
                        format!("{why}; going back to revision {current} (autoRollback)"),
                    ));
                } else {
                    rollout.phase = RolloutPhase::Halted;
                    events.push((
                        EventType::Warning,
                        "RolloutHalted",
                        format!("{why}; the rollout stopped at step {} of {steps}", rollout.step + 1),
                    ));
                }
            }
        }
        // Steps whose VMs passed the gate move the rollout on.
        for _ in 0..=steps {
            let target = strategy.step_target(rollout.step as usize, replicas);
            rollout.step_target = target;
            let others = members.len() as u32 - count(&update_hash);
            let step_done = available_of(&update_hash) >= target
                && count(&stable_hash) == replicas - target
                && others == count(&stable_hash);
            match rollout.phase {
                RolloutPhase::Progressing if step_done && rollout.step == last => {
                    rollout.phase = RolloutPhase::Complete;
                    status.current_revision = Some(update);
                    events.push((
                        EventType::Normal,
                        "RolloutComplete",
                        format!("every VM runs revision {update} (was {current})"),
                    ));
                }
                RolloutPhase::Progressing if step_done => {
                    events.push((
                        EventType::Normal,
                        "RolloutStep",
                        format!("step {} of {steps} done: {target} VM(s) run revision {update}", rollout.step + 1),
                    ));
                    rollout.step_started_at = Some(now);
                    if pause > chrono::Duration::zero() {
                        rollout.phase = RolloutPhase::StepPause;
                    } else {
                        rollout.step += 1;
                        continue;
                    }
                }
                RolloutPhase::StepPause if rollout.step_started_at.is_none_or(|t| now - t >= pause) => {
                    rollout.phase = RolloutPhase::Progressing;
                    rollout.step = (rollout.step + 1).min(last);
                    rollout.step_started_at = Some(now);
                    continue;
                }
                _ => {}
            }
            break;
        }
        let target = rollout.step_target;
        match rollout.phase {
            RolloutPhase::Complete => {
                desired.insert(update_hash.clone(), replicas);
            }
            RolloutPhase::RolledBack => {
                desired.insert(stable_hash.clone(), replicas);
            }
            RolloutPhase::Paused => {
                let kept = target.min(count(&update_hash));
                desired.insert(update_hash.clone(), kept);
                desired.insert(stable_hash.clone(), replicas - kept);
            }
            _ => {
                desired.insert(update_hash.clone(), target);
                desired.insert(stable_hash.clone(), replicas - target);
            }
        }
    }

    let (surge, unavailable) = strategy.limits(replicas);
    let halted = rollout.phase == RolloutPhase::Halted;
    // A halted rollout keeps its failed VMs, to be looked at.
    let keep_dead = |m: &Member| halted && m.revision == update_hash;
    let limits = Limits { replicas, surge, unavailable, now, min_ready };
    let (create, delete) = converge(&desired, members, &limits, keep_dead, &update_hash);

    // Status.
    let available = members.iter().filter(|m| m.available(now, min_ready)).count() as u32;
    status.observed_generation = pool.metadata.generation;
    status.replicas = members.len() as u32;
    status.ready_replicas = members.iter().filter(|m| m.ready()).count() as u32;
    status.available_replicas = available;
    status.updated_replicas = count(&update_hash);
    status.update_revision = Some(update);
    status.selector = selector_text(&spec.selector);
    let current = status.current_revision.unwrap_or(update);
    rollout.message = message(&rollout, pool.name(), current, available_of(&update_hash), strategy.pause_seconds);
    let enough = available >= replicas.saturating_sub(unavailable);
    set_condition(
        &mut status.conditions,
        conditions::AVAILABLE,
        if enough { ConditionStatus::True } else { ConditionStatus::False },
        if enough { "MinimumVMsAvailable" } else { "MinimumVMsUnavailable" },
        &format!("{available} of {replicas} VMs available (at most {unavailable} may be unavailable)"),
    );
    let (progressing, reason) = match rollout.phase {
        RolloutPhase::Halted => (ConditionStatus::False, "ProgressDeadlineExceeded"),
        RolloutPhase::RolledBack => (ConditionStatus::False, "RolledBack"),
        RolloutPhase::Paused => (ConditionStatus::Unknown, "RolloutPaused"),
        RolloutPhase::Complete => (ConditionStatus::True, "RolloutComplete"),
        RolloutPhase::Progressing | RolloutPhase::StepPause => (ConditionStatus::True, "ReplacingVMs"),
    };
    set_condition(&mut status.conditions, conditions::PROGRESSING, progressing, reason, &rollout.message);

    // When time alone changes something.
    let mut next: Option<chrono::Duration> = None;
    let mut due = |d: chrono::Duration| {
        if d > chrono::Duration::zero() {
            next = Some(next.map_or(d, |n| n.min(d)));
        }
    };
    for m in members {
        if let Some(t) = m.ready_since.filter(|_| m.ready()) {
            due(t + min_ready - now);
        }
        if m.revision == update_hash && !m.available(now, min_ready) && rollout.phase == RolloutPhase::Progressing {
            due(m.created + deadline - now + chrono::Duration::milliseconds(1));
        }
    }
    if rollout.phase == RolloutPhase::StepPause
        && let Some(t) = rollout.step_started_at
    {
        due(t + pause - now);
    }
    status.rollout = Some(rollout);
    let in_use: BTreeSet<String> = members.iter().map(|m| m.revision.clone()).collect();
    prune(&mut status, spec.revision_history_limit, &in_use);
    let requeue = next.map(|d| d.to_std().unwrap_or_default() + Duration::from_millis(50));
    Plan { create, delete, status, events, requeue }
}

/// Records `template` as the newest revision and returns its number: a new
/// one, or an old one (the same template again, as after an undo) moved to
/// the next number.
fn record_revision(status: &mut VmPoolStatus, template: &VmTemplate, now: DateTime<Utc>) -> u64 {
    let hash = template.hash();
    let newest = status.revisions.iter().map(|r| r.revision).max().unwrap_or(0);
    let number = match status.revisions.iter_mut().find(|r| r.hash == hash) {
        Some(r) if r.revision == newest => newest,
        Some(r) => {
            let old = r.revision;
            r.revision = newest + 1;
            if status.current_revision == Some(old) {
                status.current_revision = Some(newest + 1);
            }
            newest + 1
        }
        None => {
            status.revisions.push(PoolRevision {
                revision: newest + 1,
                hash,
                template: template.clone(),
                created_at: now,
            });
            newest + 1
        }
    };
    status.revisions.sort_by_key(|r| r.revision);
    number
}

/// Drops the oldest revisions beyond `limit` old ones, never the current
/// or update revision or one that VMs still run.
fn prune(status: &mut VmPoolStatus, limit: u32, in_use: &BTreeSet<String>) {
    let keep = [status.current_revision, status.update_revision];
    loop {
        let old: Vec<usize> = status
            .revisions
            .iter()
            .enumerate()
            .filter(|(_, r)| !keep.contains(&Some(r.revision)))
            .map(|(i, _)| i)
            .collect();
        let removable = old.iter().copied().find(|&i| !in_use.contains(&status.revisions[i].hash));
        match removable {
            Some(i) if old.len() > limit as usize => {
                status.revisions.remove(i);
            }
            _ => return,
        }
    }
}

/// What replacing VMs must respect.
struct Limits {
    replicas: u32,
    surge: u32,
    unavailable: u32,
    now: DateTime<Utc>,
    min_ready: chrono::Duration,
}

/// The VMs to create (revision hashes, `first` first) and to delete
/// (names) to move `members` towards `desired` counts per revision.
fn converge(
    desired: &BTreeMap<String, u32>,
    members: &[Member],
    limits: &Limits,
    keep_dead: impl Fn(&Member) -> bool,
    first: &str,
) -> (Vec<String>, Vec<String>) {
    let Limits { replicas, surge, unavailable, now, min_ready } = *limits;
    let mut delete = Vec::new();
    // A VM that ended for good is replaced (unless the rollout keeps it).
    let live: Vec<&Member> = members
        .iter()
        .filter(|m| {
            let drop = m.dead() && !keep_dead(m);
            if drop {
                delete.push(m.name.clone());
            }
            !drop
        })
        .collect();
    let mut have: BTreeMap<&str, Vec<&Member>> = BTreeMap::new();
    for m in &live {
        have.entry(m.revision.as_str()).or_default().push(m);
    }
    // The least useful first: not available, not ready, the newest.
    let rank = |m: &&Member| (m.available(now, min_ready), m.ready(), std::cmp::Reverse(m.created));
    let mut surplus: Vec<&Member> = Vec::new();
    for (rev, ms) in &have {
        let want = desired.get(*rev).copied().unwrap_or(0) as usize;
        if ms.len() > want {
            let mut ms = ms.clone();
            ms.sort_by_key(rank);
            let extra = ms.len() - want;
            surplus.extend(ms.into_iter().take(extra));
        }
    }
    surplus.sort_by_key(rank);
    let mut deficits: Vec<(String, u32)> = desired
        .iter()
        .map(|(rev, want)| (rev.clone(), want.saturating_sub(have.get(rev.as_str()).map_or(0, |v| v.len() as u32))))
        .filter(|(_, n)| *n > 0)
        .collect();
    deficits.sort_by_key(|(rev, _)| rev != first);

    // Scaling one revision down needs no care; replacing does.
    let one_revision = desired.len() == 1 && have.keys().all(|r| desired.contains_key(*r));
    let available = live.iter().filter(|m| m.available(now, min_ready)).count() as u32;
    let mut budget =
        if one_revision { u32::MAX } else { available.saturating_sub(replicas.saturating_sub(unavailable)) };
    let mut removed = 0u32;
    for m in &surplus {
        if m.available(now, min_ready) {
            if budget == 0 {
                continue;
            }
            budget -= 1;
        }
        delete.push(m.name.clone());
        removed += 1;
    }
    let after = live.len() as u32 - removed;
    let mut room = if surplus.is_empty() { u32::MAX } else { (replicas + surge).saturating_sub(after) };
    let mut create = Vec::new();
    for (rev, n) in deficits {
        let k = n.min(room);
        room -= k;
        create.extend(std::iter::repeat_n(rev, k as usize));
    }
    (create, delete)
}

/// The rollout in words.
fn message(r: &RolloutStatus, pool: &str, current: u64, available_new: u32, pause_seconds: u32) -> String {
    let step = format!("step {} of {}", r.step + 1, r.steps);
    match r.phase {
        RolloutPhase::Complete => format!("every VM runs revision {}", r.revision),
        RolloutPhase::Progressing if r.from_revision.is_none() => {
            format!("making every VM run revision {}", r.revision)
        }
        RolloutPhase::Progressing => {
            format!("{step}: {available_new} of {} VM(s) of revision {} available", r.step_target, r.revision)
        }
        RolloutPhase::StepPause => format!("{step} done; the next starts {pause_seconds}s after it"),
        RolloutPhase::Paused => format!("paused at {step} (spec.paused); set it to false to go on"),
        RolloutPhase::Halted => format!(
            "halted at {step}: {} failed the gate ({}); `nexusctl rollout undo vmpool {pool}` goes back to revision {current}",
            r.failed_vms.join(", "),
            r.failure
        ),
        RolloutPhase::RolledBack => format!(
            "rolled back to revision {current} after {} failed the gate at {step} ({})",
            r.failed_vms.join(", "),
            r.failure
        ),
    }
}

#[cfg(test)]
mod tests;
