//! A node whose agent dies is marked NotReady and its VMs say so; when the
//! agent returns, the VMs are adopted, not remade. Decisions are Events.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::time::{Duration, Instant};

use nexus_api::meta::find_condition;
use nexus_api::{ConditionStatus, EventSpec, NodeSpec, VmPhase, VmSpec};
use nexus_client::ListParams;
use nexus_e2e::{Cluster, in_private_netns, repo_root, wait_until};

fn reasons(events: &[nexus_api::Event]) -> Vec<String> {
    let mut r: Vec<String> = events.iter().map(|e| e.spec.reason.clone()).collect();
    r.sort();
    r
}

/// Whether VM `name` is Running and Ready.
async fn ready(client: &nexus_client::Client, name: &str) -> bool {
    client.get::<VmSpec>("default", name).await.is_ok_and(|v| {
        let s = v.status_or_default();
        s.phase == VmPhase::Running
            && find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
    })
}

/// Applies `examples/vm.yaml` with nexusctl and waits until `hello` is Running and Ready.
async fn apply_example_and_wait_ready(cluster: &Cluster) {
    let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &repo_root().join("examples/vm.yaml").display().to_string()]);
    assert!(ok, "{err}");
    let client = cluster.client();
    wait_until(Duration::from_secs(30), "the example VM to be Ready", || ready(&client, "hello")).await;
}

/// The events about `name` once their reasons are `want` (events are written
/// just after the status they describe, so a test polls for them).
async fn events_about(client: &nexus_client::Client, name: &str, want: &[&str]) -> Vec<nexus_api::Event> {
    let params = ListParams { field_selector: Some(format!("spec.involvedObject.name={name}")), ..Default::default() };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = client.list::<EventSpec>(None, &params).await.unwrap().items;
        if reasons(&events) == want || Instant::now() >= deadline {
            assert_eq!(reasons(&events), want, "{events:?}");
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_silent_node_goes_not_ready_and_its_vm_is_adopted_when_the_agent_returns() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        apply_example_and_wait_ready(&cluster).await;
        let running = || ready(&client, "hello");
        let pid = client.get::<VmSpec>("default", "hello").await.unwrap().status.unwrap().runtime.unwrap().pid;

        cluster.agent.kill();
        let killed = Instant::now();
        wait_until(Duration::from_secs(20), "the node to be marked NotReady", || async {
            let node = client.get::<NodeSpec>("", "node-a").await.unwrap().status_or_default();
            find_condition(&node.conditions, "Ready")
                .is_some_and(|c| c.status == ConditionStatus::False && c.reason == "NodeStatusUnknown")
        })
        .await;
        println!("node marked NotReady {} ms after its agent was killed", killed.elapsed().as_millis());
        wait_until(Duration::from_secs(20), "the VM to report its node NotReady", || async {
            let vm = client.get::<VmSpec>("default", "hello").await.unwrap().status_or_default();
            find_condition(&vm.conditions, "Ready").is_some_and(|c| c.reason == "NodeNotReady")
        })
        .await;

        cluster.restart_agent();
        let back = Instant::now();
        wait_until(Duration::from_secs(30), "the VM to be Ready again", running).await;
        println!("VM Ready again {} ms after the agent restarted", back.elapsed().as_millis());
        let vm = client.get::<VmSpec>("default", "hello").await.unwrap();
        assert_eq!(vm.status.unwrap().runtime.unwrap().pid, pid, "adopted, not restarted");
        let node = client.get::<NodeSpec>("", "node-a").await.unwrap().status_or_default();
        assert!(node.is_ready(chrono::Utc::now(), chrono::Duration::seconds(5)));

        events_about(&client, "hello", &["NodeLost", "Scheduled", "Started"]).await;
        let (ok, out, _) = cluster.nexusctl(&["describe", "vm", "hello"]);
        assert!(ok && out.contains("NodeLost") && out.contains("Scheduled"), "{out}");

        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "hello", "--wait"]);
        assert!(ok, "{err}");
        assert_eq!(nexus_e2e::host::vmm_processes_under(&cluster.run_dir), vec![]);
        cluster.stop();
    });
}

#[test]
fn pause_stop_and_start_are_events_and_a_dead_vmm_is_restarted() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        apply_example_and_wait_ready(&cluster).await;
        let phase_is = |p: VmPhase| {
            let client = client.clone();
            move || {
                let client = client.clone();
                async move { client.get::<VmSpec>("default", "hello").await.is_ok_and(|v| v.status_or_default().phase == p) }
            }
        };
        for (verb, phase) in [
            ("pause", VmPhase::Paused),
            ("resume", VmPhase::Running),
            ("stop", VmPhase::Stopped),
            ("start", VmPhase::Running),
        ] {
            let (ok, _, err) = cluster.nexusctl(&[verb, "vm", "hello"]);
            assert!(ok, "{verb}: {err}");
            wait_until(Duration::from_secs(30), verb, phase_is(phase)).await;
        }
        // SIGKILL the VMM: the controller has the agent start it again.
        let pid = client.get::<VmSpec>("default", "hello").await.unwrap().status.unwrap().runtime.unwrap().pid.unwrap();
        nexus_e2e::host::sigkill(pid);
        let killed = Instant::now();
        wait_until(Duration::from_secs(30), "a new VMM", || async {
            client.get::<VmSpec>("default", "hello").await.is_ok_and(|v| {
                let s = v.status_or_default();
                s.phase == VmPhase::Running && s.runtime.and_then(|r| r.pid).is_some_and(|p| p != pid)
            })
        })
        .await;
        println!("VMM running again {} ms after SIGKILL", killed.elapsed().as_millis());
        let events = events_about(&client, "hello", &["Paused", "Restarted", "Scheduled", "Started", "Stopped"]).await;
        let started = events.iter().find(|e| e.spec.reason == "Started").unwrap();
        assert_eq!(started.spec.count, 3, "started, resumed, started again: one event, counted");
        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "hello", "--wait"]);
        assert!(ok, "{err}");
        cluster.stop();
    });
}

#[test]
fn unclaimed_taps_and_sockets_are_collected_after_the_grace_period_and_live_ones_never() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        apply_example_and_wait_ready(&cluster).await;
        let live = client.get::<VmSpec>("default", "hello").await.unwrap().status.unwrap().runtime.unwrap();
        let live_tap = live.tap_name.clone().unwrap();

        // Made by hand: a TAP, a VM directory with a socket, and a stray socket.
        nexus_e2e::run_ok(std::process::Command::new("ip").args([
            "tuntap",
            "add",
            "dev",
            "nxt0123456789ab",
            "mode",
            "tap",
        ]));
        let ghost = cluster.run_dir.join("vms").join("22222222-2222-4222-8222-222222222222");
        std::fs::create_dir_all(&ghost).unwrap();
        let _ghost_sock = std::os::unix::net::UnixListener::bind(ghost.join("fc.sock")).unwrap();
        let _stray = std::os::unix::net::UnixListener::bind(cluster.run_dir.join("stray.sock")).unwrap();
        let made = Instant::now();
        let present = |run: std::path::PathBuf| {
            let tap = nexus_e2e::host::taps().iter().any(|l| l.name == "nxt0123456789ab");
            (tap, run.join("vms/22222222-2222-4222-8222-222222222222").exists(), run.join("stray.sock").exists())
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(present(cluster.run_dir.clone()), (true, true, true), "nothing goes before the grace period");
        let deadline = Instant::now() + Duration::from_secs(20);
        while present(cluster.run_dir.clone()) != (false, false, false) {
            assert!(
                Instant::now() < deadline,
                "not collected: {:?}\n{}",
                present(cluster.run_dir.clone()),
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("collected {} ms after they appeared (grace 3 s)", made.elapsed().as_millis());
        assert!(nexus_e2e::host::taps().iter().any(|l| l.name == live_tap), "the live VM's TAP is untouched");
        let now = client.get::<VmSpec>("default", "hello").await.unwrap().status.unwrap();
        assert_eq!((now.phase, now.runtime.unwrap().pid), (VmPhase::Running, live.pid), "the live VM is untouched");
        let params =
            ListParams { field_selector: Some("spec.involvedObject.name=node-a".into()), ..Default::default() };
        // Events are written just after the removals they describe.
        wait_until(Duration::from_secs(10), "three GarbageCollected events on the node", || async {
            let events = client.list::<EventSpec>(None, &params).await.unwrap().items;
            events.iter().filter(|e| e.spec.reason == "GarbageCollected").count() >= 3
        })
        .await;
        let metrics =
            nexus_e2e::http_client().get("http://127.0.0.1:7445/metrics").send().await.unwrap().text().await.unwrap();
        assert!(
            metrics.contains("nexus_controller_gc_removed_total")
                && metrics.contains("nexus_controller_reconcile_total{controller=\"vm\",result=\"ok\"}"),
            "{metrics}"
        );
        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "hello", "--wait"]);
        assert!(ok, "{err}");
        cluster.stop();
    });
}

#[test]
fn when_the_leading_controller_dies_the_standby_takes_over_within_seconds() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let mut standby = cluster.spawn_controller("127.0.0.1:7446", "controller-2.log");
        let client = cluster.client();
        let holder = || async {
            client.get::<nexus_api::LeaseSpec>("", "nexus-controller").await.ok().and_then(|l| l.spec.holder_identity)
        };
        wait_until(Duration::from_secs(10), "a leader", || async { holder().await.is_some() }).await;
        let leader = holder().await.unwrap();
        let first_leads = leader.ends_with(&format!("-{}", cluster.controller.pid()));
        assert!(first_leads || leader.ends_with(&format!("-{}", standby.pid())), "{leader}");

        let example = std::fs::read_to_string(repo_root().join("examples/vm.yaml")).unwrap();
        let apply = |cluster: &Cluster, name: &str| {
            let f = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&f, example.replace("name: hello", &format!("name: {name}"))).unwrap();
            let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &f.display().to_string()]);
            assert!(ok, "{err}");
        };
        let running = |name: &'static str| {
            let client = client.clone();
            move || {
                let client = client.clone();
                async move {
                    client
                        .get::<VmSpec>("default", name)
                        .await
                        .is_ok_and(|v| v.status_or_default().phase == VmPhase::Running)
                }
            }
        };
        apply(&cluster, "before");
        wait_until(Duration::from_secs(30), "the first VM to run", running("before")).await;

        if first_leads {
            cluster.controller.kill()
        } else {
            standby.kill()
        }
        let killed = Instant::now();
        wait_until(Duration::from_secs(20), "a new leader", || async { holder().await.is_some_and(|h| h != leader) })
            .await;
        let took_over = killed.elapsed();
        apply(&cluster, "after");
        wait_until(Duration::from_secs(30), "a VM applied after the failover to run", running("after")).await;
        println!(
            "standby took the lease {} ms after the leader was killed; a new VM ran {} ms after the kill",
            took_over.as_millis(),
            killed.elapsed().as_millis()
        );
        let lease = client.get::<nexus_api::LeaseSpec>("", "nexus-controller").await.unwrap();
        assert_eq!(lease.spec.lease_transitions, 1);
        // The new leader loaded its caches (the VM from before included)
        // before its first reconcile.
        let log =
            std::fs::read_to_string(dir.path().join(if first_leads { "controller-2.log" } else { "controller.log" }))
                .unwrap();
        let synced = log
            .lines()
            .position(|l| l.contains("caches synced") && l.contains("\"controller\":\"vm\""))
            .expect("a caches-synced line of the VM controller");
        let line = log.lines().nth(synced).unwrap();
        assert!(line.contains("\"objects\":1"), "{line}");
        let first_work = log.lines().position(|l| l.contains("\"scheduled\"") || l.contains("reconcile failed"));
        assert!(first_work.is_none_or(|w| w > synced), "{log}");
        for name in ["before", "after"] {
            let (ok, _, err) = cluster.nexusctl(&["delete", "vm", name, "--wait"]);
            assert!(ok, "{err}");
        }
        assert_eq!(nexus_e2e::host::vmm_processes_under(&cluster.run_dir), vec![]);
        standby.stop();
        cluster.stop();
    });
}

/// Sets `spec.state` of VM `name` (retrying on conflicts).
async fn set_state(client: &nexus_client::Client, name: &str, state: nexus_api::PowerState) {
    loop {
        let mut vm = client.get::<VmSpec>("default", name).await.unwrap();
        vm.spec.state = state;
        match client.replace(&vm).await {
            Ok(_) => return,
            Err(e) if e.is_conflict() => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

async fn wait_phase(client: &nexus_client::Client, name: &str, phase: VmPhase) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if client.get::<VmSpec>("default", name).await.is_ok_and(|v| v.status_or_default().phase == phase) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never reached {phase}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn create_pause_resume_stop_start_delete_a_hundred_times_leaks_nothing() {
    use nexus_api::PowerState;
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        let template: nexus_api::Vm =
            serde_saphyr::from_str(&std::fs::read_to_string(repo_root().join("examples/vm.yaml")).unwrap()).unwrap();
        let started = Instant::now();
        // Four VMs at a time, 25 lifecycles each: 100 in all.
        let mut lanes = Vec::new();
        for lane in 0..4 {
            let client = client.clone();
            let template = template.clone();
            lanes.push(async move {
                for round in 0..25 {
                    let name = format!("cycle-{lane}-{round}");
                    let mut vm = template.clone();
                    vm.metadata.name = name.clone();
                    vm.metadata.project = Some("default".into());
                    client.create(&vm).await.unwrap();
                    wait_phase(&client, &name, VmPhase::Running).await;
                    for (state, phase) in [
                        (PowerState::Paused, VmPhase::Paused),
                        (PowerState::Running, VmPhase::Running),
                        (PowerState::Stopped, VmPhase::Stopped),
                        (PowerState::Running, VmPhase::Running),
                    ] {
                        set_state(&client, &name, state).await;
                        wait_phase(&client, &name, phase).await;
                    }
                    client.delete::<VmSpec>("default", &name).await.unwrap();
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while client.get::<VmSpec>("default", &name).await.is_ok() {
                        assert!(Instant::now() < deadline, "{name} was never deleted");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
        futures::future::join_all(lanes).await;
        println!("100 lifecycles in {} ms", started.elapsed().as_millis());
        let run = &cluster.run_dir;
        let left = (
            nexus_e2e::host::taps().len(),
            nexus_e2e::host::sockets_under(run).len(),
            nexus_e2e::host::vmm_processes_under(run).len(),
            nexus_e2e::host::run_dirs(run).len(),
            client.list::<VmSpec>(None, &ListParams::default()).await.unwrap().items.len(),
        );
        println!("left after 100 lifecycles: {left:?} (TAPs, sockets, VMMs, run dirs, VM rows)");
        assert_eq!(left, (0, 0, 0, 0, 0));
        cluster.stop();
    });
}
