//! Runs the VM reconciler: watch events and periodic resyncs only enqueue
//! keys; workers reconcile each key from current state.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nexus_api::client::{Client, Event, ListParams};
use nexus_api::{NodeSpec, VmSpec};

use crate::queue::WorkQueue;
use crate::vm::{Action, VmReconciler};

/// `project/name` of a VM.
pub type Key = (String, String);

fn key_of(vm: &nexus_api::Vm) -> Key {
    (vm.metadata.project.clone().unwrap_or_default(), vm.name().to_string())
}

/// Runs `workers` workers and the watches feeding them, forever.
pub async fn run(reconciler: VmReconciler, workers: usize, resync: Duration) {
    let queue: Arc<WorkQueue<Key>> = WorkQueue::new(Default::default());
    let api = reconciler.api.clone();
    tokio::spawn(watch_vms(api.clone(), queue.clone(), resync));
    tokio::spawn(watch_nodes(api, queue.clone()));
    let reconciler = Arc::new(reconciler);
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let queue = queue.clone();
        let reconciler = reconciler.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let key = queue.next().await;
                metrics::gauge!("nexus_controller_queue_depth").set(queue.len() as f64);
                let started = std::time::Instant::now();
                let result = reconciler.reconcile(&key.0, &key.1).await;
                let outcome = if result.is_ok() { "ok" } else { "error" };
                metrics::counter!("nexus_controller_reconcile_total", "result" => outcome).increment(1);
                metrics::histogram!("nexus_controller_reconcile_duration_seconds", "result" => outcome)
                    .record(started.elapsed().as_secs_f64());
                match result {
                    Ok(action) => {
                        queue.forget(&key);
                        if let Action::RequeueAfter(d) = action {
                            queue.add_after(key.clone(), d);
                        }
                    }
                    Err(e) => {
                        metrics::counter!("nexus_controller_retries_total").increment(1);
                        let delay = queue.add_rate_limited(key.clone());
                        tracing::warn!(vm = %format!("{}/{}", key.0, key.1), error = %chain(&e), retry_in_ms = delay.as_millis() as u64, "reconcile failed");
                    }
                }
                queue.done(&key);
            }
        }));
    }
    futures::future::join_all(handles).await;
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

/// Lists VMs, queues every one, then follows the watch; relists when the
/// watch breaks (including 410) and every `resync`.
async fn watch_vms(api: Client, queue: Arc<WorkQueue<Key>>, resync: Duration) {
    loop {
        let list = match api.list::<VmSpec>(None, &ListParams::default()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing VMs failed");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        for vm in &list.items {
            queue.add(key_of(vm));
        }
        let rv = list.metadata.resource_version.clone();
        let stream = match api.watch::<VmSpec>(None, &ListParams::default(), rv.as_deref()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "watching VMs failed");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        let deadline = tokio::time::sleep(resync);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                event = stream.next() => match event {
                    Some(Ok(Event::Added(vm) | Event::Modified(vm) | Event::Deleted(vm))) => queue.add(key_of(&vm)),
                    Some(Ok(Event::Bookmark(_))) => {}
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "VM watch ended; relisting");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

/// Queues the VMs that wait for a node whenever a node changes, so a VM
/// pending for lack of nodes is placed as soon as one is Ready.
async fn watch_nodes(api: Client, queue: Arc<WorkQueue<Key>>) {
    loop {
        let stream = match api.watch::<NodeSpec>(None, &ListParams::default(), None).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "watching nodes failed");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        let mut seen = std::collections::HashSet::new();
        while let Some(event) = stream.next().await {
            let node = match event {
                Ok(Event::Added(n) | Event::Modified(n)) => n,
                Ok(_) => continue,
                Err(_) => break,
            };
            // Heartbeats arrive every few seconds; only a node's first
            // sighting or a readiness change needs pending VMs looked at.
            let ready = node.status_or_default().is_ready(chrono::Utc::now(), chrono::Duration::seconds(30));
            if !seen.insert((node.name().to_string(), ready)) {
                continue;
            }
            let params = ListParams { field_selector: Some("status.phase=Pending".into()), ..Default::default() };
            if let Ok(list) = api.list::<VmSpec>(None, &params).await {
                for vm in &list.items {
                    queue.add(key_of(vm));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
