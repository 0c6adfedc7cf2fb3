//! The controllers against a real apiserver (in this process, temporary
//! SQLite, real HTTP) and scripted node agents: scheduling, re-placement,
//! teardown, what restart policies lead to, agent refusals and silent
//! nodes. No root, no VMM, no network namespace.

#![allow(clippy::unwrap_used)] // a panic is the failure report

mod support;

use std::time::Duration;

use nexus_api::meta::find_condition;
use nexus_api::vm::{RestartPolicy, VmExit};
use nexus_api::{ConditionStatus, EventSpec, NodeSpec, Vm, VmPhase, VmSpec};
use nexus_client::{Client, ListParams};
use support::{Harness, wait_until};

fn vm(name: &str) -> Vm {
    Vm::new(
        name,
        Some("default"),
        VmSpec {
            vcpu: Some(1),
            mem_mib: Some(128),
            kernel: Some("/images/vmlinux".into()),
            rootfs: Some("/images/rootfs.ext4".into()),
            ..Default::default()
        },
    )
}

async fn get(client: &Client, name: &str) -> Option<Vm> {
    client.get::<VmSpec>("default", name).await.ok()
}

async fn phase_is(client: &Client, name: &str, phase: VmPhase) -> bool {
    get(client, name).await.is_some_and(|v| v.status_or_default().phase == phase)
}

async fn reasons(client: &Client, name: &str) -> Vec<String> {
    let params = ListParams { field_selector: Some(format!("spec.involvedObject.name={name}")), ..Default::default() };
    let mut events = client.list::<EventSpec>(None, &params).await.unwrap().items;
    events.sort_by_key(|e| e.spec.first_timestamp);
    events.into_iter().map(|e| e.spec.reason).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_spread_over_ready_nodes_and_run_with_a_started_event() {
    let h = Harness::start(&["n1", "n2"]).await;
    let c = h.client();
    for i in 0..4 {
        c.create(&vm(&format!("web-{i}"))).await.unwrap();
    }
    wait_until(Duration::from_secs(10), "4 VMs Running", || async {
        let mut all = true;
        for i in 0..4 {
            all &= phase_is(&c, &format!("web-{i}"), VmPhase::Running).await;
        }
        all
    })
    .await;
    let vms = c.list::<VmSpec>(Some("default"), &ListParams::default()).await.unwrap().items;
    let on = |n: &str| vms.iter().filter(|v| v.spec.node_name.as_deref() == Some(n)).count();
    assert_eq!((on("n1"), on("n2")), (2, 2), "spread evenly");
    for v in &vms {
        assert!(v.metadata.finalizers.contains(&nexus_controller::vm::FINALIZER.to_string()));
        assert_eq!(v.metadata.annotations.get(nexus_controller::vm::PLACED_BY).map(String::as_str), Some("scheduler"));
        let ready = find_condition(&v.status_or_default().conditions, "Ready").cloned().unwrap();
        assert_eq!(ready.status, ConditionStatus::True);
    }
    assert_eq!(h.node("n1").agent.script().vms.len() + h.node("n2").agent.script().vms.len(), 4);
    wait_until(Duration::from_secs(5), "Scheduled and Started events", || async {
        reasons(&c, "web-0").await == ["Scheduled", "Started"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_vm_moves_when_its_node_is_deleted_and_a_pinned_one_waits_for_its_node() {
    let h = Harness::start(&["n1", "n2"]).await;
    let c = h.client();
    let mut pinned = vm("pinned");
    pinned.spec.node_name = Some("n1".into());
    c.create(&pinned).await.unwrap();
    c.create(&vm("free-0")).await.unwrap();
    c.create(&vm("free-1")).await.unwrap();
    wait_until(Duration::from_secs(10), "3 VMs Running", || async {
        phase_is(&c, "pinned", VmPhase::Running).await
            && phase_is(&c, "free-0", VmPhase::Running).await
            && phase_is(&c, "free-1", VmPhase::Running).await
    })
    .await;
    let on_n1: Vec<String> = c
        .list::<VmSpec>(Some("default"), &ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|v| v.spec.node_name.as_deref() == Some("n1") && v.name() != "pinned")
        .map(|v| v.name().to_string())
        .collect();
    assert_eq!(on_n1.len(), 1, "the free VMs were spread: one beside the pinned one on n1");
    let mut h = h;
    h.nodes[0].go_silent();
    c.delete::<NodeSpec>("", "n1").await.unwrap();
    let moved = on_n1[0].clone();
    wait_until(Duration::from_secs(10), "the placed VM to run on n2", || async {
        get(&c, &moved).await.is_some_and(|v| {
            v.spec.node_name.as_deref() == Some("n2") && v.status_or_default().phase == VmPhase::Running
        })
    })
    .await;
    wait_until(Duration::from_secs(5), "a Rescheduled event", || async {
        reasons(&c, &moved).await.contains(&"Rescheduled".to_string())
    })
    .await;
    wait_until(Duration::from_secs(5), "the pinned VM to wait for n1", || async {
        get(&c, "pinned").await.is_some_and(|v| {
            find_condition(&v.status_or_default().conditions, "Ready").is_some_and(|r| r.reason == "NodeNotFound")
        })
    })
    .await;
    assert_eq!(get(&c, "pinned").await.unwrap().spec.node_name.as_deref(), Some("n1"), "pinned VMs stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_vm_removes_it_from_its_node_before_the_object_goes() {
    let h = Harness::start(&["n1"]).await;
    let c = h.client();
    let created = c.create(&vm("doomed")).await.unwrap();
    wait_until(Duration::from_secs(10), "Running", || async { phase_is(&c, "doomed", VmPhase::Running).await }).await;
    let uid = created.uid().to_string();
    c.delete::<VmSpec>("default", "doomed").await.unwrap();
    wait_until(Duration::from_secs(10), "the VM object to go", || async { get(&c, "doomed").await.is_none() }).await;
    let agent = &h.node("n1").agent;
    assert!(agent.script().vms.is_empty(), "the node no longer has it");
    assert!(agent.script().calls.contains(&format!("DELETE {uid}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_the_agent_keeps_down_becomes_succeeded_or_failed_and_is_not_retried() {
    let h = Harness::start(&["n1"]).await;
    let c = h.client();
    let mut clean = vm("clean");
    clean.spec.restart_policy = RestartPolicy::OnFailure;
    let clean = c.create(&clean).await.unwrap();
    let mut killed = vm("killed");
    killed.spec.restart_policy = RestartPolicy::Never;
    let killed = c.create(&killed).await.unwrap();
    wait_until(Duration::from_secs(10), "both Running", || async {
        phase_is(&c, "clean", VmPhase::Running).await && phase_is(&c, "killed", VmPhase::Running).await
    })
    .await;
    let agent = h.node("n1").agent.clone();
    {
        let mut s = agent.script();
        s.vms.get_mut(clean.uid()).unwrap().exited = Some(VmExit { code: Some(0), signal: None, at: None });
        s.vms.get_mut(killed.uid()).unwrap().exited = Some(VmExit { code: None, signal: Some(9), at: None });
    }
    // The next recheck (every 500 ms here) sees what the agent reports.
    wait_until(Duration::from_secs(10), "Succeeded and Failed", || async {
        phase_is(&c, "clean", VmPhase::Succeeded).await && phase_is(&c, "killed", VmPhase::Failed).await
    })
    .await;
    let failed = get(&c, "killed").await.unwrap();
    assert_eq!(
        failed.status.unwrap().last_error.unwrap().message,
        "the VMM killed by signal 9; restartPolicy Never keeps it down"
    );
    wait_until(Duration::from_secs(5), "Completed and Failed events", || async {
        reasons(&c, "clean").await.contains(&"Completed".to_string())
            && reasons(&c, "killed").await.contains(&"Failed".to_string())
    })
    .await;
    let calls = (agent.calls_for(clean.uid()), agent.calls_for(killed.uid()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((agent.calls_for(clean.uid()), agent.calls_for(killed.uid())), calls, "finished VMs are left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refusal_fails_the_vm_with_firecrackers_words_once() {
    let h = Harness::start(&["n1"]).await;
    let c = h.client();
    // The uid is known only after the create; the first ensure may pass,
    // the next (a recheck) is refused.
    let created = c.create(&vm("bad-kernel")).await.unwrap();
    let agent = h.node("n1").agent.clone();
    agent.script().refuse.insert(created.uid().to_string(), "Invalid kernel image".into());
    wait_until(Duration::from_secs(10), "Failed", || async { phase_is(&c, "bad-kernel", VmPhase::Failed).await }).await;
    let status = get(&c, "bad-kernel").await.unwrap().status.unwrap();
    let error = status.last_error.unwrap();
    assert_eq!(error.fault_message.as_deref(), Some("Invalid kernel image"));
    assert_eq!(error.suggestion.as_deref(), Some("check spec.kernel"));
    let calls = agent.calls_for(created.uid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agent.calls_for(created.uid()), calls, "no retry until the spec changes");
    assert!(reasons(&c, "bad-kernel").await.contains(&"Failed".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_beating_goes_not_ready_and_its_vms_hear_of_it() {
    let mut h = Harness::start(&["n1"]).await;
    let c = h.client();
    c.create(&vm("lonely")).await.unwrap();
    wait_until(Duration::from_secs(10), "Running", || async { phase_is(&c, "lonely", VmPhase::Running).await }).await;
    h.nodes[0].go_silent();
    wait_until(Duration::from_secs(10), "n1 NotReady", || async {
        c.get::<NodeSpec>("", "n1").await.is_ok_and(|n| {
            find_condition(&n.status_or_default().conditions, "Ready")
                .is_some_and(|r| r.status == ConditionStatus::False && r.reason == "NodeStatusUnknown")
        })
    })
    .await;
    wait_until(Duration::from_secs(5), "a NodeLost event and the VM waiting", || async {
        reasons(&c, "lonely").await.contains(&"NodeLost".to_string())
            && get(&c, "lonely").await.is_some_and(|v| {
                find_condition(&v.status_or_default().conditions, "Ready").is_some_and(|r| r.reason == "NodeNotReady")
            })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_no_vm_claims_on_a_node_is_collected_after_the_grace_and_live_vms_never() {
    let h = Harness::start(&["n1"]).await;
    let c = h.client();
    let live = c.create(&vm("live")).await.unwrap();
    wait_until(Duration::from_secs(10), "Running", || async { phase_is(&c, "live", VmPhase::Running).await }).await;
    let agent = h.node("n1").agent.clone();
    let ghost = "22222222-2222-4222-8222-222222222222";
    let template = agent.script().vms.values().next().unwrap().clone();
    agent.script().vms.insert(ghost.into(), template);
    wait_until(Duration::from_secs(10), "the ghost collected", || async { !agent.script().vms.contains_key(ghost) })
        .await;
    assert!(agent.script().vms.contains_key(live.uid()), "the live VM is untouched");
    assert!(phase_is(&c, "live", VmPhase::Running).await);
}
