//! Several apiservers on one PostgreSQL share watches, and acknowledged
//! writes survive a SIGKILL of the apiserver on both backends.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nexus_api::{Vm, VmSpec};
use nexus_client::{Event, ListParams};
use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend};

fn vm(name: &str) -> Vm {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "vcpu": 1, "memMib": 128, "kernel": "/img/vmlinux", "rootfs": "/img/rootfs.ext4"
    }))
    .unwrap();
    Vm::new(name, Some("dur"), spec)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn two_apiservers_on_one_postgres_share_watches_in_one_order() {
    let pg = TestPostgres::start();
    let url = pg.fresh_database();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let backend = Backend::Postgres(url);
        let a = ApiServer::start(&backend, dir.path(), &[]).await;
        let b = ApiServer::start(&backend, dir.path(), &[]).await;
        let admin = a.admin_token.clone().expect("the first apiserver bootstraps the admin");
        let (ca, cb) = (a.client(), b.client_with(&admin));
        let start = cb.list::<VmSpec>(Some("dur"), &ListParams::default()).await.unwrap().metadata.resource_version;
        let on_b = cb.watch::<VmSpec>(Some("dur"), &ListParams::default(), start.as_deref()).await.unwrap();
        let on_a = ca.watch::<VmSpec>(Some("dur"), &ListParams::default(), start.as_deref()).await.unwrap();

        // A write through A is seen by a watch on B.
        let t = Instant::now();
        ca.create(&vm("first")).await.unwrap();
        let mut on_b = std::pin::pin!(on_b);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), on_b.next())
                .await
                .expect("B saw A's write")
                .unwrap()
                .unwrap()
            {
                Event::Added(o) => {
                    assert_eq!(o.name(), "first");
                    break;
                }
                Event::Bookmark(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        println!("write on A seen by a watch on B after {} ms", t.elapsed().as_millis());

        // Writers on both replicas at once: both watches see every change,
        // once, in one strictly increasing order.
        let mut writers = Vec::new();
        for (i, client) in [ca.clone(), cb.clone()].into_iter().enumerate() {
            writers.push(tokio::spawn(async move {
                for n in 0..40 {
                    client.create(&vm(&format!("r{i}-{n}"))).await.unwrap();
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        let rest_b = collect(on_b, 80).await;
        let seen_a = collect(on_a, 81).await;
        assert!(seen_a.windows(2).all(|w| w[0].0 < w[1].0), "versions strictly increase on A");
        assert_eq!(seen_a[1..], rest_b[..80], "both replicas deliver the same changes in the same order");
        let names: BTreeSet<&str> = seen_a.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names.len(), 81, "no change lost or repeated");
    });
}

/// The next `n` ADDED events of a watch, as (resourceVersion, name).
async fn collect<S>(stream: S, n: usize) -> Vec<(i64, String)>
where
    S: futures::Stream<Item = Result<Event<Vm>, nexus_client::ClientError>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut seen = Vec::new();
    while seen.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("events").unwrap().unwrap() {
            Event::Added(o) => {
                seen.push((o.metadata.resource_version.as_deref().unwrap().parse().unwrap(), o.name().to_string()))
            }
            Event::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    seen
}

/// Writes from 4 concurrent writers until the apiserver is SIGKILLed, then
/// restarts it and checks that every acknowledged write is there.
async fn acknowledged_writes_survive_sigkill(backend: Backend, dir: &std::path::Path) {
    let mut server = ApiServer::start(&backend, dir, &[]).await;
    let client = server.client();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                let name = format!("w{w}-{n}");
                match client.create(&vm(&name)).await {
                    Ok(_) => acked.lock().unwrap().push(name),
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill it mid-stream, once plenty of writes were acknowledged.
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.proc.kill();
    for w in writers {
        w.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    let admin = server.admin_token.clone().expect("the bootstrap admin's token");
    let restarted = ApiServer::start(&backend, dir, &[]).await;
    let stored: BTreeSet<String> = restarted
        .client_with(&admin)
        .list::<VmSpec>(Some("dur"), &ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|v| v.name().to_string())
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    println!(
        "{}: {} writes acknowledged before SIGKILL, {} objects after restart, {} acknowledged writes missing",
        backend.name(),
        acked.len(),
        stored.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

#[test]
fn acknowledged_writes_survive_sigkill_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Sqlite(dir.path().join("data"));
    runtime().block_on(acknowledged_writes_survive_sigkill(backend, dir.path()));
}

#[test]
fn acknowledged_writes_survive_sigkill_on_postgres() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.fresh_database();
    runtime().block_on(acknowledged_writes_survive_sigkill(Backend::Postgres(url.clone()), dir.path()));
    // Every committed mutation has its audit row: they commit together.
    let objects: u64 = pg.query(&url, "SELECT count(*) FROM objects").trim().parse().unwrap();
    let changes: u64 = pg.query(&url, "SELECT count(*) FROM changes").trim().parse().unwrap();
    let audits: u64 = pg.query(&url, "SELECT count(*) FROM audit").trim().parse().unwrap();
    println!("postgres: {objects} objects, {changes} changes, {audits} audit rows");
    assert_eq!(changes, objects, "one create per object");
    assert_eq!(audits, changes, "one audit row per committed mutation");
}
