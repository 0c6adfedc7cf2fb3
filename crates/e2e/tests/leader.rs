//! Two controllers, one leader: a leader paused with SIGSTOP in the middle
//! of its work loses the lease to the standby, and once continued makes no
//! write after its term ended (its writes are fenced by the lease's term);
//! the standby converges everything meanwhile.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::time::{Duration, Instant};

use nexus_api::{LeaseSpec, VmPhase, VmSpec};
use nexus_client::Client;
use nexus_e2e::{Cluster, in_private_netns, repo_root, wait_until};

async fn holder(client: &Client) -> Option<String> {
    client.get::<LeaseSpec>("", "nexus-controller").await.ok().and_then(|l| l.spec.holder_identity)
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

#[test]
fn a_paused_leader_once_continued_makes_no_write_after_its_term() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let mut standby = cluster.spawn_controller("127.0.0.1:7446", "controller-2.log");
        let client = cluster.client();
        wait_until(Duration::from_secs(10), "a leader", || async { holder(&client).await.is_some() }).await;
        let leader = holder(&client).await.unwrap();
        let first_leads = leader.ends_with(&format!("-{}", cluster.controller.pid()));
        let (leader_pid, leader_log, follower_log) = if first_leads {
            (cluster.controller.pid(), "controller.log", "controller-2.log")
        } else {
            (standby.pid(), "controller-2.log", "controller.log")
        };

        // Work in flight: 20 VMs at once, and the leader stopped as soon as
        // it has scheduled the first.
        let example = std::fs::read_to_string(repo_root().join("examples/vm.yaml")).unwrap();
        let names: Vec<String> = (0..20).map(|i| format!("w-{i}")).collect();
        let docs: Vec<String> = names.iter().map(|n| example.replace("name: hello", &format!("name: {n}"))).collect();
        let file = dir.path().join("burst.yaml");
        std::fs::write(&file, docs.join("\n---\n")).unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        wait_until(Duration::from_secs(20), "the leader to schedule a VM", || async {
            let vms = client.list::<VmSpec>(Some("default"), &Default::default()).await.unwrap();
            vms.items.iter().any(|v| v.status.as_ref().is_some_and(|s| s.node_name.is_some()))
        })
        .await;
        signal(leader_pid, nix::sys::signal::Signal::SIGSTOP);
        let stopped = Instant::now();
        wait_until(Duration::from_secs(20), "the standby to take the lease", || async {
            holder(&client).await.is_some_and(|h| h != leader)
        })
        .await;
        let took_over = stopped.elapsed();
        let lease = client.get::<LeaseSpec>("", "nexus-controller").await.unwrap();
        let successor = lease.spec.holder_identity.clone().unwrap();
        let term_began = lease.spec.acquire_time.unwrap();
        wait_until(Duration::from_secs(60), "every VM to run under the new leader", || async {
            let vms = client.list::<VmSpec>(Some("default"), &Default::default()).await.unwrap();
            vms.items.len() == names.len()
                && vms.items.iter().all(|v| v.status.as_ref().is_some_and(|s| s.phase == VmPhase::Running))
        })
        .await;
        let converged = stopped.elapsed();
        // The world moves on while the old leader sleeps: five VMs go.
        for name in &names[..5] {
            let (ok, _, err) = cluster.nexusctl(&["delete", "vm", name]);
            assert!(ok, "{err}");
        }

        signal(leader_pid, nix::sys::signal::Signal::SIGCONT);
        let continued = Instant::now();
        let log = || std::fs::read_to_string(dir.path().join(leader_log)).unwrap_or_default();
        wait_until(Duration::from_secs(10), "the old leader to notice it lost the lease", || async {
            log().contains("lost the lease")
        })
        .await;
        let noticed = continued.elapsed();
        // Time for anything stray to arrive.
        tokio::time::sleep(Duration::from_secs(3)).await;
        wait_until(Duration::from_secs(30), "the deleted VMs to go", || async {
            client.list::<VmSpec>(Some("default"), &Default::default()).await.unwrap().items.len() == 15
        })
        .await;

        let records = nexus_e2e::all_audit_records(&client).await;
        let of = |who: &str| format!("holder {who} term");
        let late: Vec<_> = records.iter().filter(|r| r.message.contains(&of(&leader)) && r.at >= term_began).collect();
        let by_old = records.iter().filter(|r| r.message.contains(&of(&leader))).count();
        let by_new = records.iter().filter(|r| r.message.contains(&of(&successor))).count();
        let apiserver_log = std::fs::read_to_string(dir.path().join("apiserver.log")).unwrap();
        let refused = apiserver_log.lines().filter(|l| l.contains("refused a fenced-off write")).count();
        let agent_log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
        let agent_refused = agent_log.lines().filter(|l| l.contains("refused a fenced-off call")).count();
        println!(
            "leader SIGSTOPped with 20 VMs in flight: the standby took the lease {} ms later and had every VM \
             Running {} ms after the stop; continued, the old leader stepped down {} ms later; writes of the old \
             term {by_old} (after its end: {}), of the new {by_new}; the old leader's writes refused as fenced off: \
             {refused} by the apiserver, {agent_refused} by the agent",
            took_over.as_millis(),
            converged.as_millis(),
            noticed.as_millis(),
            late.len()
        );
        assert!(late.is_empty(), "writes of the old leader after its term ended: {late:#?}");
        assert!(by_new > 0, "the new leader's writes name its term");
        assert_eq!(lease.spec.lease_transitions, 1);
        let follower = std::fs::read_to_string(dir.path().join(follower_log)).unwrap();
        assert!(follower.contains("became the leader"), "{follower}");
        assert_eq!(holder(&client).await.as_deref(), Some(successor.as_str()), "the lease stayed with the successor");
        // One VMM per VM: two leaders never both started one.
        assert_eq!(nexus_e2e::host::vmm_processes_under(&cluster.run_dir).len(), 15);

        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "--all", "--wait"]);
        assert!(ok, "{err}");
        standby.stop();
        cluster.stop();
    });
}
