//! VM pools on three agents: spread, scaling, replacement of a VM deleted
//! by hand, canary rollouts of a new kernel Image (one that passes and one
//! whose guest fails its readiness probe), undo, a leader killed in the
//! middle of a rollout, and pools whose VMs expire.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nexus_api::meta::find_condition;
use nexus_api::pool::{REVISION_LABEL, RolloutPhase, VmPool};
use nexus_api::{ConditionStatus, Vm, VmPhase, VmPoolSpec, VmSpec};
use nexus_client::{Client, ListParams};
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::{in_private_netns, wait_until};

/// What the simulated guest of a bad kernel panics on.
const PANIC_MARKER: &str = "NEXUS-E2E-BAD-KERNEL";

fn pool_yaml(name: &str, replicas: u32, kernel: &str, extra_vm: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VMPool\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector:\n    app: {name}\n  \
         template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      template: small\n      kernel: {kernel}\n      \
         readinessProbe:\n        console: \"login:\"\n      state: Running\n{extra_vm}  updateStrategy:\n    steps: [1, \"25%\", \"100%\"]\n    \
         maxUnavailable: 1\n    maxSurge: 1\n    minReadySeconds: 1\n    progressDeadlineSeconds: 8\n"
    )
}

fn ctl(fleet: &MultiNode, args: &[&str]) -> String {
    let (ok, out, err) = fleet.nexusctl(args);
    assert!(ok, "nexusctl {args:?}: {out}{err}");
    out
}

fn apply(fleet: &MultiNode, dir: &std::path::Path, yaml: &str) -> String {
    let file = dir.join("apply.yaml");
    std::fs::write(&file, yaml).unwrap();
    ctl(fleet, &["apply", "-f", &file.display().to_string()])
}

async fn pool(client: &Client, name: &str) -> VmPool {
    client.get::<VmPoolSpec>("default", name).await.unwrap()
}

/// The live (not deleting) VMs of pool `name`.
async fn members(client: &Client, name: &str) -> Vec<Vm> {
    let params = ListParams { label_selector: Some(format!("app={name}")), ..Default::default() };
    match client.list::<VmSpec>(Some("default"), &params).await {
        Ok(l) => l.items.into_iter().filter(|v| !v.is_deleting()).collect(),
        Err(_) => Vec::new(),
    }
}

fn ready(vm: &Vm) -> bool {
    let s = vm.status_or_default();
    s.phase == VmPhase::Running
        && find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
}

fn revision(vm: &Vm) -> String {
    vm.metadata.labels.get(REVISION_LABEL).cloned().unwrap_or_default()
}

fn by_revision(vms: &[Vm]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for v in vms {
        *by.entry(revision(v)).or_default() += 1;
    }
    by
}

/// Waits until pool `name` has `n` VMs, all Ready, of one revision, and a
/// complete rollout.
async fn settled(client: &Client, name: &str, n: usize, within: Duration) {
    wait_until(within, &format!("pool {name}: {n} Ready VMs and a complete rollout"), || async {
        let vms = members(client, name).await;
        let p = pool(client, name).await;
        let complete = phase(&p) == Some(RolloutPhase::Complete);
        vms.len() == n && vms.iter().all(ready) && by_revision(&vms).len() == 1 && complete
    })
    .await;
}

/// The VMs of pool `name` and their revisions, now.
async fn snapshot(client: &Client, name: &str) -> BTreeMap<String, String> {
    members(client, name).await.iter().map(|v| (v.name().to_string(), revision(v))).collect()
}

/// Follows a rollout of pool `name` from the VMs `known` (taken before the
/// change) until `done` says so, printing each VM created and deleted,
/// with the step; returns the fewest Ready VMs seen, the names of every VM
/// seen, and those seen deleted.
async fn follow(
    client: &Client,
    name: &str,
    within: Duration,
    mut known: BTreeMap<String, String>,
    mut done: impl FnMut(&VmPool, &[Vm]) -> bool,
) -> (usize, BTreeSet<String>, BTreeSet<String>, BTreeMap<String, String>) {
    let started = Instant::now();
    let mut seen: BTreeSet<String> = known.keys().cloned().collect();
    let mut deleted = BTreeSet::new();
    let mut fewest = usize::MAX;
    loop {
        assert!(started.elapsed() < within, "pool {name}: the rollout did not end within {within:?}");
        let p = pool(client, name).await;
        let vms = members(client, name).await;
        // The step as the controller last wrote it for the current spec.
        let step = p
            .status
            .as_ref()
            .filter(|s| s.observed_generation == p.metadata.generation)
            .and_then(|s| s.rollout.clone())
            .map(|r| (r.step + 1, r.steps, r.phase));
        let now: BTreeMap<String, String> = vms.iter().map(|v| (v.name().to_string(), revision(v))).collect();
        let t = started.elapsed().as_secs_f64();
        for (vm, rev) in &now {
            if !known.contains_key(vm) {
                println!("  {t:6.2} s  step {:?}: + {vm} (revision {rev})", step.map(|s| (s.0, s.1)));
                seen.insert(vm.clone());
            }
        }
        for (vm, rev) in &known {
            if !now.contains_key(vm) {
                println!("  {t:6.2} s  step {:?}: - {vm} (revision {rev})", step.map(|s| (s.0, s.1)));
                deleted.insert(vm.clone());
            }
        }
        known = now;
        fewest = fewest.min(vms.iter().filter(|v| ready(v)).count());
        if done(&p, &vms) {
            return (fewest, seen, deleted, known);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rollout's phase and step, once the controller has seen the pool's
/// latest spec.
fn progress(p: &VmPool) -> Option<(RolloutPhase, u32)> {
    p.status
        .as_ref()
        .filter(|s| s.observed_generation == p.metadata.generation)
        .and_then(|s| s.rollout.as_ref())
        .map(|r| (r.phase, r.step))
}

fn phase(p: &VmPool) -> Option<RolloutPhase> {
    progress(p).map(|r| r.0)
}

#[test]
fn a_pool_spreads_scales_replaces_rolls_out_halts_undoes_and_survives_its_leader() {
    in_private_netns(|| async {
        // Three kernels: two good ones and one whose guest panics (in the
        // test's own image directory, see `in_private_netns`).
        let images = std::path::Path::new(nexus_e2e::EXAMPLE_IMAGES);
        let base = std::fs::read(images.join("vmlinux")).unwrap();
        for (file, extra) in
            [("e2e-pool-kernel-v1", "v1"), ("e2e-pool-kernel-v2", "v2"), ("e2e-pool-kernel-bad", PANIC_MARKER)]
        {
            let mut bytes = base.clone();
            bytes.extend_from_slice(extra.as_bytes());
            std::fs::write(images.join(file), bytes).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let mut fleet =
            MultiNode::start_env(dir.path(), 3, 40, &[("FIRECRACKER_SIM_PANIC_IF_KERNEL_CONTAINS", PANIC_MARKER)])
                .await;
        let client = fleet.client();
        let mut setup = String::from(
            "apiVersion: nexus/v1\nkind: Template\nmetadata:\n  name: small\nspec:\n  vcpu: 1\n  memMib: 64\n  \
             kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n",
        );
        for (name, file) in [
            ("kernel-v1", "e2e-pool-kernel-v1"),
            ("kernel-v2", "e2e-pool-kernel-v2"),
            ("kernel-bad", "e2e-pool-kernel-bad"),
        ] {
            setup.push_str(&format!(
                "---\napiVersion: nexus/v1\nkind: Image\nmetadata:\n  name: {name}\nspec:\n  type: Kernel\n  path: /var/lib/nexus/images/{file}\n"
            ));
        }
        apply(&fleet, dir.path(), &setup);

        // 20 VMs from the template, spread 7/7/6.
        let started = Instant::now();
        apply(&fleet, dir.path(), &pool_yaml("ci", 20, "kernel-v1", ""));
        settled(&client, "ci", 20, Duration::from_secs(60)).await;
        println!(
            "pool of 20: all Running and Ready (probe passed) {} ms after the apply",
            started.elapsed().as_millis()
        );
        let vms = members(&client, "ci").await;
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for v in &vms {
            *per_node.entry(v.spec.node_name.clone().unwrap()).or_default() += 1;
        }
        println!("spread: {per_node:?}");
        let mut counts: Vec<usize> = per_node.values().copied().collect();
        counts.sort();
        assert_eq!(counts, [6, 7, 7]);
        for v in &vms {
            let owner = &v.metadata.owner_references[0];
            assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("VMPool", "ci"));
        }
        println!("{}", ctl(&fleet, &["get", "vmpools"]));

        // Scale to 5 and back to 20.
        ctl(&fleet, &["scale", "vmpool", "ci", "--replicas", "5"]);
        settled(&client, "ci", 5, Duration::from_secs(30)).await;
        let started = Instant::now();
        ctl(&fleet, &["scale", "vmpool", "ci", "--replicas", "20"]);
        settled(&client, "ci", 20, Duration::from_secs(30)).await;
        println!("scaled 20 -> 5 -> 20; back to 20 Ready in {} ms", started.elapsed().as_millis());

        // A VM deleted by hand is replaced.
        let before: BTreeSet<String> = members(&client, "ci").await.iter().map(|v| v.name().to_string()).collect();
        let victim = before.iter().next().unwrap().clone();
        let started = Instant::now();
        client.delete::<VmSpec>("default", &victim).await.unwrap();
        let replacement = loop {
            let now = members(&client, "ci").await;
            if let Some(v) = now.iter().find(|v| !before.contains(v.name())) {
                break v.name().to_string();
            }
            assert!(started.elapsed() < Duration::from_secs(5), "no replacement for {victim} within 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let replaced_ms = started.elapsed().as_millis();
        println!("deleted {victim} by hand: {replacement} created in its place {replaced_ms} ms later");
        assert!(replaced_ms < 2000, "replaced within 2 s, not {replaced_ms} ms");
        settled(&client, "ci", 20, Duration::from_secs(30)).await;
        println!("  ... and Ready {} ms after the delete", started.elapsed().as_millis());

        // A new kernel, step by step.
        let old = by_revision(&members(&client, "ci").await).into_keys().next().unwrap();
        println!("rolling kernel-v2 out over 20 VMs, steps 1 -> 25% -> 100%, maxUnavailable 1, maxSurge 1:");
        let before = snapshot(&client, "ci").await;
        apply(&fleet, dir.path(), &pool_yaml("ci", 20, "kernel-v2", ""));
        let (fewest, _, deleted, _) = follow(&client, "ci", Duration::from_secs(120), before, |p, vms| {
            phase(p) == Some(RolloutPhase::Complete)
                && vms.len() == 20
                && vms.iter().all(ready)
                && by_revision(vms).len() == 1
        })
        .await;
        let good = by_revision(&members(&client, "ci").await).into_keys().next().unwrap();
        assert_ne!(good, old);
        println!("kernel-v2 rolled out; the fewest Ready VMs at any time: {fewest} of 20 (maxUnavailable 1)");
        assert!(fewest >= 19, "never more than maxUnavailable below replicas: {fewest}");
        assert_eq!(deleted.len(), 20, "each old VM replaced once");
        println!("{}", ctl(&fleet, &["rollout", "history", "vmpool", "ci"]));

        // A bad kernel: the canary fails its probe and the rollout halts.
        println!("rolling kernel-bad out (its guest panics, the probe never passes):");
        let started = Instant::now();
        let before = snapshot(&client, "ci").await;
        apply(&fleet, dir.path(), &pool_yaml("ci", 20, "kernel-bad", ""));
        follow(&client, "ci", Duration::from_secs(60), before, |p, _| phase(p) == Some(RolloutPhase::Halted)).await;
        println!("halted {} ms after the apply", started.elapsed().as_millis());
        let p = pool(&client, "ci").await;
        let status = p.status.clone().unwrap();
        let rollout = status.rollout.clone().unwrap();
        let progressing = find_condition(&status.conditions, "Progressing").unwrap().clone();
        println!("rollout: step {} of {}, failed VMs {:?}", rollout.step + 1, rollout.steps, rollout.failed_vms);
        println!("Progressing: {:?} {}: {}", progressing.status, progressing.reason, progressing.message);
        assert_eq!(rollout.step, 0, "halted after the canary");
        assert_eq!(rollout.failed_vms.len(), 1);
        assert_eq!(progressing.reason, "ProgressDeadlineExceeded");
        assert!(progressing.message.contains("ProbeFailed"), "the pool says why: {}", progressing.message);
        let vms = members(&client, "ci").await;
        let split = by_revision(&vms);
        println!("VMs by revision while halted: {split:?}");
        assert_eq!(split.get(&good), Some(&19), "19 VMs keep the old revision");
        assert_eq!(vms.len(), 20);
        let canary = vms.iter().find(|v| revision(v) != good).unwrap();
        let ready_cond = find_condition(&canary.status_or_default().conditions, "Ready").cloned().unwrap();
        println!(
            "the canary {}: Ready {:?} ({}: {})",
            canary.name(),
            ready_cond.status,
            ready_cond.reason,
            ready_cond.message
        );
        assert_eq!(ready_cond.reason, "ProbeFailed");
        let (_, out, _) = fleet.nexusctl(&["rollout", "status", "vmpool", "ci", "--watch=false"]);
        println!("{out}");
        let (_, described) = nexus_e2e::describe_showing(|a| fleet.nexusctl(a), "vmpool", "ci", "RolloutHalted").await;
        assert!(described.contains("RolloutHalted"), "{described}");
        // Undo: 20 VMs of the old revision again.
        let started = Instant::now();
        let before = snapshot(&client, "ci").await;
        println!("{}", ctl(&fleet, &["rollout", "undo", "vmpool", "ci"]));
        follow(&client, "ci", Duration::from_secs(60), before, |p, vms| {
            phase(p) == Some(RolloutPhase::Complete)
                && vms.len() == 20
                && vms.iter().all(ready)
                && by_revision(vms).len() == 1
        })
        .await;
        assert_eq!(by_revision(&members(&client, "ci").await), BTreeMap::from([(good.clone(), 20)]));
        println!("undone: 20 VMs of the kernel-v2 revision {} ms after `rollout undo`", started.elapsed().as_millis());
        println!("{}", ctl(&fleet, &["rollout", "history", "vmpool", "ci"]));

        // The leader dies mid-rollout; a standby takes over at the same step.
        let standby = nexus_e2e::spawn_controller_tuned(
            &fleet.server,
            &fleet.ca,
            &fleet.dir.join("controller.token"),
            "127.0.0.1:7446",
            &fleet.dir.join("controller-standby.log"),
            true,
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("rolling kernel-v1 out again; the leader is killed during step 2:");
        let before = snapshot(&client, "ci").await;
        apply(&fleet, dir.path(), &pool_yaml("ci", 20, "kernel-v1", ""));
        let (_, mut seen, mut deleted, known) =
            follow(&client, "ci", Duration::from_secs(60), before, |p, _| progress(p).is_some_and(|r| r.1 == 1)).await;
        let step_before = pool(&client, "ci").await.status.unwrap().rollout.unwrap();
        fleet.controller.kill();
        let killed = Instant::now();
        println!("killed the leader at step {} of {}", step_before.step + 1, step_before.steps);
        let (_, seen2, deleted2, _) = follow(&client, "ci", Duration::from_secs(90), known, |p, vms| {
            phase(p) == Some(RolloutPhase::Complete)
                && vms.len() == 20
                && vms.iter().all(ready)
                && by_revision(vms).len() == 1
        })
        .await;
        seen.extend(seen2);
        deleted.extend(deleted2);
        println!("the standby finished the rollout {} ms after the kill", killed.elapsed().as_millis());
        let standby_log = std::fs::read_to_string(fleet.dir.join("controller-standby.log")).unwrap();
        assert!(standby_log.contains("became the leader"), "the standby took over");
        let end = members(&client, "ci").await;
        let new_rev = revision(&end[0]);
        let created_new: Vec<&String> = seen.iter().filter(|n| !deleted.contains(*n)).collect();
        println!("VMs seen during the rollout: {}, deleted: {}, left: {}", seen.len(), deleted.len(), end.len());
        assert!(end.iter().all(|v| revision(v) == new_rev));
        assert_eq!(created_new.len(), 20);
        // No VM of the new revision was replaced: every one made is still here.
        assert_eq!(seen.len(), 40, "20 old VMs and 20 new ones, none made twice");
        assert_eq!(deleted.len(), 20);
        // The standby leads from here on.
        fleet.controller = standby;

        // VMs that expire are replaced.
        let extra = "      lifetime: 5s\n";
        apply(&fleet, dir.path(), &pool_yaml("short", 3, "kernel-v1", extra));
        settled(&client, "short", 3, Duration::from_secs(30)).await;
        let first: Vec<Vm> = members(&client, "short").await;
        let first_names: BTreeSet<String> = first.iter().map(|v| v.name().to_string()).collect();
        let started_at: Vec<chrono::DateTime<chrono::Utc>> =
            first.iter().map(|v| v.status_or_default().runtime.unwrap().started_at.unwrap()).collect();
        let mut gone_after: Vec<(String, f64)> = Vec::new();
        let watching = Instant::now();
        while gone_after.len() < first.len() {
            assert!(watching.elapsed() < Duration::from_secs(20), "pool short's first VMs did not expire");
            let now: BTreeSet<String> = members(&client, "short").await.iter().map(|v| v.name().to_string()).collect();
            for (v, start) in first.iter().zip(&started_at) {
                if !now.contains(v.name()) && !gone_after.iter().any(|(n, _)| n == v.name()) {
                    let after = (chrono::Utc::now() - *start).num_milliseconds() as f64 / 1000.0;
                    gone_after.push((v.name().to_string(), after));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("pool VMs with lifetime 5s, gone after their start: {gone_after:?}");
        assert!(gone_after.iter().all(|(_, s)| (5.0..=6.5).contains(s)), "{gone_after:?}");
        wait_until(Duration::from_secs(20), "pool short refilled", || async {
            let now = members(&client, "short").await;
            now.len() == 3 && now.iter().all(ready) && now.iter().all(|v| !first_names.contains(v.name()))
        })
        .await;
        println!("pool short refilled with 3 new VMs");

        // Deleting a pool deletes its VMs.
        ctl(&fleet, &["delete", "vmpool", "ci", "short", "--wait", "--timeout", "60"]);
        wait_until(Duration::from_secs(60), "every pool VM gone", || async {
            client.list::<VmSpec>(Some("default"), &ListParams::default()).await.is_ok_and(|l| l.items.is_empty())
        })
        .await;
        wait_until(Duration::from_secs(30), "nothing left on the nodes", || async {
            fleet.vmms() == 0 && fleet.run_dirs() == 0
        })
        .await;
        println!("pools deleted: 0 VMs, 0 VMMs, {} TAPs, 0 run directories left", fleet.taps());
        assert_eq!(fleet.taps(), 0);
        fleet.stop();
    });
}
