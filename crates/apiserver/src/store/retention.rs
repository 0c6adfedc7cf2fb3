//! Deletion of expired objects in bulk: one transaction for many, each
//! still a DELETED change with its audit record.

use super::*;

impl Store {
    /// Deletes the objects of `kind` named by `keys` (project, name) for
    /// which `expired` still holds when read, in one transaction: each is
    /// a DELETED change and an audit record of `audit`, as one delete
    /// through [`Store::mutate`] would be, at the cost of one commit for
    /// all. Returns how many went.
    pub async fn delete_expired(
        &self,
        kind: &str,
        keys: &[(String, String)],
        audit: &AuditInfo,
        expired: impl Fn(&Value) -> bool + Send,
    ) -> Result<usize, ApiError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut newest = self.writer.lock().await;
        // Written here: the next write asks the database again.
        *newest = None;
        let sql = self.sql;
        let now = access::stamp(chrono::Utc::now());
        let committed: Vec<Change> = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            if let Some(statement) = sql.write_lock {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            let mut rv: i64 = sqlx::query_scalar(sql.max_version).fetch_one(&mut *tx).await?;
            let mut done = Vec::new();
            for (project, name) in keys {
                let current: Option<String> = sqlx::query_scalar(sql.get).bind(kind).bind(project).bind(name)
                    .fetch_optional(&mut *tx).await?;
                let Some(current) = current else { continue };
                let mut object: Value = serde_json::from_str(&current)?;
                if !expired(&object) {
                    continue;
                }
                rv += 1;
                object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                object["metadata"]["deletionTimestamp"] = Value::String(now.clone());
                let body = serde_json::to_string(&object)?;
                sqlx::query(sql.delete_object).bind(kind).bind(project).bind(name).execute(&mut *tx).await?;
                sqlx::query(sql.insert_change).bind(rv).bind(kind).bind(project).bind(name)
                    .bind(ChangeType::Deleted.as_str()).bind(&body).bind(audit.trace_id()).execute(&mut *tx).await?;
                let changes = serde_json::to_string(&crate::audit::changes(Some(&object), None))?;
                sqlx::query(sql.insert_audit).bind(&now).bind(&audit.request_id)
                    .bind(&audit.actor).bind(audit.verb).bind(kind).bind(project).bind(name).bind(rv).bind("allowed")
                    .bind(&audit.correlation_id).bind(&audit.token_id).bind(i64::from(audit.status_code))
                    .bind(&changes).bind("")
                    .execute(&mut *tx).await?;
                done.push(Change {
                    resource_version: rv,
                    kind: kind.to_string(),
                    project: project.clone(),
                    type_: ChangeType::Deleted,
                    object,
                    body,
                    request_id: audit.trace_id().to_string(),
                    line: Default::default(),
                });
            }
            if !done.is_empty() {
                sqlx::query(sql.compact).bind(rv - self.retained.load(Ordering::Relaxed)).execute(&mut *tx).await?;
                if let Some(statement) = sql.notify {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            done
        });
        let n = committed.len();
        match self.pool {
            // Still under the writer lock: broadcasts leave in commit order.
            Pool::Sqlite(_) => {
                for change in committed {
                    let _ = self.changes.send(Arc::new(change));
                }
            }
            Pool::Postgres(_) => self.poke.notify_one(),
        }
        Ok(n)
    }
}
