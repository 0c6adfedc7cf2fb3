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

/// Runs `nexus-apiserver ARGS` to its end; returns (success, stdout, stderr).
fn apiserver_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(nexus_e2e::bin("nexus-apiserver")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every audit record a server serves, by id.
async fn audit_ids(client: &nexus_client::Client) -> BTreeSet<i64> {
    nexus_e2e::all_audit_records(client).await.iter().map(|r| r.id).collect()
}

#[test]
fn a_backup_taken_under_writes_restores_into_a_new_apiserver_that_serves_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let (source, restored) = (dir.path().join("source"), dir.path().join("restored"));
    let file = dir.path().join("nexus.backup");
    runtime().block_on(async {
        let a = ApiServer::start(&Backend::Sqlite(source.clone()), dir.path(), &[]).await;
        let admin = a.admin_token.clone().unwrap();
        let client = a.client();
        for i in 0..200 {
            client.create(&vm(&format!("vm-{i:03}"))).await.unwrap();
        }
        for i in 0..5 {
            let req = nexus_api::auth::TokenRequest { subject: Some(format!("user:u{i}")), ..Default::default() };
            client.create_token(&req).await.unwrap();
        }
        // Writers keep going while the backup is taken.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (client, stop) = (a.client(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    client.create(&vm(&format!("late-{n:05}"))).await.unwrap();
                    let mut old = client.get::<VmSpec>("dur", &format!("vm-{:03}", n % 200)).await.unwrap();
                    old.metadata.labels.insert("touched".into(), n.to_string());
                    client.replace(&old).await.unwrap();
                    n += 1;
                }
                n
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let args: Vec<String> =
            ["backup", "--to", file.to_str().unwrap(), "--data-dir", source.to_str().unwrap()].map(String::from).into();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            apiserver_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.await.unwrap();
        assert!(ok, "backup: {out}{err}");
        println!("{} (while {written} creates and {written} updates went on)", out.trim());
        assert!(out.contains("integrity check ok"), "{out}");

        // What the backup holds, read from the file itself.
        let sql = |q: &str| {
            let out = std::process::Command::new("sqlite3").arg(&file).arg(q).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let vms: BTreeSet<String> =
            sql("SELECT name || '@' || resource_version FROM objects WHERE kind = 'VM'").lines().map(String::from).collect();
        let tokens: usize = sql("SELECT COUNT(*) FROM tokens").parse().unwrap();
        let audit: BTreeSet<i64> = sql("SELECT id FROM audit").lines().map(|l| l.parse().unwrap()).collect();
        let newest: i64 = sql("SELECT MAX(resource_version) FROM changes").parse().unwrap();
        assert!(vms.len() >= 200, "the backup holds the VMs made before it");

        // Restored into an empty data directory: the same, and never over a live one.
        let args = ["restore", "--from", file.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()];
        let (ok, out, err) = apiserver_cli(&args);
        assert!(ok, "restore: {out}{err}");
        println!("{}", out.trim());
        let (ok, _, err) = apiserver_cli(&args);
        println!("a second restore into the same place: {}", err.trim());
        assert!(!ok && err.contains("refusing to restore over the store"), "{err}");
        let args = ["restore", "--from", file.to_str().unwrap(), "--data-dir", source.to_str().unwrap()];
        assert!(!apiserver_cli(&args).0, "nor over the live source");

        let b = ApiServer::start(&Backend::Sqlite(restored.clone()), dir.path(), &[]).await;
        let on_b = b.client_with(&admin);
        let served: BTreeSet<String> = on_b
            .list::<VmSpec>(Some("dur"), &ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|v| format!("{}@{}", v.name(), v.metadata.resource_version.as_deref().unwrap_or_default()))
            .collect();
        assert_eq!(served, vms, "every VM of the backup, at its version");
        let served_tokens = on_b.list_tokens(None).await.unwrap().items.len();
        assert_eq!(served_tokens, tokens, "every token (the admin's still works)");
        let served_audit = audit_ids(&on_b).await;
        assert!(audit.is_subset(&served_audit), "every audit record of the backup is served");
        let next = on_b.create(&vm("after-restore")).await.unwrap();
        let rv: i64 = next.metadata.resource_version.as_deref().unwrap().parse().unwrap();
        println!(
            "restored apiserver: {} VMs, {served_tokens} tokens, {} audit records (backup: {}), newest version {newest}, next write {rv}",
            served.len(),
            served_audit.len(),
            audit.len()
        );
        assert!(rv > newest, "versions continue upward: {rv} > {newest}");
    });
}

#[test]
fn a_postgres_store_is_backed_up_with_pg_dump_and_restored_into_an_empty_database() {
    let pg = TestPostgres::start();
    let (source, target) = (pg.fresh_database(), pg.fresh_database());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nexus.pgdump");
    runtime().block_on(async {
        let a = ApiServer::start(&Backend::Postgres(source.clone()), dir.path(), &[]).await;
        let admin = a.admin_token.clone().unwrap();
        for i in 0..50 {
            a.client().create(&vm(&format!("vm-{i:02}"))).await.unwrap();
        }
        let (ok, out, err) = apiserver_cli(&["backup", "--to", file.to_str().unwrap(), "--database-url", &source]);
        assert!(ok, "backup: {out}{err}");
        println!("{}", out.trim());
        let (ok, out, err) = apiserver_cli(&["restore", "--from", file.to_str().unwrap(), "--database-url", &target]);
        assert!(ok, "restore: {out}{err}");
        println!("{}", out.trim());
        let (ok, _, err) = apiserver_cli(&["restore", "--from", file.to_str().unwrap(), "--database-url", &source]);
        assert!(!ok && err.contains("refusing to restore over the store"), "{err}");
        let b = ApiServer::start(&Backend::Postgres(target.clone()), dir.path(), &[]).await;
        let listed = b.client_with(&admin).list::<VmSpec>(Some("dur"), &ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 50);
        let newest: i64 = pg.query(&source, "SELECT MAX(resource_version) FROM changes").trim().parse().unwrap();
        let next = b.client_with(&admin).create(&vm("after-restore")).await.unwrap();
        assert!(next.metadata.resource_version.as_deref().unwrap().parse::<i64>().unwrap() > newest);
    });
}
