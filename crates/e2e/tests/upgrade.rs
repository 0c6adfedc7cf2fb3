//! The upgrade path of the store: databases written by the apiserver of an
//! earlier commit (`tests/fixtures/upgrade/`, made by
//! `hack/upgrade-fixture.sh`), at an older schema, are migrated forward by
//! today's apiserver, which then serves every object they hold, accepts
//! their tokens, and takes writes.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade")
}

/// (kind, project, name) of every object in the SQLite fixture.
fn objects_in_fixture() -> Vec<(String, String, String)> {
    let dump = std::fs::read_to_string(fixtures().join("sqlite.sql")).unwrap();
    dump.lines()
        .filter_map(|l| l.strip_prefix("INSERT INTO objects VALUES('"))
        .map(|rest| {
            let f: Vec<&str> = rest.splitn(4, "','").collect();
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

/// Every object of the fixture, read through today's API with the token the
/// old apiserver issued; then a write.
async fn serves_everything(server: &ApiServer, token: &str) {
    let client = server.client_with(token);
    let objects = objects_in_fixture();
    assert!(objects.len() >= 10, "the fixture holds objects of every kind: {objects:?}");
    let mut kinds = std::collections::BTreeSet::new();
    for (kind, project, name) in &objects {
        let info =
            nexus_api::registry::kinds().iter().find(|k| k.kind == kind).unwrap_or_else(|| panic!("kind {kind}"));
        let path = if info.namespaced {
            format!("/v1/projects/{project}/{}/{name}", info.plural)
        } else {
            format!("/v1/{}/{name}", info.plural)
        };
        let got: Result<serde_json::Value, _> = client.raw(reqwest::Method::GET, &path, None).await;
        let got = got.unwrap_or_else(|e| panic!("GET {path} after the upgrade: {e}"));
        assert_eq!(got["metadata"]["name"], name.as_str(), "{path}");
        kinds.insert(kind.clone());
    }
    println!("{} objects of {} kinds served after the upgrade: {kinds:?}", objects.len(), kinds.len());
    // Writes work on the migrated store.
    let mut vm: nexus_api::Vm = client.get("default", "hello").await.unwrap();
    vm.spec.mem_mib = Some(512);
    let written = client.replace(&vm).await.unwrap();
    assert_eq!(written.spec.mem_mib, Some(512));
    assert!(
        written.metadata.resource_version.as_deref().unwrap().parse::<i64>().unwrap() > objects.len() as i64,
        "versions go on from the old store's"
    );
}

fn migrations_in_tree() -> usize {
    std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/sqlite")).unwrap().count()
}

#[tokio::test]
async fn a_sqlite_store_of_an_earlier_release_is_migrated_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("nexus.db");
    let loaded = Command::new("sqlite3")
        .arg(&db)
        .stdin(std::fs::File::open(fixtures().join("sqlite.sql")).unwrap())
        .status()
        .expect("sqlite3 (hack/test.sh installs it)");
    assert!(loaded.success());
    let count = |sql: &str| {
        let out = Command::new("sqlite3").arg(&db).arg(sql).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<usize>().unwrap()
    };
    let before = count("SELECT count(*) FROM _sqlx_migrations");
    assert!(before < migrations_in_tree(), "the fixture predates a migration, so one runs forward");
    let server = ApiServer::start(&Backend::Sqlite(data.clone()), dir.path(), &[]).await;
    assert!(server.admin_token.is_none(), "a store with tokens gets no new bootstrap token");
    let token = std::fs::read_to_string(fixtures().join("admin-sqlite.token")).unwrap();
    serves_everything(&server, token.trim()).await;
    assert_eq!(count("SELECT count(*) FROM _sqlx_migrations"), migrations_in_tree(), "every migration applied");
    println!("SQLite: migrations {before} -> {}", migrations_in_tree());
}

#[tokio::test]
async fn a_postgres_store_of_an_earlier_release_is_migrated_and_served() {
    let pg = TestPostgres::start();
    let url = pg.fresh_database();
    let dump = std::fs::read_to_string(fixtures().join("postgres.sql")).unwrap();
    // Statements psql runs as a script; COPY blocks included.
    let loaded = Command::new("psql")
        .args([
            url.as_str(),
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-f",
            &fixtures().join("postgres.sql").display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{}", String::from_utf8_lossy(&loaded.stderr));
    assert!(dump.contains("COPY public.objects"));
    let before: usize = pg.query(&url, "SELECT count(*) FROM _sqlx_migrations").trim().parse().unwrap();
    assert!(before < migrations_in_tree());
    let dir = tempfile::tempdir().unwrap();
    let server = ApiServer::start(&Backend::Postgres(url.clone()), dir.path(), &[]).await;
    let token = std::fs::read_to_string(fixtures().join("admin-postgres.token")).unwrap();
    serves_everything(&server, token.trim()).await;
    let after: usize = pg.query(&url, "SELECT count(*) FROM _sqlx_migrations").trim().parse().unwrap();
    assert_eq!(after, migrations_in_tree());
    println!("PostgreSQL: migrations {before} -> {after}");
}
