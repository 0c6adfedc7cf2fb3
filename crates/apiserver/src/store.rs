//! Versioned object storage on SQLite, with a change log for watches.
//!
//! Every mutation runs under one writer lock, in one transaction that writes
//! the object, its change-log row and its audit row; the change is broadcast
//! to watchers only after the commit, in resourceVersion order.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::{Mutex, broadcast};

use crate::error::ApiError;

/// Migrations for the SQLite backend, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

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
    /// The object after the change (before it, for DELETED), with its new
    /// resourceVersion.
    pub object: Value,
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

/// Who did what, recorded with the mutation.
#[derive(Debug, Clone)]
pub struct AuditInfo {
    pub request_id: String,
    pub actor: String,
    pub verb: &'static str,
}

/// The storage backend.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    writer: Arc<Mutex<i64>>,
    changes: broadcast::Sender<Arc<Change>>,
    retained: i64,
}

impl Store {
    /// Opens (creating if needed) the database file at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self, sqlx::Error> {
        let url = format!("sqlite://{}", path.display());
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged write survives a crash of the process or the host.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        MIGRATOR.run(&pool).await?;
        let last: Option<i64> =
            sqlx::query_scalar("SELECT MAX(resource_version) FROM changes").fetch_one(&pool).await?;
        let (changes, _) = broadcast::channel(4096);
        Ok(Self { pool, writer: Arc::new(Mutex::new(last.unwrap_or(0))), changes, retained: DEFAULT_RETAINED_CHANGES })
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    /// Reads one object.
    pub async fn get(&self, kind: &str, project: &str, name: &str) -> Result<Option<Value>, ApiError> {
        let row = sqlx::query("SELECT body FROM objects WHERE kind = ? AND project = ? AND name = ?")
            .bind(kind)
            .bind(project)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some(serde_json::from_str(r.get::<&str, _>(0))?)),
            None => Ok(None),
        }
    }

    /// Lists objects of `kind` (in `project`, or all projects), ordered by
    /// project and name, with the resourceVersion the list is consistent at.
    pub async fn list(&self, kind: &str, project: Option<&str>) -> Result<(Vec<Value>, i64), ApiError> {
        let mut tx = self.pool.begin().await?;
        let rv: Option<i64> =
            sqlx::query_scalar("SELECT MAX(resource_version) FROM changes").fetch_one(&mut *tx).await?;
        let rows = match project {
            Some(p) => {
                sqlx::query("SELECT body FROM objects WHERE kind = ? AND project = ? ORDER BY project, name")
                    .bind(kind)
                    .bind(p)
                    .fetch_all(&mut *tx)
                    .await?
            }
            None => {
                sqlx::query("SELECT body FROM objects WHERE kind = ? ORDER BY project, name")
                    .bind(kind)
                    .fetch_all(&mut *tx)
                    .await?
            }
        };
        tx.commit().await?;
        let items =
            rows.iter().map(|r| serde_json::from_str(r.get::<&str, _>(0))).collect::<Result<Vec<Value>, _>>()?;
        Ok((items, rv.unwrap_or(0)))
    }

    /// Changes of `kind` after `since`, oldest first. Fails with `Gone` when
    /// changes after `since` were already compacted away.
    pub async fn changes_since(&self, kind: &str, since: i64) -> Result<Vec<Change>, ApiError> {
        let oldest: Option<i64> =
            sqlx::query_scalar("SELECT MIN(resource_version) FROM changes").fetch_one(&self.pool).await?;
        if let Some(oldest) = oldest
            && since + 1 < oldest
        {
            return Err(ApiError::Gone { requested: since, oldest });
        }
        let rows = sqlx::query(
            "SELECT resource_version, project, event_type, body FROM changes \
             WHERE kind = ? AND resource_version > ? ORDER BY resource_version",
        )
        .bind(kind)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Change {
                    resource_version: r.get(0),
                    kind: kind.to_string(),
                    project: r.get(1),
                    type_: ChangeType::parse(r.get::<&str, _>(2)),
                    object: serde_json::from_str(r.get::<&str, _>(3))?,
                })
            })
            .collect()
    }

    /// Subscribes to changes committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// The newest committed resourceVersion.
    pub async fn current_version(&self) -> i64 {
        *self.writer.lock().await
    }

    /// Reads the object at (kind, project, name), lets `decide` choose what
    /// to write given it (or `None`), and commits that with an audit row.
    ///
    /// `decide` runs under the writer lock, so no other write interleaves
    /// between the read and the write. It receives the resourceVersion the
    /// write will get, to stamp into the object.
    pub async fn mutate<F>(
        &self,
        kind: &str,
        project: &str,
        name: &str,
        audit: &AuditInfo,
        decide: F,
    ) -> Result<Value, ApiError>
    where
        F: FnOnce(Option<Value>, i64) -> Result<Write, ApiError>,
    {
        let mut last_rv = self.writer.lock().await;
        let current = self.get(kind, project, name).await?;
        let existed = current.is_some();
        let rv = *last_rv + 1;
        let write = decide(current, rv)?;
        let (type_, object) = match write {
            Write::Unchanged(obj) => return Ok(obj),
            Write::Put(obj) if existed => (ChangeType::Modified, obj),
            Write::Put(obj) => (ChangeType::Added, obj),
            Write::Delete(obj) => (ChangeType::Deleted, obj),
        };
        let body = serde_json::to_string(&object)?;
        let mut tx = self.pool.begin().await?;
        match type_ {
            ChangeType::Deleted => {
                sqlx::query("DELETE FROM objects WHERE kind = ? AND project = ? AND name = ?")
                    .bind(kind)
                    .bind(project)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
            _ => {
                let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
                sqlx::query(
                    "INSERT INTO objects (kind, project, name, uid, resource_version, body) \
                     VALUES (?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (kind, project, name) DO UPDATE SET \
                     resource_version = excluded.resource_version, body = excluded.body",
                )
                .bind(kind)
                .bind(project)
                .bind(name)
                .bind(uid)
                .bind(rv)
                .bind(&body)
                .execute(&mut *tx)
                .await?;
            }
        }
        sqlx::query(
            "INSERT INTO changes (resource_version, kind, project, name, event_type, body) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(rv)
        .bind(kind)
        .bind(project)
        .bind(name)
        .bind(type_.as_str())
        .bind(&body)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO audit (at, request_id, actor, verb, kind, project, name, resource_version, result) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'allowed')",
        )
        .bind(chrono::Utc::now().to_rfc3339())
        .bind(&audit.request_id)
        .bind(&audit.actor)
        .bind(audit.verb)
        .bind(kind)
        .bind(project)
        .bind(name)
        .bind(rv)
        .execute(&mut *tx)
        .await?;
        if rv % 1000 == 0 {
            sqlx::query("DELETE FROM changes WHERE resource_version <= ?")
                .bind(rv - self.retained)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        *last_rv = rv;
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(Arc::new(Change {
            resource_version: rv,
            kind: kind.to_string(),
            project: project.to_string(),
            type_,
            object: object.clone(),
        }));
        Ok(object)
    }
}
