//! The SQL each backend runs. Statements are written once with `?`
//! placeholders and numbered (`$1`, `$2`, ...) for PostgreSQL.

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Every statement the store runs, in one dialect.
#[derive(Debug, Clone)]
pub struct Sql {
    pub get: &'static str,
    /// The bodies of the objects a JSON array of `[kind, project, name]`
    /// names, those that exist, as (kind, project, name, body): one read
    /// for a batch of writes (SQLite, whose statements are each a round
    /// trip to its connection's thread).
    pub get_many: Option<&'static str>,
    pub max_version: &'static str,
    pub min_version: &'static str,
    pub list_page: &'static str,
    pub list_page_in_project: &'static str,
    pub changes_since: &'static str,
    pub delete_object: &'static str,
    pub upsert_object: &'static str,
    pub insert_change: &'static str,
    pub insert_audit: &'static str,
    pub compact: &'static str,
    /// An object stored, its change and its audit record, in one request
    /// (SQLite, which runs several statements from one string; each is a
    /// round trip to the database's thread otherwise). Parameters, by
    /// number: see [`written`].
    pub write_object: Option<&'static str>,
    /// As `write_object`, for an object removed.
    pub write_deletion: Option<&'static str>,
    /// Run first in a list's transaction so all its reads see one snapshot
    /// (PostgreSQL; a SQLite transaction reads one snapshot anyway).
    pub snapshot_read: Option<&'static str>,
    /// Run first in a write's transaction: serialises writers across
    /// processes (PostgreSQL); the in-process lock does it for SQLite.
    pub write_lock: Option<&'static str>,
    /// Run last in a write's transaction: wakes every replica's watches
    /// (PostgreSQL; a SQLite store has one process and announces directly).
    pub notify: Option<&'static str>,
    pub insert_token: &'static str,
    pub get_token: &'static str,
    pub list_tokens: &'static str,
    pub count_tokens: &'static str,
    pub revoke_token: &'static str,
    pub retire_token: &'static str,
    pub touch_token: &'static str,
    pub put_node_credential: &'static str,
    pub get_node_credential: &'static str,
    /// Every object of a kind in one project (bodies only).
    pub list_in_project: &'static str,
}

/// The columns of a token row, in the order `store::access` reads them.
pub const TOKEN_COLUMNS: &str =
    "id, subject, description, hash, created_at, created_by, expires_at, last_used_at, revoked_at, replaced_by";

/// Channel PostgreSQL replicas announce committed changes on.
pub const NOTIFY_CHANNEL: &str = "nexus_changes";

static SQLITE: std::sync::LazyLock<Sql> = std::sync::LazyLock::new(|| Sql::build(Dialect::Sqlite));
static POSTGRES: std::sync::LazyLock<Sql> = std::sync::LazyLock::new(|| Sql::build(Dialect::Postgres));

impl Sql {
    /// The statements of `dialect`.
    pub fn of(dialect: Dialect) -> &'static Sql {
        match dialect {
            Dialect::Sqlite => &SQLITE,
            Dialect::Postgres => &POSTGRES,
        }
    }

    fn build(dialect: Dialect) -> Self {
        // Built once per dialect for the life of the process.
        let n = |sql: &str| -> &'static str {
            match dialect {
                Dialect::Sqlite => Box::leak(sql.to_string().into_boxed_str()),
                Dialect::Postgres => Box::leak(number_placeholders(sql).into_boxed_str()),
            }
        };
        Sql {
            get: n("SELECT body FROM objects WHERE kind = ? AND project = ? AND name = ?"),
            get_many: match dialect {
                // Driven from the list, each key found through the primary key.
                Dialect::Sqlite => Some(
                    "SELECT o.kind, o.project, o.name, o.body FROM json_each(?1) AS k CROSS JOIN objects AS o \
                     ON o.kind = json_extract(k.value, '$[0]') AND o.project = json_extract(k.value, '$[1]') \
                     AND o.name = json_extract(k.value, '$[2]')",
                ),
                Dialect::Postgres => None,
            },
            max_version: n("SELECT COALESCE(MAX(resource_version), 0) FROM changes"),
            min_version: n("SELECT COALESCE(MIN(resource_version), 0) FROM changes"),
            list_page: n("SELECT project, name, body FROM objects WHERE kind = ? AND (project, name) > (?, ?) \
                          ORDER BY project, name LIMIT ?"),
            list_page_in_project: n("SELECT project, name, body FROM objects WHERE kind = ? AND project = ? \
                                     AND name > ? ORDER BY name LIMIT ?"),
            changes_since: n("SELECT resource_version, project, event_type, body, request_id FROM changes \
                              WHERE kind = ? AND resource_version > ? ORDER BY resource_version"),
            delete_object: n("DELETE FROM objects WHERE kind = ? AND project = ? AND name = ?"),
            upsert_object: n("INSERT INTO objects (kind, project, name, uid, resource_version, body) \
                              VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, project, name) DO UPDATE SET \
                              resource_version = excluded.resource_version, body = excluded.body"),
            insert_change: n(
                "INSERT INTO changes (resource_version, kind, project, name, event_type, body, request_id) \
                              VALUES (?, ?, ?, ?, ?, ?, ?)",
            ),
            insert_audit: n(super::INSERT_AUDIT),
            compact: n("DELETE FROM changes WHERE resource_version <= ?"),
            write_object: match dialect {
                Dialect::Sqlite => Some(written(
                    "INSERT INTO objects (kind, project, name, uid, resource_version, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (kind, project, name) DO UPDATE SET \
                     resource_version = excluded.resource_version, body = excluded.body",
                )),
                Dialect::Postgres => None,
            },
            write_deletion: match dialect {
                Dialect::Sqlite => Some(written("DELETE FROM objects WHERE kind = ?1 AND project = ?2 AND name = ?3")),
                Dialect::Postgres => None,
            },
            snapshot_read: match dialect {
                Dialect::Sqlite => None,
                Dialect::Postgres => Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"),
            },
            write_lock: match dialect {
                Dialect::Sqlite => None,
                Dialect::Postgres => Some("SELECT pg_advisory_xact_lock(7245001)"),
            },
            notify: match dialect {
                Dialect::Sqlite => None,
                Dialect::Postgres => Some("SELECT pg_notify('nexus_changes', '')"),
            },
            insert_token: n(&format!("INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")),
            get_token: n(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?")),
            list_tokens: n(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id")),
            count_tokens: "SELECT COUNT(*) FROM tokens",
            revoke_token: n("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"),
            retire_token: n("UPDATE tokens SET replaced_by = ?, expires_at = ? WHERE id = ?"),
            touch_token: n("UPDATE tokens SET last_used_at = ? WHERE id = ?"),
            put_node_credential: n(
                "INSERT INTO node_credentials (node, secret, previous, updated_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (node) DO UPDATE SET secret = excluded.secret, previous = excluded.previous, \
                 updated_at = excluded.updated_at",
            ),
            get_node_credential: n("SELECT secret, previous FROM node_credentials WHERE node = ?"),
            list_in_project: n("SELECT body FROM objects WHERE kind = ? AND project = ?"),
        }
    }
}

/// `object` (a statement on the objects table) followed by the change's
/// and the audit record's inserts, numbered parameters throughout:
/// 1 kind, 2 project, 3 name, 4 uid, 5 resourceVersion, 6 body, 7 event
/// type, 8 the change's request id, 9 time, 10 request id, 11 actor,
/// 12 verb, 13 result, 14 correlation id, 15 token id, 16 status code,
/// 17 changes, 18 message.
fn written(object: &str) -> &'static str {
    let sql = format!(
        "{object}; \
         INSERT INTO changes (resource_version, kind, project, name, event_type, body, request_id) \
         VALUES (?5, ?1, ?2, ?3, ?7, ?6, ?8); \
         INSERT INTO audit (at, request_id, actor, verb, kind, project, name, resource_version, result, \
         correlation_id, token_id, status_code, changes, message) \
         VALUES (?9, ?10, ?11, ?12, ?1, ?2, ?3, ?5, ?13, ?14, ?15, ?16, ?17, ?18)"
    );
    Box::leak(sql.into_boxed_str())
}

/// `sql` with placeholders as `dialect` writes them.
pub fn number_placeholders_for(dialect: Dialect, sql: &str) -> String {
    match dialect {
        Dialect::Sqlite => sql.to_string(),
        Dialect::Postgres => number_placeholders(sql),
    }
}

/// Rewrites `?` placeholders as `$1`, `$2`, ... .
fn number_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_in_order_for_postgres() {
        assert_eq!(number_placeholders("a = ? AND b = ?"), "a = $1 AND b = $2");
        assert!(Sql::of(Dialect::Sqlite).get.contains('?'));
        assert!(Sql::of(Dialect::Postgres).get.ends_with("name = $3"));
        assert!(Sql::of(Dialect::Postgres).notify.is_some_and(|n| n.contains(NOTIFY_CHANNEL)));
    }
}
