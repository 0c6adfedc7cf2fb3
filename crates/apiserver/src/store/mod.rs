//! Versioned object storage on SQLite or PostgreSQL, with a change log for
//! watches.
//!
//! Every mutation writes the object, its change-log row and its audit row
//! in one transaction, under a writer lock (in-process for SQLite, an
//! advisory lock for PostgreSQL, so versions follow commit order across
//! replicas). Mutations are queued to one writer task, which commits the
//! ones waiting together (group commit: one fsync for many writes) and
//! answers each only once its transaction is durable. Committed changes are
//! broadcast to local watchers in resourceVersion order; on PostgreSQL
//! every replica learns of them through LISTEN/NOTIFY and reads them from
//! the change log.

pub mod access;
mod sql;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, Row, SqlitePool};
use tokio::sync::{Mutex, Notify, broadcast, mpsc, oneshot};

pub use sql::Dialect;
use sql::{NOTIFY_CHANNEL, Sql, number_placeholders_for};

use crate::error::ApiError;

/// Migrations of each backend, embedded at build time.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
pub static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// How many changes are kept in the log for watches to resume from.
pub const DEFAULT_RETAINED_CHANGES: i64 = 100_000;

/// Kind of change, as watch events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "ADDED" => ChangeType::Added,
            "DELETED" => ChangeType::Deleted,
            _ => ChangeType::Modified,
        }
    }
}

/// One committed change of one object.
#[derive(Debug, Clone)]
pub struct Change {
    pub resource_version: i64,
    pub kind: String,
    pub project: String,
    pub type_: ChangeType,
    /// The object after the change (its last state, for DELETED), carrying
    /// its new resourceVersion.
    pub object: Value,
    /// `object` as stored: JSON on one line, which its watch event line
    /// carries as it is.
    pub body: String,
    /// The request it came from (see [`AuditInfo::trace_id`]).
    pub request_id: String,
    /// The change as a watch event line: made by the first watch that
    /// sends it and shared by every other (see `crate::watch`).
    pub line: std::sync::OnceLock<axum::body::Bytes>,
}

/// What a mutation decides to do with the current object.
#[derive(Debug)]
pub enum Write {
    /// Store this object (create or replace).
    Put(Value),
    /// Remove the object; the value is its final state.
    Delete(Value),
    /// Leave everything as it is and return this object.
    Unchanged(Value),
}

/// The audit insert, shared by mutations and other audited requests.
pub(crate) const INSERT_AUDIT: &str = "INSERT INTO audit (at, request_id, actor, verb, kind, project, name, resource_version, result, \
     correlation_id, token_id, status_code, changes, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// Who did what, recorded with the mutation.
#[derive(Debug, Clone, Default)]
pub struct AuditInfo {
    /// The id the server gave the request.
    pub request_id: String,
    /// The client's own request id, if it sent one.
    pub correlation_id: Option<String>,
    /// The subject (`user:alice`).
    pub actor: String,
    /// The token used, by id.
    pub token_id: Option<String>,
    pub verb: &'static str,
    /// The status the request is answered with when the change commits.
    pub status_code: u16,
    /// The lease term the writer claims to act in: the write is refused
    /// (`Fenced`) unless the stored lease still names it, checked in the
    /// write's transaction. Writes to that lease itself are not fenced
    /// (its resourceVersion decides between contenders).
    pub fence: Option<nexus_api::lease::Fence>,
}

impl AuditInfo {
    /// The id that follows the request on: the caller's when it sent one
    /// (a controller passes on the id of the change it acts on), else the
    /// server's.
    pub fn trace_id(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or(&self.request_id)
    }

    /// What the audit record's message says of the writer: the lease term
    /// it acted in, if it sent one.
    pub fn fence_note(&self) -> String {
        self.fence
            .as_ref()
            .map(|f| format!("lease {} holder {} term {}", f.lease, f.holder, f.transitions))
            .unwrap_or_default()
    }

    /// The fence to check for a write of (`kind`, `name`), if any.
    pub(crate) fn fence_for(&self, kind: &str, name: &str) -> Option<&nexus_api::lease::Fence> {
        self.fence.as_ref().filter(|f| !(kind == "Lease" && name == f.lease))
    }
}

/// What a mutation reads besides its object, in its own transaction (so
/// nothing it read changes before it commits). The store reads what it is
/// told; admission decides what that is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Reads {
    #[default]
    Nothing,
    /// The objects of kind `gate` in `project` and, when there are any, the
    /// objects of each kind of `then` there.
    InProject { project: String, gate: &'static str, then: Vec<&'static str> },
}

/// What a mutation's `decide` sees besides its object: the objects read,
/// by kind (a kind not read is absent).
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub objects: HashMap<&'static str, Vec<Value>>,
}

impl Seen {
    /// The objects of `kind` read (none when it was not read).
    pub fn of(&self, kind: &str) -> &[Value] {
        self.objects.get(kind).map(Vec::as_slice).unwrap_or_default()
    }
}

/// What a mutation did.
#[derive(Debug, Clone)]
pub struct Mutation {
    /// The object after the mutation (or as it is, when nothing changed).
    pub object: Value,
    /// Whether a change (and its audit record) was committed.
    pub committed: bool,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct Page {
    /// Objects in (project, name) order.
    pub items: Vec<(String, String, Value)>,
    /// Whether rows remain after the last one returned.
    pub more: bool,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool the store has.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

mod retention;
mod writer;

use writer::Job;

/// The storage backend; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    core: Core,
    /// Mutations waiting for the writer task.
    jobs: mpsc::UnboundedSender<Job>,
}

/// Everything of a [`Store`] but its queue of mutations: what the writer
/// task owns (so it ends once every `Store` is dropped).
#[derive(Debug, Clone)]
pub struct Core {
    pool: Pool,
    sql: &'static Sql,
    /// Held while a transaction writes. For SQLite (one process writes) it
    /// holds the newest committed resourceVersion once a write learned it,
    /// so a write need not ask; `None` means ask the database.
    writer: Arc<Mutex<Option<i64>>>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Wakes the PostgreSQL tailer after a local commit.
    poke: Arc<Notify>,
    retained: Arc<AtomicI64>,
}

impl std::ops::Deref for Store {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

impl Store {
    /// Opens (creating if needed) the SQLite database file at `path`.
    pub async fn open_sqlite(path: &Path) -> Result<Self, sqlx::Error> {
        let url = format!("sqlite://{}", path.display());
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged write survives a crash of the process or the host.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self::new(Pool::Sqlite(pool), Dialect::Sqlite))
    }

    /// Connects to PostgreSQL at `url`, migrates it, and starts following
    /// changes committed by every replica.
    pub async fn open_postgres(url: &str) -> Result<Self, sqlx::Error> {
        let pool =
            PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
        // Two replicas starting at once must not both migrate.
        let mut conn = pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock(7245000)").execute(&mut *conn).await?;
        let migrated = POSTGRES_MIGRATOR.run(&pool).await;
        sqlx::query("SELECT pg_advisory_unlock(7245000)").execute(&mut *conn).await?;
        drop(conn);
        migrated?;
        let store = Self::new(Pool::Postgres(pool.clone()), Dialect::Postgres);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let start = store.max_version().await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        tokio::spawn(store.clone().tail(listener, start));
        Ok(store)
    }

    fn new(pool: Pool, dialect: Dialect) -> Self {
        let (changes, _) = broadcast::channel(8192);
        let (jobs, queue) = mpsc::unbounded_channel();
        let core = Core {
            pool,
            sql: Sql::of(dialect),
            writer: Arc::new(Mutex::new(None)),
            changes,
            poke: Arc::new(Notify::new()),
            retained: Arc::new(AtomicI64::new(DEFAULT_RETAINED_CHANGES)),
        };
        tokio::spawn(core.clone().write_batches(queue));
        Self { core, jobs }
    }

    /// Keeps only the newest `n` changes for watches to resume from.
    pub fn with_retained_changes(self, n: i64) -> Self {
        self.retained.store(n.max(1), Ordering::Relaxed);
        self
    }

    /// Which backend this is.
    pub fn dialect(&self) -> Dialect {
        match self.pool {
            Pool::Sqlite(_) => Dialect::Sqlite,
            Pool::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Follows the change log (PostgreSQL): on every notification, local
    /// poke or second, broadcasts changes newer than the last one sent.
    async fn tail(self, mut listener: PgListener, mut last: i64) {
        loop {
            tokio::select! {
                n = listener.recv() => if let Err(e) = n {
                    tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                },
                _ = self.poke.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match self.all_changes_since(last).await {
                Ok(changes) => {
                    for c in changes {
                        last = c.resource_version;
                        let _ = self.changes.send(Arc::new(c));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the change log failed"),
            }
        }
    }

    async fn all_changes_since(&self, since: i64) -> Result<Vec<Change>, ApiError> {
        let sql = "SELECT resource_version, kind, project, event_type, body, request_id FROM changes \
                   WHERE resource_version > $1 ORDER BY resource_version LIMIT 10000";
        let Pool::Postgres(pool) = &self.pool else { return Ok(Vec::new()) };
        let rows = sqlx::query(sql).bind(since).fetch_all(pool).await?;
        rows.iter()
            .map(|r| {
                Ok(Change {
                    resource_version: r.get(0),
                    kind: r.get(1),
                    project: r.get(2),
                    type_: ChangeType::parse(r.get::<&str, _>(3)),
                    object: serde_json::from_str(r.get::<&str, _>(4))?,
                    body: r.get(4),
                    request_id: r.get(5),
                    line: Default::default(),
                })
            })
            .collect()
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
    }

    async fn max_version(&self) -> Result<i64, ApiError> {
        Ok(with_pool!(self, pool => sqlx::query_scalar::<_, i64>(self.sql.max_version).fetch_one(pool).await?))
    }

    /// Reads one object.
    pub async fn get(&self, kind: &str, project: &str, name: &str) -> Result<Option<Value>, ApiError> {
        let body: Option<String> = with_pool!(self, pool => sqlx::query_scalar(self.sql.get)
            .bind(kind).bind(project).bind(name).fetch_optional(pool).await?);
        Ok(body.map(|b| serde_json::from_str(&b)).transpose()?)
    }

    /// Reads up to `limit` objects of `kind` after `after` (a (project,
    /// name) key), in key order, plus the resourceVersion they are
    /// consistent at. `project` restricts to one project.
    pub async fn list_page(
        &self,
        kind: &str,
        project: Option<&str>,
        after: Option<(String, String)>,
        limit: i64,
    ) -> Result<(Page, i64), ApiError> {
        let (after_project, after_name) = after.unwrap_or_default();
        let (rows, rv) = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            if let Some(statement) = self.sql.snapshot_read {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            let rv: i64 = sqlx::query_scalar(self.sql.max_version).fetch_one(&mut *tx).await?;
            let rows = match project {
                Some(p) => {
                    // Within one project, `after_project` is that project or empty.
                    let after = if after_project == p { after_name.clone() } else { String::new() };
                    sqlx::query(self.sql.list_page_in_project).bind(kind).bind(p).bind(after).bind(limit + 1)
                        .fetch_all(&mut *tx).await?
                }
                None => sqlx::query(self.sql.list_page).bind(kind).bind(&after_project).bind(&after_name)
                    .bind(limit + 1).fetch_all(&mut *tx).await?,
            };
            tx.commit().await?;
            let rows: Vec<(String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
            (rows, rv)
        });
        let more = rows.len() as i64 > limit;
        let items = rows
            .into_iter()
            .take(limit as usize)
            .map(|(p, n, b)| Ok((p, n, serde_json::from_str(&b)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok((Page { items, more }, rv))
    }

    /// Every object of `kind` (in `project`, or all projects) with the
    /// version the list is consistent at.
    pub async fn list(&self, kind: &str, project: Option<&str>) -> Result<(Vec<Value>, i64), ApiError> {
        let (page, rv) = self.list_page(kind, project, None, i64::MAX - 1).await?;
        Ok((page.items.into_iter().map(|(_, _, v)| v).collect(), rv))
    }

    /// Changes of `kind` after `since`, oldest first. Fails with `Gone` when
    /// changes after `since` were already compacted away.
    pub async fn changes_since(&self, kind: &str, since: i64) -> Result<Vec<Change>, ApiError> {
        let (oldest, newest, rows) = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            if let Some(statement) = self.sql.snapshot_read {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            let oldest: i64 = sqlx::query_scalar(self.sql.min_version).fetch_one(&mut *tx).await?;
            let newest: i64 = sqlx::query_scalar(self.sql.max_version).fetch_one(&mut *tx).await?;
            let rows = sqlx::query(self.sql.changes_since).bind(kind).bind(since).fetch_all(&mut *tx).await?;
            tx.commit().await?;
            let rows: Vec<(i64, String, String, String, String)> =
                rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
            (oldest, newest, rows)
        });
        if oldest > 0 && since.saturating_add(1) < oldest {
            return Err(ApiError::Gone { requested: since, oldest });
        }
        if since > newest {
            return Err(ApiError::TooNew { requested: since, newest });
        }
        rows.into_iter()
            .map(|(rv, project, type_, body, request_id)| {
                Ok(Change {
                    resource_version: rv,
                    kind: kind.to_string(),
                    project,
                    type_: ChangeType::parse(&type_),
                    object: serde_json::from_str(&body)?,
                    body,
                    request_id,
                    line: Default::default(),
                })
            })
            .collect()
    }

    /// Subscribes to changes committed from now on, in version order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Reads the object at (kind, project, name), lets `decide` choose what
    /// to write given it (or `None`), and commits that with an audit row.
    ///
    /// `decide` runs while writers are locked out, so nothing interleaves
    /// between its read and the write. It receives the resourceVersion the
    /// write will get, to stamp into the object.
    ///
    /// # Guarantees
    /// Once started, a mutation runs to its end in the store's writer task,
    /// even when the caller stops waiting (a client that disconnects cancels
    /// its request handler): a change that commits is always announced to
    /// the watches, never committed and then lost to them. It is answered
    /// only after its transaction (perhaps shared with other mutations
    /// queued at the same moment) has committed.
    pub async fn mutate<F>(
        &self,
        kind: &str,
        project: &str,
        name: &str,
        audit: &AuditInfo,
        decide: F,
    ) -> Result<Mutation, ApiError>
    where
        F: FnOnce(Option<Value>, i64) -> Result<Write, ApiError> + Send + 'static,
    {
        self.mutate_seeing(kind, project, name, audit, Reads::Nothing, move |current, _, rv| decide(current, rv)).await
    }

    /// [`Store::mutate`], with `decide` also seeing what `reads` names, read
    /// in the same transaction (quotas are checked so: of two concurrent
    /// creates, the second sees the first).
    pub async fn mutate_seeing<F>(
        &self,
        kind: &str,
        project: &str,
        name: &str,
        audit: &AuditInfo,
        reads: Reads,
        decide: F,
    ) -> Result<Mutation, ApiError>
    where
        F: FnOnce(Option<Value>, &Seen, i64) -> Result<Write, ApiError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            kind: kind.to_string(),
            project: project.to_string(),
            name: name.to_string(),
            audit: audit.clone(),
            reads,
            decide: Box::new(decide),
            reply,
        };
        self.jobs.send(job).map_err(|_| ApiError::Internal("the store's writer has stopped".into()))?;
        answer.await.map_err(|_| ApiError::Internal("the store's writer dropped a write".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_whose_caller_stops_waiting_still_commits_and_is_announced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("nexus.db")).await.unwrap();
        let mut changes = store.subscribe();
        let audit = AuditInfo { request_id: "r".into(), actor: "a".into(), verb: "create", ..Default::default() };
        let object = serde_json::json!({"metadata": {"name": "x", "uid": "u-1"}});
        {
            // The caller goes away right after the write started, as a
            // request handler does when its client disconnects.
            let write = store.mutate("VM", "p", "x", &audit, move |_, _| Ok(Write::Put(object)));
            let mut write = std::pin::pin!(write);
            let _ = futures::poll!(write.as_mut());
        }
        let change = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await.unwrap().unwrap();
        assert_eq!((change.kind.as_str(), change.type_), ("VM", ChangeType::Added));
        assert!(store.get("VM", "p", "x").await.unwrap().is_some(), "committed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_queued_together_commit_together_and_a_refused_one_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("nexus.db")).await.unwrap();
        let mut changes = store.subscribe();
        let audit = AuditInfo { request_id: "r".into(), actor: "a".into(), verb: "create", ..Default::default() };
        // Queued at once: the writer takes them in batches.
        let writes: Vec<_> = (0..64)
            .map(|i| {
                let (store, audit) = (store.clone(), audit.clone());
                tokio::spawn(async move {
                    let name = format!("vm-{i}");
                    let object = serde_json::json!({"metadata": {"name": name, "uid": format!("u-{i}")}});
                    store
                        .mutate("VM", "p", &name, &audit, move |_, _| {
                            if i % 8 == 0 {
                                Err(ApiError::BadRequest(format!("vm-{i} is refused")))
                            } else {
                                Ok(Write::Put(object))
                            }
                        })
                        .await
                })
            })
            .collect();
        let mut refused = 0;
        for (i, w) in writes.into_iter().enumerate() {
            match w.await.unwrap() {
                Ok(m) => assert!(m.committed, "vm-{i}"),
                Err(ApiError::BadRequest(m)) => {
                    assert_eq!(m, format!("vm-{i} is refused"));
                    refused += 1;
                }
                Err(e) => panic!("vm-{i}: {e}"),
            }
        }
        assert_eq!(refused, 8);
        let (stored, _) = store.list("VM", Some("p")).await.unwrap();
        assert_eq!(stored.len(), 56, "every accepted write is stored, no refused one");
        // Announced once each, in version order, with no gaps.
        let mut versions = Vec::new();
        for _ in 0..56 {
            let change = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await.unwrap().unwrap();
            versions.push(change.resource_version);
        }
        assert!(versions.windows(2).all(|w| w[1] == w[0] + 1), "{versions:?}");
    }
}
