//! Backing the store up while it serves, and restoring a backup into an
//! empty store.
//!
//! SQLite: `VACUUM INTO` writes a consistent copy of the database as of one
//! transaction, whatever the apiserver writes meanwhile (a plain file copy
//! of a live database in WAL mode can be torn). PostgreSQL: `pg_dump` in
//! its custom format (one consistent snapshot too) and `pg_restore`.
//! A restore goes only into an empty store: it never overwrites a live one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, Row};

/// Failures of a backup or a restore, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists: a backup never overwrites a file; name a new one")]
    TargetExists(PathBuf),
    #[error("no store at {0}: name the apiserver's data directory (--data-dir) or database (--database-url)")]
    NoStore(PathBuf),
    #[error(
        "refusing to restore over the store at {0}, which holds {1} objects: restore into an empty data directory or database (stop the apiserver and move the old store away first)"
    )]
    NotEmpty(String, i64),
    #[error("{path} is not a nexus backup: {why}")]
    NotABackup { path: PathBuf, why: String },
    #[error("the backup {0} fails SQLite's integrity check: {1}")]
    Corrupt(PathBuf, String),
    #[error("{tool} is needed for a PostgreSQL store (apt-get install postgresql-client): {source}")]
    ToolMissing {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    ToolFailed { tool: &'static str, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// What a store (or a backup) holds, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Contents {
    pub objects: i64,
    pub tokens: i64,
    pub audit_records: i64,
    /// The newest resourceVersion: a restored store continues above it.
    pub resource_version: i64,
}

impl std::fmt::Display for Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} objects, {} tokens, {} audit records, resourceVersion {}",
            self.objects, self.tokens, self.audit_records, self.resource_version
        )
    }
}

const COUNT: &str = "SELECT (SELECT COUNT(*) FROM objects), (SELECT COUNT(*) FROM tokens), \
                     (SELECT COUNT(*) FROM audit), (SELECT COALESCE(MAX(resource_version), 0) FROM changes)";

async fn sqlite(path: &Path, read_only: bool) -> Result<sqlx::SqliteConnection, BackupError> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .read_only(read_only)
        .busy_timeout(std::time::Duration::from_secs(30));
    Ok(sqlx::SqliteConnection::connect_with(&options).await?)
}

async fn sqlite_contents(conn: &mut sqlx::SqliteConnection) -> Result<Contents, sqlx::Error> {
    let row = sqlx::query(COUNT).fetch_one(conn).await?;
    Ok(Contents {
        objects: row.try_get(0)?,
        tokens: row.try_get(1)?,
        audit_records: row.try_get(2)?,
        resource_version: row.try_get(3)?,
    })
}

/// Writes a consistent copy of the SQLite store `db` to `to` while the
/// apiserver may be writing, checks the copy, and says what it holds.
pub async fn backup_sqlite(db: &Path, to: &Path) -> Result<Contents, BackupError> {
    if to.exists() {
        return Err(BackupError::TargetExists(to.to_path_buf()));
    }
    if !db.exists() {
        return Err(BackupError::NoStore(db.to_path_buf()));
    }
    let mut conn = sqlite(db, false).await?;
    sqlx::query("VACUUM INTO ?").bind(to.display().to_string()).execute(&mut conn).await?;
    conn.close().await?;
    check_sqlite_backup(to).await
}

/// Checks that `path` is a sound nexus SQLite backup; returns what it holds.
async fn check_sqlite_backup(path: &Path) -> Result<Contents, BackupError> {
    let mut conn = sqlite(path, true)
        .await
        .map_err(|e| BackupError::NotABackup { path: path.to_path_buf(), why: e.to_string() })?;
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| BackupError::NotABackup { path: path.to_path_buf(), why: e.to_string() })?;
    if check != "ok" {
        return Err(BackupError::Corrupt(path.to_path_buf(), check));
    }
    sqlite_contents(&mut conn).await.map_err(|e| BackupError::NotABackup {
        path: path.to_path_buf(),
        why: format!("it lacks nexus's tables ({e})"),
    })
}

/// Restores the SQLite backup `from` as the store `db`, which must not
/// exist yet (or hold no objects); the copy is checked before it takes
/// the store's place.
pub async fn restore_sqlite(from: &Path, db: &Path) -> Result<Contents, BackupError> {
    let contents = check_sqlite_backup(from).await?;
    if db.exists() {
        let mut conn = sqlite(db, true).await?;
        let held = sqlite_contents(&mut conn).await.map(|c| c.objects).unwrap_or(0);
        if held > 0 {
            return Err(BackupError::NotEmpty(db.display().to_string(), held));
        }
    }
    let io = |what: String| move |source| BackupError::Io { what, source };
    if let Some(dir) = db.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // Copied beside the store, then renamed into place: never half a store.
    let partial = db.with_extension("db.restoring");
    std::fs::copy(from, &partial).map_err(io(format!("copying {} to {}", from.display(), partial.display())))?;
    std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io(format!("syncing {}", partial.display())))?;
    for stale in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(db.with_extension(stale));
    }
    std::fs::rename(&partial, db).map_err(io(format!("moving the restored store to {}", db.display())))?;
    Ok(contents)
}

/// Backs up the PostgreSQL store at `url` with `pg_dump` (custom format).
pub async fn backup_postgres(url: &str, to: &Path) -> Result<Contents, BackupError> {
    if to.exists() {
        return Err(BackupError::TargetExists(to.to_path_buf()));
    }
    let contents = postgres_contents(url).await?;
    run("pg_dump", Command::new("pg_dump").args(["--format=custom", "--no-owner", "--file"]).arg(to).arg(url))?;
    Ok(contents)
}

/// Restores a `pg_dump` backup into the empty PostgreSQL database at `url`.
pub async fn restore_postgres(from: &Path, url: &str) -> Result<Contents, BackupError> {
    if !from.exists() {
        return Err(BackupError::NotABackup { path: from.to_path_buf(), why: "no such file".into() });
    }
    if let Ok(held) = postgres_contents(url).await
        && held.objects > 0
    {
        return Err(BackupError::NotEmpty(redact_url(url), held.objects));
    }
    run(
        "pg_restore",
        Command::new("pg_restore")
            .args(["--no-owner", "--exit-on-error", "--clean", "--if-exists", "--dbname"])
            .arg(url)
            .arg(from),
    )?;
    postgres_contents(url).await
}

async fn postgres_contents(url: &str) -> Result<Contents, BackupError> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let row = sqlx::query(COUNT).fetch_one(&mut conn).await?;
    Ok(Contents {
        objects: row.try_get(0)?,
        tokens: row.try_get(1)?,
        audit_records: row.try_get(2)?,
        resource_version: row.try_get(3)?,
    })
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<(), BackupError> {
    let out = cmd.output().map_err(|source| BackupError::ToolMissing { tool, source })?;
    if !out.status.success() {
        return Err(BackupError::ToolFailed { tool, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(())
}

/// `url` without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact_url("postgres://nexus:s3cret@db/nexus"), "postgres://nexus@db/nexus");
        assert_eq!(redact_url("postgres:///nexus?host=/run"), "postgres:///nexus?host=/run");
    }
}
