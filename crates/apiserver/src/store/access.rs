//! Storage of what is not an object: API tokens, node agent credentials,
//! and reading and writing audit records outside a mutation.

use chrono::{DateTime, Utc};
use nexus_api::auth::{AuditRecord, AuditResult, NodeCredential, TokenInfo};
use sqlx::Row;

use super::{Pool, Store, number_placeholders_for};
use crate::error::ApiError;

/// A stored token: its listing and its secret's hash.
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub info: TokenInfo,
    pub hash: String,
}

/// Filters of an audit query.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub project: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub actor: Option<String>,
    pub result: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Records with an id above this one.
    pub after_id: i64,
    pub limit: i64,
}

/// Timestamps as stored: fixed-width RFC 3339 in UTC, so text order is time order.
pub fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn ts(t: &Option<DateTime<Utc>>) -> Option<String> {
    t.map(stamp)
}

fn parse_ts(s: Option<String>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok()).map(|t| t.with_timezone(&Utc))
}

fn token_row(r: &impl RowLike) -> TokenRow {
    TokenRow {
        info: TokenInfo {
            id: r.text(0),
            subject: r.text(1),
            description: r.text(2),
            created_at: parse_ts(Some(r.text(4))).unwrap_or_default(),
            created_by: r.text(5),
            expires_at: parse_ts(r.opt(6)),
            last_used_at: parse_ts(r.opt(7)),
            revoked_at: parse_ts(r.opt(8)),
            replaced_by: r.opt(9),
        },
        hash: r.text(3),
    }
}

/// Column access common to both backends' rows.
trait RowLike {
    fn text(&self, i: usize) -> String;
    fn opt(&self, i: usize) -> Option<String>;
    fn int(&self, i: usize) -> i64;
}

macro_rules! row_like {
    ($row:ty) => {
        impl RowLike for $row {
            fn text(&self, i: usize) -> String {
                self.try_get::<String, _>(i).unwrap_or_default()
            }
            fn opt(&self, i: usize) -> Option<String> {
                self.try_get::<Option<String>, _>(i).ok().flatten()
            }
            fn int(&self, i: usize) -> i64 {
                self.try_get::<i64, _>(i).unwrap_or_default()
            }
        }
    };
}
row_like!(sqlx::sqlite::SqliteRow);
row_like!(sqlx::postgres::PgRow);

fn audit_row(r: &impl RowLike) -> AuditRecord {
    let result = match r.text(9).as_str() {
        "denied" => AuditResult::Denied,
        "failed" => AuditResult::Failed,
        _ => AuditResult::Allowed,
    };
    let changes = serde_json::from_str::<Vec<String>>(&r.text(13)).unwrap_or_default();
    AuditRecord {
        id: r.int(0),
        at: parse_ts(Some(r.text(1))).unwrap_or_default(),
        request_id: r.text(2),
        correlation_id: r.opt(10),
        actor: r.text(3),
        token_id: r.opt(11),
        verb: r.text(4),
        kind: r.text(5),
        project: r.text(6),
        name: r.text(7),
        resource_version: r.int(8),
        result,
        status_code: r.int(12) as u16,
        changes,
        message: r.text(14),
    }
}

/// Runs `$body` with `$pool` bound to the store's pool, as `with_pool!`.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

impl Store {
    fn q(&self, sql: &str) -> String {
        number_placeholders_for(self.dialect(), sql)
    }

    /// Stores a new token.
    pub async fn insert_token(&self, row: &TokenRow) -> Result<(), ApiError> {
        // SQLite has one writer: every write takes the store's writer lock.
        let _writer = self.writer.lock().await;
        let i = &row.info;
        on_pool!(self, pool => sqlx::query(self.sql.insert_token)
            .bind(&i.id).bind(&i.subject).bind(&i.description).bind(&row.hash)
            .bind(stamp(i.created_at)).bind(&i.created_by).bind(ts(&i.expires_at))
            .bind(ts(&i.last_used_at)).bind(ts(&i.revoked_at)).bind(&i.replaced_by)
            .execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// The token with public id `id`.
    pub async fn token(&self, id: &str) -> Result<Option<TokenRow>, ApiError> {
        Ok(
            on_pool!(self, pool => sqlx::query(self.sql.get_token).bind(id).fetch_optional(pool).await?.map(|r| token_row(&r))),
        )
    }

    /// Every token, or those of the given subjects, oldest first.
    pub async fn tokens(&self, subjects: Option<&[String]>) -> Result<Vec<TokenRow>, ApiError> {
        let rows: Vec<TokenRow> = on_pool!(self, pool => sqlx::query(self.sql.list_tokens).fetch_all(pool).await?.iter().map(token_row).collect());
        Ok(match subjects {
            Some(s) => rows.into_iter().filter(|r| s.contains(&r.info.subject)).collect(),
            None => rows,
        })
    }

    /// How many tokens exist.
    pub async fn token_count(&self) -> Result<i64, ApiError> {
        Ok(on_pool!(self, pool => sqlx::query_scalar::<_, i64>(self.sql.count_tokens).fetch_one(pool).await?))
    }

    /// Marks token `id` revoked at `at` (keeping an earlier revocation).
    pub async fn revoke_token(&self, id: &str, at: DateTime<Utc>) -> Result<(), ApiError> {
        // SQLite has one writer: every write takes the store's writer lock.
        let _writer = self.writer.lock().await;
        on_pool!(self, pool => sqlx::query(self.sql.revoke_token).bind(stamp(at)).bind(id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Records that `id` was replaced by `successor` and ends at `ends`.
    pub async fn retire_token(&self, id: &str, successor: &str, ends: DateTime<Utc>) -> Result<(), ApiError> {
        // SQLite has one writer: every write takes the store's writer lock.
        let _writer = self.writer.lock().await;
        on_pool!(self, pool => sqlx::query(self.sql.retire_token).bind(successor).bind(stamp(ends)).bind(id)
            .execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Records when token `id` was last used.
    pub async fn touch_token(&self, id: &str, at: DateTime<Utc>) -> Result<(), ApiError> {
        // SQLite has one writer: every write takes the store's writer lock.
        let _writer = self.writer.lock().await;
        on_pool!(self, pool => sqlx::query(self.sql.touch_token).bind(stamp(at)).bind(id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Sets node `node`'s agent credential.
    pub async fn put_node_credential(&self, node: &str, cred: &NodeCredential) -> Result<(), ApiError> {
        // SQLite has one writer: every write takes the store's writer lock.
        let _writer = self.writer.lock().await;
        on_pool!(self, pool => sqlx::query(self.sql.put_node_credential).bind(node).bind(&cred.secret).bind(&cred.previous)
            .bind(stamp(Utc::now())).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Node `node`'s agent credential, if it set one.
    pub async fn node_credential(&self, node: &str) -> Result<Option<NodeCredential>, ApiError> {
        Ok(on_pool!(self, pool => sqlx::query(self.sql.get_node_credential).bind(node).fetch_optional(pool).await?
            .map(|r| NodeCredential { secret: r.text(0), previous: r.opt(1) })))
    }

    /// Writes an audit record for a request that changed nothing (refused,
    /// failed, or answered without a change).
    pub async fn insert_audit(&self, rec: &AuditRecord) -> Result<(), ApiError> {
        // SQLite has one writer: every write takes the store's writer lock.
        let _writer = self.writer.lock().await;
        let result = match rec.result {
            AuditResult::Allowed => "allowed",
            AuditResult::Denied => "denied",
            AuditResult::Failed => "failed",
        };
        let changes = serde_json::to_string(&rec.changes)?;
        on_pool!(self, pool => sqlx::query(self.sql.insert_audit)
            .bind(stamp(rec.at)).bind(&rec.request_id).bind(&rec.actor).bind(&rec.verb).bind(&rec.kind)
            .bind(&rec.project).bind(&rec.name).bind(rec.resource_version).bind(result)
            .bind(&rec.correlation_id).bind(&rec.token_id).bind(i64::from(rec.status_code)).bind(&changes)
            .bind(&rec.message)
            .execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Audit records matching `q`, oldest first, at most `q.limit`.
    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, ApiError> {
        let mut sql = String::from(
            "SELECT id, at, request_id, actor, verb, kind, project, name, resource_version, result, \
             correlation_id, token_id, status_code, changes, message FROM audit WHERE id > ?",
        );
        let mut binds: Vec<String> = Vec::new();
        for (column, value) in
            [("project", &q.project), ("kind", &q.kind), ("name", &q.name), ("actor", &q.actor), ("result", &q.result)]
        {
            if let Some(v) = value {
                sql.push_str(&format!(" AND {column} = ?"));
                binds.push(v.clone());
            }
        }
        if let Some(t) = q.since {
            sql.push_str(" AND at >= ?");
            binds.push(stamp(t));
        }
        if let Some(t) = q.until {
            sql.push_str(" AND at <= ?");
            binds.push(stamp(t));
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        // Only fixed column names were added above; every value is bound.
        let sql = self.q(&sql);
        Ok(on_pool!(self, pool => {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(q.after_id);
            for b in &binds {
                query = query.bind(b);
            }
            query.bind(q.limit).fetch_all(pool).await?.iter().map(audit_row).collect()
        }))
    }
}
