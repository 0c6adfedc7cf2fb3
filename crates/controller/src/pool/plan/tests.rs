//! The pool planner's decisions, case by case.

use nexus_api::VmSpec;
use nexus_api::pool::{Amount, TemplateMetadata, UpdateStrategy, VmPoolSpec};

use super::*;

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("a valid time")
}

fn pool(kernel: &str, strategy: UpdateStrategy) -> VmPool {
    let labels: BTreeMap<String, String> = [("app".to_string(), "ci".to_string())].into();
    let mut p = VmPool::new(
        "ci",
        Some("p"),
        VmPoolSpec {
            replicas: 20,
            selector: labels.clone(),
            template: VmTemplate {
                metadata: TemplateMetadata { labels, annotations: BTreeMap::new() },
                spec: VmSpec { template: Some("small".into()), kernel: Some(kernel.into()), ..Default::default() },
            },
            update_strategy: strategy,
            paused: false,
            revision_history_limit: 10,
        },
    );
    p.metadata.generation = Some(1);
    p
}

fn canary() -> UpdateStrategy {
    UpdateStrategy {
        steps: vec![Amount::Count(1), Amount::Percent("25%".into()), Amount::Percent("100%".into())],
        max_unavailable: Amount::Count(1),
        max_surge: Amount::Count(1),
        progress_deadline_seconds: 30,
        ..Default::default()
    }
}

/// Applies plans to a pool of VMs that are Ready as soon as they are
/// made (or never, for revisions in `bad`).
struct Sim {
    pool: VmPool,
    members: Vec<Member>,
    bad: BTreeSet<String>,
    worst_unavailable: u32,
    created: Vec<String>,
    deleted: Vec<String>,
}

impl Sim {
    fn new(pool: VmPool) -> Self {
        Sim {
            pool,
            members: Vec::new(),
            bad: BTreeSet::new(),
            worst_unavailable: 0,
            created: Vec::new(),
            deleted: Vec::new(),
        }
    }

    fn pass(&mut self, now: DateTime<Utc>) -> Plan {
        let p = plan(&self.pool, &self.members, now);
        self.members.retain(|m| !p.delete.contains(&m.name));
        self.deleted.extend(p.delete.iter().cloned());
        for hash in &p.create {
            let name = format!("vm-{}", self.created.len() + 1);
            let ok = !self.bad.contains(hash);
            self.created.push(name.clone());
            self.members.push(Member {
                name,
                revision: hash.clone(),
                created: now,
                phase: VmPhase::Running,
                ready_since: ok.then_some(now),
                why: if ok { String::new() } else { "ProbeFailed: no console line matches".into() },
            });
        }
        self.pool.status = Some(p.status.clone());
        let available = self.members.iter().filter(|m| m.available(now, chrono::Duration::zero())).count() as u32;
        self.worst_unavailable = self.worst_unavailable.max(self.pool.spec.replicas.saturating_sub(available));
        p
    }

    fn run(&mut self, from: i64, to: i64) {
        for s in from..to {
            self.pass(t(s));
        }
    }

    fn rollout(&self) -> RolloutStatus {
        self.pool.status.clone().and_then(|s| s.rollout).expect("a rollout status")
    }

    fn revisions(&self) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for m in &self.members {
            *by.entry(m.revision.clone()).or_default() += 1;
        }
        by
    }
}

#[test]
fn a_new_pool_makes_every_vm_at_once_and_scales_both_ways() {
    let mut sim = Sim::new(pool("k1", canary()));
    let first = sim.pass(t(0));
    assert_eq!(first.create.len(), 20, "no surge limit when nothing is replaced");
    sim.run(1, 3);
    let status = sim.pool.status.clone().expect("status");
    assert_eq!((status.replicas, status.available_replicas, status.current_revision), (20, 20, Some(1)));
    assert_eq!(sim.rollout().phase, RolloutPhase::Complete);
    sim.pool.spec.replicas = 5;
    assert_eq!(sim.pass(t(3)).delete.len(), 15);
    sim.pool.spec.replicas = 20;
    assert_eq!(sim.pass(t(4)).create.len(), 15);
}

#[test]
fn a_canary_rollout_goes_step_by_step_never_below_max_unavailable() {
    let mut sim = Sim::new(pool("k1", canary()));
    sim.run(0, 3);
    sim.pool.spec.template.spec.kernel = Some("k2".into());
    let new = sim.pool.spec.template.hash();
    let p = sim.pass(t(10));
    assert_eq!((p.create.len(), p.delete.len()), (1, 1), "the canary replaces one VM");
    let r = sim.rollout();
    assert_eq!((r.revision, r.from_revision, r.step, r.step_target), (2, Some(1), 0, 1));
    sim.pass(t(11));
    assert_eq!(sim.rollout().step, 1, "the canary passed");
    sim.run(12, 60);
    let status = sim.pool.status.clone().expect("status");
    assert_eq!(sim.rollout().phase, RolloutPhase::Complete);
    assert_eq!(status.current_revision, Some(2));
    assert_eq!(sim.revisions(), BTreeMap::from([(new, 20)]));
    assert!(sim.worst_unavailable <= 1, "at most maxUnavailable below replicas: {}", sim.worst_unavailable);
    assert_eq!(sim.created.len(), 40, "20 first, 20 replacements, none twice");
    assert_eq!(sim.deleted.len(), 20);
}

#[test]
fn a_canary_failing_its_gate_halts_and_undo_brings_the_old_revision_back() {
    let mut sim = Sim::new(pool("k1", canary()));
    sim.run(0, 3);
    let old = sim.pool.spec.template.hash();
    let old_template = sim.pool.spec.template.clone();
    sim.pool.spec.template.spec.kernel = Some("bad".into());
    let bad = sim.pool.spec.template.hash();
    sim.bad.insert(bad.clone());
    sim.run(10, 50);
    let status = sim.pool.status.clone().expect("status");
    let r = sim.rollout();
    assert_eq!((r.phase, r.step), (RolloutPhase::Halted, 0));
    assert_eq!(r.failed_vms.len(), 1);
    assert!(r.message.contains("rollout undo"), "{}", r.message);
    assert_eq!(sim.revisions(), BTreeMap::from([(old.clone(), 19), (bad, 1)]));
    let progressing = status.conditions.iter().find(|c| c.type_ == "Progressing").expect("condition");
    assert_eq!(progressing.reason, "ProgressDeadlineExceeded");
    // Undo: the old template again, as revision 3.
    sim.pool.spec.template = old_template;
    sim.run(50, 55);
    let status = sim.pool.status.clone().expect("status");
    assert_eq!((status.update_revision, status.current_revision), (Some(3), Some(3)));
    assert_eq!(sim.revisions(), BTreeMap::from([(old, 20)]));
    let numbers: Vec<u64> = status.revisions.iter().map(|r| r.revision).collect();
    assert_eq!(numbers, [2, 3]);
}

#[test]
fn auto_rollback_goes_back_by_itself() {
    let mut sim = Sim::new(pool("k1", UpdateStrategy { auto_rollback: true, ..canary() }));
    sim.run(0, 3);
    let old = sim.pool.spec.template.hash();
    sim.pool.spec.template.spec.kernel = Some("bad".into());
    sim.bad.insert(sim.pool.spec.template.hash());
    sim.run(10, 50);
    assert_eq!(sim.rollout().phase, RolloutPhase::RolledBack);
    assert_eq!(sim.revisions(), BTreeMap::from([(old, 20)]));
}

#[test]
fn a_pause_between_steps_and_spec_paused_hold_the_rollout() {
    let mut sim = Sim::new(pool("k1", UpdateStrategy { pause_seconds: 10, ..canary() }));
    sim.run(0, 3);
    sim.pool.spec.template.spec.kernel = Some("k2".into());
    sim.run(10, 13);
    let r = sim.rollout();
    assert_eq!((r.phase, r.step), (RolloutPhase::StepPause, 0));
    let p = sim.pass(t(15));
    assert!(p.requeue.is_some_and(|d| d > Duration::from_secs(5) && d <= Duration::from_secs(7)), "{:?}", p.requeue);
    sim.run(16, 22);
    assert_eq!(sim.rollout().step, 1);
    sim.pool.spec.paused = true;
    let before = sim.created.len();
    sim.run(22, 40);
    assert_eq!(sim.rollout().phase, RolloutPhase::Paused);
    assert!(sim.created.len() - before <= 4, "at most the step's VMs in flight");
    sim.pool.spec.paused = false;
    sim.run(40, 200);
    assert_eq!(sim.rollout().phase, RolloutPhase::Complete);
}

#[test]
fn a_deleted_vm_is_replaced_at_once_and_a_finished_one_too() {
    let mut sim = Sim::new(pool("k1", canary()));
    sim.run(0, 3);
    sim.members.remove(3);
    sim.members[0].phase = VmPhase::Succeeded;
    let gone = sim.members[0].name.clone();
    let p = sim.pass(t(5));
    assert_eq!(p.create.len(), 2);
    assert_eq!(p.delete, [gone]);
}
