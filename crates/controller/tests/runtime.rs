//! The controller runtime against a real apiserver in this process: stores
//! follow changes, a broken watch resumes without listing again, an expired
//! version lists again, and a controller reconciles each change.

#![allow(clippy::unwrap_used)] // a panic is the failure report

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nexus_api::{Template, TemplateSpec};
use nexus_controller::runtime::{Action, Controller, Reconciler, Reflectors};
use support::{Api, wait_until};

fn template(name: &str, vcpu: u8) -> Template {
    Template::new(
        name,
        Some("default"),
        TemplateSpec {
            initrd: None,
            vcpu,
            mem_mib: 128,
            kernel: "/k".into(),
            rootfs: "/r".into(),
            boot_args: None,
            network: None,
            node_selector: Default::default(),
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_watch_resumes_from_the_last_version_without_listing_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = Api::start(dir.path(), 100_000).await;
    let c = api.client();
    c.create(&template("a", 1)).await.unwrap();
    let store = Reflectors::new(c.clone()).store::<TemplateSpec>();
    wait_until(Duration::from_secs(5), "the list and the watch", || async { store.watches() == 1 }).await;
    assert_eq!(store.lists(), 1);
    // Bookmarks (every 300 ms here) move the resume point on while idle.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for round in 0..3 {
        api.restart().await;
        c.create(&template(&format!("b{round}"), 2)).await.unwrap();
        wait_until(Duration::from_secs(10), "the change after the restart", || async {
            store.get_named("default", &format!("b{round}")).is_some()
        })
        .await;
    }
    println!("after 3 apiserver restarts: {} LIST, {} watches", store.lists(), store.watches());
    assert_eq!(store.lists(), 1, "resumed, never listed again");
    assert!(store.watches() >= 4);
    assert_eq!(store.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_compacted_away_while_disconnected_makes_the_reflector_list_again() {
    let dir = tempfile::tempdir().unwrap();
    // Keep only the last 2 changes: anything older is gone (410).
    let mut api = Api::start(dir.path(), 2).await;
    let c = api.client();
    c.create(&template("a", 1)).await.unwrap();
    let store = Reflectors::new(c.clone()).store::<TemplateSpec>();
    store.wait_synced().await;
    api.stop().await;
    // While the reflector is away, many changes go by on a second server.
    let mut other = Api::start(dir.path(), 2).await;
    let oc = other.client();
    for i in 0..20 {
        oc.create(&template(&format!("t{i}"), 1)).await.unwrap();
    }
    oc.delete::<TemplateSpec>("default", "a").await.unwrap();
    other.stop().await;
    api.restart().await;
    wait_until(Duration::from_secs(10), "the store to match after the relist", || async {
        store.len() == 20 && store.get_named("default", "a").is_none()
    })
    .await;
    println!("LISTs: {}, watches: {}", store.lists(), store.watches());
    assert_eq!(store.lists(), 2, "one relist after the 410");
}

/// Counts reconciles of each template name.
struct Counting(Arc<AtomicUsize>);

impl Reconciler for Counting {
    type Spec = TemplateSpec;
    type Error = std::io::Error;

    async fn reconcile(&self, _obj: Arc<Template>) -> Result<Action, std::io::Error> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Action::AwaitChange)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_reconciles_every_object_at_start_and_each_change_after() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), 100_000).await;
    let c = api.client();
    c.create(&template("a", 1)).await.unwrap();
    c.create(&template("b", 1)).await.unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let store = Reflectors::new(c.clone()).store::<TemplateSpec>();
    let controller = Controller::new("counting", store, Counting(count.clone()));
    let running = tokio::spawn(async move { controller.run().await });
    wait_until(Duration::from_secs(5), "both reconciled", || async { count.load(Ordering::SeqCst) >= 2 }).await;
    let mut t = c.get::<TemplateSpec>("default", "a").await.unwrap();
    t.spec.vcpu = 2;
    c.replace(&t).await.unwrap();
    wait_until(Duration::from_secs(5), "the change reconciled", || async { count.load(Ordering::SeqCst) >= 3 }).await;
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflectors_started_while_objects_change_end_with_exactly_the_final_state() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), 100_000).await;
    let c = api.client();
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let created = c.create(&template(&format!("t{i}"), 1)).await.unwrap();
                let mut next = created.clone();
                next.spec.vcpu = 2;
                c.replace(&next).await.unwrap();
            }
        })
    };
    let mut stores = Vec::new();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        stores.push(Reflectors::new(c.clone()).store::<TemplateSpec>());
    }
    writer.await.unwrap();
    for (i, store) in stores.iter().enumerate() {
        wait_until(Duration::from_secs(10), &format!("store {i} to hold the final state"), || async {
            store.len() == 150 && store.list().iter().all(|t| t.spec.vcpu == 2)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_in_batches_repeats_fold_and_a_refused_one_costs_only_itself() {
    use nexus_api::EventSpec;
    use nexus_api::event::EventType;
    use nexus_controller::runtime::events::Recorder;
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), 100_000).await;
    let c = api.client();
    let mut about = template("web", 1);
    about.metadata.uid = Some("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11".into());
    let recorder = Recorder::new(c.clone());
    // Published together: they go in one request, whose one bad reason
    // (not a CamelCase word) refuses it; the others are written alone.
    recorder.publish(&about, EventType::Normal, "Started", "first").await;
    recorder.publish(&about, EventType::Normal, "Started", "again").await;
    recorder.publish(&about, EventType::Warning, "not camel", "refused").await;
    recorder.publish(&about, EventType::Normal, "Scheduled", "placed").await;
    let reasons = || async {
        let mut events = c.list::<EventSpec>(None, &Default::default()).await.unwrap().items;
        events.sort_by(|a, b| a.spec.reason.cmp(&b.spec.reason));
        events.into_iter().map(|e| (e.spec.reason, e.spec.count, e.spec.message)).collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(5), "two events", || async { reasons().await.len() == 2 }).await;
    assert_eq!(
        reasons().await,
        [("Scheduled".to_string(), 1, "placed".to_string()), ("Started".to_string(), 2, "again".to_string())]
    );
}
