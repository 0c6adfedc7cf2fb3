//! Runs the VM reconciler: reflectors keep the caches current and turn
//! changes into queued keys; once every cache is synced, workers reconcile
//! each key from the cache.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_api::{Node, VmPhase};

use crate::cache::{self, Caches, ObjectKey};
use crate::queue::WorkQueue;
use crate::vm::{Action, VmReconciler};

/// `project/name` of a VM.
pub type Key = ObjectKey;

/// Starts the reflectors, waits for the caches, then runs `workers`
/// workers forever. `resync` is how often every cache is listed afresh.
pub async fn run(reconciler: VmReconciler, workers: usize, resync: Duration) {
    let queue: Arc<WorkQueue<Key>> = WorkQueue::new(Default::default());
    let caches = reconciler.caches.clone();
    let api = reconciler.api.clone();
    spawn_reflectors(&api, &caches, &queue, resync, reconciler.node_grace);
    let started = Instant::now();
    caches.wait_synced().await;
    tracing::info!(
        vms = caches.vms.len(),
        nodes = caches.nodes.len(),
        templates = caches.templates.len(),
        images = caches.images.len(),
        millis = started.elapsed().as_millis() as u64,
        "caches synced; starting workers"
    );
    let reconciler = Arc::new(reconciler);
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let queue = queue.clone();
        let reconciler = reconciler.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let key = queue.next().await;
                work(&reconciler, &queue, key).await;
            }
        }));
    }
    futures::future::join_all(handles).await;
}

async fn work(reconciler: &VmReconciler, queue: &Arc<WorkQueue<Key>>, key: Key) {
    metrics::gauge!("nexus_controller_queue_depth").set(queue.len() as f64);
    let started = Instant::now();
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

/// One reflector per cached kind. A VM change queues that VM; a template or
/// image change queues the VMs of its project that wait for one; a node
/// appearing or changing readiness queues the VMs placed on it and those
/// waiting for a place.
fn spawn_reflectors(
    api: &nexus_api::client::Client,
    caches: &Caches,
    queue: &Arc<WorkQueue<Key>>,
    resync: Duration,
    node_grace: chrono::Duration,
) {
    let q = queue.clone();
    tokio::spawn(cache::reflect(api.clone(), caches.vms.clone(), resync, move |vm| q.add(cache::key_of(vm))));

    let (q, vms, nodes) = (queue.clone(), caches.vms.clone(), caches.nodes.clone());
    let seen: Mutex<HashSet<(String, bool)>> = Default::default();
    let exits = Mutex::new(ExitsSeen::default());
    tokio::spawn(cache::reflect(api.clone(), caches.nodes.clone(), resync, move |node: &Node| {
        // A VMM ended unasked: its VM's restart policy applies now.
        let fresh = exits.lock().unwrap_or_else(|p| p.into_inner()).fresh(&node.status_or_default().vmm_exits);
        if !fresh.is_empty() {
            for vm in vms.list().iter().filter(|vm| fresh.contains(vm.uid())) {
                q.add(cache::key_of(vm));
            }
        }
        // Heartbeats arrive every few seconds; only a node's first sighting,
        // a readiness change or its deletion needs VMs looked at.
        let now = chrono::Utc::now();
        let ready = node.status_or_default().is_ready(now, node_grace);
        let deleted = nodes.get("", node.name()).is_none();
        let ready_nodes = nodes.list().iter().filter(|n| n.status_or_default().is_ready(now, node_grace)).count();
        metrics::gauge!("nexus_controller_ready_nodes").set(ready_nodes as f64);
        {
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            if deleted {
                seen.retain(|(name, _)| name != node.name());
            } else if !seen.insert((node.name().to_string(), ready)) {
                return;
            }
        }
        for vm in vms.list() {
            let pending = vm.status.as_ref().is_none_or(|s| s.phase == VmPhase::Pending);
            if pending || vm.spec.node_name.as_deref() == Some(node.name()) {
                q.add(cache::key_of(&vm));
            }
        }
    }));

    let (q, vms) = (queue.clone(), caches.vms.clone());
    tokio::spawn(cache::reflect(api.clone(), caches.templates.clone(), resync, move |t| {
        queue_waiting(&q, &vms, t.metadata.project.as_deref());
    }));
    let (q, vms) = (queue.clone(), caches.vms.clone());
    tokio::spawn(cache::reflect(api.clone(), caches.images.clone(), resync, move |i| {
        queue_waiting(&q, &vms, i.metadata.project.as_deref());
    }));
}

/// The VMM exit notices already acted on, by VM uid.
#[derive(Debug, Default)]
struct ExitsSeen {
    last: std::collections::HashMap<String, chrono::DateTime<chrono::Utc>>,
}

impl ExitsSeen {
    /// The uids among `notices` not acted on yet; remembers them.
    fn fresh(&mut self, notices: &[nexus_api::node::VmmExitNotice]) -> HashSet<String> {
        let mut fresh = HashSet::new();
        for n in notices {
            if self.last.get(&n.uid).is_none_or(|at| *at < n.at) {
                self.last.insert(n.uid.clone(), n.at);
                fresh.insert(n.uid.clone());
            }
        }
        // Agents keep a notice for a minute; keep ours a little longer.
        let cutoff = chrono::Utc::now() - chrono::Duration::minutes(5);
        self.last.retain(|_, at| *at > cutoff);
        fresh
    }
}

/// Queues the VMs of `project` whose configuration is not resolved yet.
fn queue_waiting(queue: &WorkQueue<Key>, vms: &cache::Store<nexus_api::VmSpec>, project: Option<&str>) {
    for vm in vms.list() {
        if vm.metadata.project.as_deref() != project {
            continue;
        }
        let resolved = vm
            .status
            .as_ref()
            .and_then(|s| nexus_api::meta::find_condition(&s.conditions, "Resolved"))
            .is_some_and(|c| c.status == nexus_api::ConditionStatus::True);
        if !resolved {
            queue.add(cache::key_of(&vm));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::node::VmmExitNotice;

    #[test]
    fn each_exit_notice_is_acted_on_once() {
        let mut seen = ExitsSeen::default();
        let at = chrono::Utc::now();
        let a = VmmExitNotice { uid: "a".into(), at };
        assert_eq!(seen.fresh(std::slice::from_ref(&a)), HashSet::from(["a".to_string()]));
        assert!(seen.fresh(std::slice::from_ref(&a)).is_empty(), "a heartbeat repeats it");
        let again = VmmExitNotice { uid: "a".into(), at: at + chrono::Duration::seconds(1) };
        assert_eq!(seen.fresh(&[a, again]).len(), 1, "a later exit of the same VM is news");
    }
}
