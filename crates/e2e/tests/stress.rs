//! Holding under stress, the way users and operators push it: GitOps
//! re-applying a repository, an apiserver outage under a single controller,
//! a burst of VMs with large disks on one agent, and the leader killed
//! during churn.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nexus_api::{EventSpec, LeaseSpec, NodeSpec, VmPhase, VmPoolSpec, VmSpec};
use nexus_client::{Event, ListParams};
use nexus_e2e::{Cluster, Proc, in_private_netns, repo_root, wait_until};

fn vm_yaml(name: &str, label: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\n  labels:\n    batch: {label}\nspec:\n  vcpu: 1\n  memMib: 64\n  \
         kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n"
    )
}

/// The resourceVersion of every object of the kinds users apply.
async fn versions(cluster: &Cluster) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for kind in nexus_api::registry::kinds().iter().filter(|k| !["Node", "Lease", "Event"].contains(&k.kind)) {
        let list: serde_json::Value =
            cluster.client().raw(reqwest::Method::GET, &kind.all_projects(), None).await.unwrap();
        for item in list["items"].as_array().unwrap() {
            let m = &item["metadata"];
            let key = format!("{}/{}/{}", kind.kind, m["project"].as_str().unwrap_or(""), m["name"].as_str().unwrap());
            out.insert(key, m["resourceVersion"].as_str().unwrap().to_string());
        }
    }
    out
}

async fn phase(cluster: &Cluster, name: &str) -> Option<VmPhase> {
    cluster.client().get::<VmSpec>("default", name).await.ok().map(|v| v.status_or_default().phase)
}

#[test]
fn reapplying_the_examples_ten_times_changes_nothing_and_diff_is_clean() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        for path in ["examples", "examples/gitops"] {
            let path = repo_root().join(path).display().to_string();
            let (ok, first, err) = cluster.nexusctl(&["apply", "-f", &path]);
            assert!(ok, "{err}");
            println!("first apply of {path}:\n{first}");
            // Let the controller place and start what was applied.
            wait_until(Duration::from_secs(30), "the example VMs to settle", || async {
                phase(&cluster, "hello").await == Some(VmPhase::Running)
                    && phase(&cluster, "ci-job-1").await == Some(VmPhase::Running)
                    && phase(&cluster, "runner-1").await == Some(VmPhase::Stopped)
                    && phase(&cluster, "runner-2").await == Some(VmPhase::Stopped)
            })
            .await;
            // And every pool to have all its VMs available.
            wait_until(Duration::from_secs(60), "the example pools to settle", || async {
                let pools = cluster.client().list::<VmPoolSpec>(None, &Default::default()).await.unwrap().items;
                pools.iter().all(|p| {
                    let s = p.status_or_default();
                    s.observed_generation == p.metadata.generation
                        && s.available_replicas == p.spec.replicas
                        && s.replicas == p.spec.replicas
                        && s.rollout.is_some_and(|r| r.phase == nexus_api::pool::RolloutPhase::Complete)
                })
            })
            .await;
            let hello = cluster.client().get::<VmSpec>("default", "hello").await.unwrap();
            assert_eq!(hello.metadata.annotations.get("nexus.dev/placed-by").map(String::as_str), Some("scheduler"));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before = versions(&cluster).await;
            for round in 2..=10 {
                let (ok, out, err) = cluster.nexusctl(&["apply", "-f", &path]);
                assert!(ok, "{err}");
                let changed: Vec<&str> = out.lines().filter(|l| !l.ends_with(" unchanged")).collect();
                assert!(changed.is_empty(), "apply {round} of {path} changed {changed:?}");
            }
            let after = versions(&cluster).await;
            assert_eq!(before, after, "no object of {path} moved");
            let (clean, diff, err) = cluster.nexusctl(&["diff", "-f", &path, "--exit-code"]);
            assert!(clean, "diff of {path} is not empty:\n{diff}{err}");
            println!("{path}: 9 re-applies, {} objects, every one unchanged; diff empty", after.len());
            let hello = cluster.client().get::<VmSpec>("default", "hello").await.unwrap();
            assert_eq!(hello.metadata.annotations.get("nexus.dev/placed-by").map(String::as_str), Some("scheduler"));
        }
        for name in ["hello", "ci-job-1", "runner-1", "runner-2"] {
            let (ok, _, err) = cluster.nexusctl(&["delete", "vm", name, "--wait"]);
            assert!(ok, "{err}");
        }
        cluster.stop();
    });
}

#[test]
fn one_controller_survives_an_apiserver_outage_and_acts_within_two_seconds_of_its_return() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let pid = cluster.controller.pid();
        cluster.apiserver.kill();
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        cluster.restart_apiserver().await;
        let back = Instant::now();
        println!("apiserver down for {} ms", (back - down).as_millis());
        let file = dir.path().join("after.yaml");
        std::fs::write(&file, vm_yaml("after-outage", "outage")).unwrap();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        wait_until(Duration::from_secs(30), "the VM applied after the outage to run", || async {
            phase(&cluster, "after-outage").await == Some(VmPhase::Running)
        })
        .await;
        let took = back.elapsed();
        println!("a VM applied after the apiserver returned was Running {} ms after its return", took.as_millis());
        assert!(cluster.controller.is_running(), "the controller process is still there");
        assert_eq!(cluster.controller.pid(), pid, "the same process");
        let log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
        assert!(log.contains("lost the lease; stopped the controllers, campaigning again"), "{log}");
        assert_eq!(log.matches("\"became the leader\"").count(), 2, "it led again");
        assert!(took < Duration::from_secs(2), "{} ms", took.as_millis());
        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "after-outage", "--wait"]);
        assert!(ok, "{err}");
        cluster.stop();
    });
}

#[test]
fn twenty_vms_with_large_disks_at_once_never_stall_the_agents_heartbeat() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let rootfs = std::fs::metadata("/var/lib/nexus/images/rootfs.ext4").unwrap().len();
        assert!(rootfs >= 256 << 20, "the example rootfs is {rootfs} bytes");
        // Every heartbeat the node writes, as the apiserver streams it.
        let client = cluster.client();
        let stream = client.watch::<NodeSpec>(None, &ListParams::default(), None).await.unwrap();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let beats = tokio::spawn(async move {
            let mut times = Vec::new();
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    _ = &mut stopped => return times,
                    event = stream.next() => match event {
                        Some(Ok(Event::Added(n) | Event::Modified(n))) => {
                            if let Some(t) = n.status_or_default().last_heartbeat_time
                                && times.last() != Some(&t)
                            {
                                times.push(t);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return times,
                    },
                }
            }
        });
        let names: Vec<String> = (0..20).map(|i| format!("burst-{i:02}")).collect();
        let yaml: Vec<String> = names.iter().map(|n| vm_yaml(n, "burst")).collect();
        let file = dir.path().join("burst.yaml");
        std::fs::write(&file, yaml.join("---\n")).unwrap();
        let started = Instant::now();
        let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "{err}");
        let params = ListParams { label_selector: Some("batch=burst".into()), ..Default::default() };
        wait_until(Duration::from_secs(120), "20 VMs Running", || async {
            client
                .list::<VmSpec>(Some("default"), &params)
                .await
                .is_ok_and(|l| l.items.iter().filter(|v| v.status_or_default().phase == VmPhase::Running).count() == 20)
        })
        .await;
        println!("20 VMs with {} MiB disks Running {} ms after the apply", rootfs >> 20, started.elapsed().as_millis());
        // A few more beats after the burst, then stop listening.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = stop.send(());
        let times = beats.await.unwrap();
        let gaps: Vec<i64> = times.windows(2).map(|w| (w[1] - w[0]).num_milliseconds()).collect();
        let largest = gaps.iter().copied().max().unwrap_or(0);
        println!("{} heartbeats during the burst; largest gap {largest} ms (interval 1000 ms)", times.len());
        assert!(times.len() >= 3, "{times:?}");
        assert!(largest <= 2500, "heartbeat gaps: {gaps:?}");
        let vms = client.list::<VmSpec>(Some("default"), &params).await.unwrap().items;
        let restarts: u32 = vms.iter().map(|v| v.status_or_default().runtime.map(|r| r.restarts).unwrap_or(0)).sum();
        let events = client.list::<EventSpec>(None, &ListParams::default()).await.unwrap().items;
        let lost = events.iter().filter(|e| e.spec.reason == "NodeLost").count();
        let restarted = events.iter().filter(|e| e.spec.reason == "Restarted").count();
        println!("restarts: {restarts}, NodeLost events: {lost}, Restarted events: {restarted}");
        assert_eq!((restarts, lost, restarted), (0, 0, 0));
        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "-l", "batch=burst", "--wait"]);
        assert!(ok, "{err}");
        cluster.stop();
    });
}

/// Which of `procs` holds the controllers' lease now.
async fn leader_of(cluster: &Cluster, pids: &[u32]) -> Option<usize> {
    let lease = cluster.client().get::<LeaseSpec>("", "nexus-controller").await.ok()?;
    let holder = lease.spec.holder_identity?;
    pids.iter().position(|p| holder.ends_with(&format!("-{p}")))
}

#[test]
fn a_leader_killed_during_churn_is_replaced_and_every_vm_converges_within_five_seconds() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "node-a").await;
        let mut standby: Proc = cluster.spawn_controller("127.0.0.1:7446", "controller-1.log");
        let mut live: Vec<String> = Vec::new();
        let mut took = Vec::new();
        for run in 0..5 {
            let pids = [cluster.controller.pid(), standby.pid()];
            wait_until(Duration::from_secs(15), "a leader", || async { leader_of(&cluster, &pids).await.is_some() })
                .await;
            let leader = leader_of(&cluster, &pids).await.unwrap();
            // Churn: three new VMs and one deleted, then the leader dies.
            let new: Vec<String> = (0..3).map(|i| format!("churn-{run}-{i}")).collect();
            let yaml: Vec<String> = new.iter().map(|n| vm_yaml(n, "churn")).collect();
            let file = dir.path().join(format!("churn-{run}.yaml"));
            std::fs::write(&file, yaml.join("---\n")).unwrap();
            let (ok, _, err) = cluster.nexusctl(&["apply", "-f", &file.display().to_string()]);
            assert!(ok, "{err}");
            live.extend(new);
            let gone = (run > 0).then(|| live.remove(0));
            if let Some(g) = &gone {
                let (ok, _, err) = cluster.nexusctl(&["delete", "vm", g]);
                assert!(ok, "{err}");
            }
            if leader == 0 {
                cluster.controller.kill()
            } else {
                standby.kill()
            }
            let killed = Instant::now();
            let client = cluster.client();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let vms = client.list::<VmSpec>(Some("default"), &ListParams::default()).await.unwrap().items;
                let running: Vec<&str> = vms
                    .iter()
                    .filter(|v| v.status_or_default().phase == VmPhase::Running && !v.is_deleting())
                    .map(|v| v.name())
                    .collect();
                if vms.len() == live.len() && live.iter().all(|n| running.contains(&n.as_str())) {
                    break;
                }
                if Instant::now() > deadline {
                    let state: Vec<String> = vms
                        .iter()
                        .map(|v| format!("{} {:?} deleting={}", v.name(), v.status_or_default().phase, v.is_deleting()))
                        .collect();
                    let mut logs = String::new();
                    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.ends_with(".log") {
                            logs.push_str(&format!("--- {name}\n{}\n", std::fs::read_to_string(e.path()).unwrap()));
                        }
                    }
                    panic!("run {run}: not converged after 30 s: want {live:?}, have {state:?}\n{logs}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let t = killed.elapsed();
            println!("run {run}: leader killed during churn; every VM converged {} ms later", t.as_millis());
            took.push(t);
            // A new standby for the next run, where the dead one was.
            let log = format!("controller-{}.log", run + 2);
            if leader == 0 {
                cluster.controller = cluster.spawn_controller("127.0.0.1:7445", &log);
            } else {
                standby = cluster.spawn_controller("127.0.0.1:7446", &log);
            }
        }
        let worst = took.iter().max().unwrap();
        println!("worst of 5 failovers: {} ms", worst.as_millis());
        assert!(*worst < Duration::from_secs(5), "{took:?}");
        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "-l", "batch=churn", "--wait"]);
        assert!(ok, "{err}");
        standby.stop();
        cluster.stop();
    });
}
