//! The writer task: mutations are queued to it, and it commits the ones
//! waiting together (group commit: one fsync for many writes) under the
//! writer lock, each with its change-log and audit rows, answering each
//! only once its transaction is durable.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::*;

/// Most mutations committed in one transaction.
const MAX_BATCH: usize = 128;

/// What a mutation writes, decided from what is stored.
type Decide = Box<dyn FnOnce(Option<Value>, &Seen, i64) -> Result<Write, ApiError> + Send>;

/// One mutation waiting for the writer task.
pub(super) struct Job {
    pub(super) kind: String,
    pub(super) project: String,
    pub(super) name: String,
    pub(super) audit: AuditInfo,
    pub(super) reads: Reads,
    pub(super) decide: Decide,
    pub(super) reply: oneshot::Sender<Result<Mutation, ApiError>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("kind", &self.kind)
            .field("project", &self.project)
            .field("name", &self.name)
            .finish()
    }
}

/// What one job of a batch came to, before the batch commits.
type Outcome = Result<(Mutation, Option<Change>), ApiError>;

/// An object's kind, project and name.
type Key = (String, String, String);

impl Core {
    /// Commits queued mutations, as many as are waiting (up to
    /// [`MAX_BATCH`]) in each transaction, until the queue closes.
    pub(super) async fn write_batches(self, mut queue: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit(batch).await;
        }
    }

    /// Runs `batch` in one transaction and answers each job once it has
    /// committed (or failed). A job whose own check fails is answered with
    /// its error and leaves no trace; a storage failure fails them all.
    async fn commit(&self, batch: Vec<Job>) {
        let mut newest = self.writer.lock().await;
        let mut replies = Vec::with_capacity(batch.len());
        let mut work = Vec::with_capacity(batch.len());
        for job in batch {
            let Job { kind, project, name, audit, reads, decide, reply } = job;
            replies.push(reply);
            work.push((kind, project, name, audit, reads, decide));
        }
        let size = work.len();
        metrics::histogram!("nexus_store_batch_size").record(size as f64);
        let known = match self.pool {
            Pool::Sqlite(_) => *newest,
            Pool::Postgres(_) => None,
        };
        match self.run(work, known).await {
            Ok((outcomes, last)) => {
                if let Pool::Sqlite(_) = self.pool {
                    *newest = Some(last);
                }
                let mut announced = false;
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let answer = outcome.map(|(mutation, change)| {
                        if let Some(change) = change {
                            match self.pool {
                                // Still under the writer lock: broadcasts leave in commit order.
                                Pool::Sqlite(_) => {
                                    let _ = self.changes.send(Arc::new(change));
                                }
                                Pool::Postgres(_) => announced = true,
                            }
                        }
                        mutation
                    });
                    let _ = reply.send(answer);
                }
                if announced {
                    self.poke.notify_one();
                }
            }
            Err(e) => {
                *newest = None;
                tracing::error!(error = %e, writes = size, "a batch of writes failed");
                let message = format!("storage failed: {e}");
                let mut first = Some(e);
                for reply in replies {
                    let error = first.take().unwrap_or_else(|| ApiError::Internal(message.clone()));
                    let _ = reply.send(Err(error));
                }
            }
        }
    }

    /// The transaction of one batch. The outer error is a storage failure
    /// (nothing committed); each job has its own outcome otherwise, and the
    /// newest resourceVersion once it ends is returned with them. `known`
    /// is that version before the batch, when known without asking.
    async fn run(
        &self,
        work: Vec<(String, String, String, AuditInfo, Reads, Decide)>,
        known: Option<i64>,
    ) -> Result<(Vec<Outcome>, i64), ApiError> {
        let sql = self.sql;
        let retained = self.retained.load(Ordering::Relaxed);
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            if let Some(statement) = sql.write_lock {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            let mut last: i64 = match known {
                Some(v) => v,
                None => sqlx::query_scalar(sql.max_version).fetch_one(&mut *tx).await?,
            };
            let mut outcomes = Vec::with_capacity(work.len());
            let mut wrote = false;
            // What the batch's objects (and the leases its fenced writes
            // name) hold, kept up to date by the batch's own writes: read in
            // one statement where the store can (SQLite); a key missing
            // here is read on its own.
            let mut stored: HashMap<Key, Option<String>> = HashMap::new();
            if let Some(statement) = sql.get_many {
                let mut keys: Vec<[&str; 3]> = Vec::with_capacity(work.len() + 1);
                for (kind, project, name, audit, ..) in &work {
                    keys.push([kind, project, name]);
                    if let Some(fence) = audit.fence_for(kind, name) {
                        keys.push(["Lease", "", &fence.lease]);
                    }
                }
                let list = serde_json::to_string(&keys)?;
                for [kind, project, name] in &keys {
                    stored.insert((kind.to_string(), project.to_string(), name.to_string()), None);
                }
                let rows: Vec<(String, String, String, String)> =
                    sqlx::query_as(statement).bind(list).fetch_all(&mut *tx).await?;
                for (kind, project, name, body) in rows {
                    stored.insert((kind, project, name), Some(body));
                }
            }
            // The projects (with the kind that gates them) known to hold no
            // quota, so a later write of the batch need not ask again.
            let mut ungated: std::collections::HashSet<(String, &'static str)> = Default::default();
            // The lease fenced writes are checked against, read once per
            // batch (and again after the batch writes a lease).
            let mut leases: HashMap<String, Option<String>> = HashMap::new();
            for (kind, project, name, audit, reads, decide) in work {
                if let Some(fence) = audit.fence_for(&kind, &name) {
                    if !leases.contains_key(&fence.lease) {
                        let key = ("Lease".to_string(), String::new(), fence.lease.clone());
                        let lease: Option<String> = match stored.get(&key) {
                            Some(known) => known.clone(),
                            None => sqlx::query_scalar(sql.get).bind("Lease").bind("")
                                .bind(&fence.lease).fetch_optional(&mut *tx).await?,
                        };
                        leases.insert(fence.lease.clone(), lease);
                    }
                    let lease = leases.get(&fence.lease).cloned().flatten();
                    if let Err(e) = check_fence(fence, lease.as_deref()) {
                        outcomes.push(Err(e));
                        continue;
                    }
                }
                let key: Key = (kind.clone(), project.clone(), name.clone());
                let current: Option<String> = match stored.get(&key) {
                    Some(known) => known.clone(),
                    None => sqlx::query_scalar(sql.get).bind(&kind).bind(&project).bind(&name)
                        .fetch_optional(&mut *tx).await?,
                };
                let existed = current.is_some();
                let current = match current.map(|b| serde_json::from_str::<Value>(&b)).transpose() {
                    Ok(c) => c,
                    Err(e) => { outcomes.push(Err(e.into())); continue; }
                };
                let before = current.clone();
                let mut seen = Seen::default();
                if let Reads::InProject { project: p, gate, then } = &reads {
                    let list = |k: &'static str| sqlx::query_scalar::<_, String>(sql.list_in_project).bind(k).bind(p.clone());
                    let parse = |rows: Vec<String>| rows.iter().map(|b| serde_json::from_str::<Value>(b)).collect::<Result<Vec<_>, _>>();
                    let gates = if ungated.contains(&(p.clone(), *gate)) {
                        Vec::new()
                    } else {
                        parse(list(gate).fetch_all(&mut *tx).await?)?
                    };
                    if gates.is_empty() {
                        ungated.insert((p.clone(), *gate));
                    } else {
                        for kind in then {
                            seen.objects.insert(kind, parse(list(kind).fetch_all(&mut *tx).await?)?);
                        }
                    }
                    seen.objects.insert(gate, gates);
                }
                if kind == "Lease" {
                    leases.clear();
                }
                let rv = last + 1;
                let (type_, object) = match decide(current, &seen, rv) {
                    Err(e) => { outcomes.push(Err(e)); continue; }
                    Ok(Write::Unchanged(obj)) => { outcomes.push(Ok((Mutation { object: obj, committed: false }, None))); continue; }
                    Ok(Write::Put(obj)) if existed => (ChangeType::Modified, obj),
                    Ok(Write::Put(obj)) => (ChangeType::Added, obj),
                    Ok(Write::Delete(obj)) => (ChangeType::Deleted, obj),
                };
                // Everything that can fail on its own is done before the first statement.
                let after = (type_ != ChangeType::Deleted).then_some(&object);
                let prepared = serde_json::to_string(&object).and_then(|body| {
                    serde_json::to_string(&crate::audit::changes(before.as_ref(), after)).map(|changes| (body, changes))
                });
                let (body, changes) = match prepared {
                    Ok(p) => p,
                    Err(e) => { outcomes.push(Err(e.into())); continue; }
                };
                let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
                let (now, fence_note) = (access::stamp(chrono::Utc::now()), audit.fence_note());
                let combined = if type_ == ChangeType::Deleted { sql.write_deletion } else { sql.write_object };
                if let Some(statements) = combined {
                    // One request for the three statements (SQLite).
                    sqlx::query(statements).bind(&kind).bind(&project).bind(&name).bind(uid).bind(rv).bind(&body)
                        .bind(type_.as_str()).bind(audit.trace_id()).bind(&now).bind(&audit.request_id)
                        .bind(&audit.actor).bind(audit.verb).bind("allowed").bind(&audit.correlation_id)
                        .bind(&audit.token_id).bind(i64::from(audit.status_code)).bind(&changes).bind(&fence_note)
                        .execute(&mut *tx).await?;
                } else {
                    if type_ == ChangeType::Deleted {
                        sqlx::query(sql.delete_object).bind(&kind).bind(&project).bind(&name).execute(&mut *tx).await?;
                    } else {
                        sqlx::query(sql.upsert_object).bind(&kind).bind(&project).bind(&name).bind(uid).bind(rv)
                            .bind(&body).execute(&mut *tx).await?;
                    }
                    sqlx::query(sql.insert_change).bind(rv).bind(&kind).bind(&project).bind(&name)
                        .bind(type_.as_str()).bind(&body).bind(audit.trace_id()).execute(&mut *tx).await?;
                    sqlx::query(sql.insert_audit).bind(&now).bind(&audit.request_id)
                        .bind(&audit.actor).bind(audit.verb).bind(&kind).bind(&project).bind(&name).bind(rv)
                        .bind("allowed").bind(&audit.correlation_id).bind(&audit.token_id)
                        .bind(i64::from(audit.status_code)).bind(&changes).bind(&fence_note)
                        .execute(&mut *tx).await?;
                }
                let every = (retained / 10).max(1);
                if rv % every == 0 {
                    sqlx::query(sql.compact).bind(rv - retained).execute(&mut *tx).await?;
                }
                last = rv;
                wrote = true;
                // What the rest of the batch reads of this object, and
                // whether its project may now have a quota.
                stored.insert(key, (type_ != ChangeType::Deleted).then(|| body.clone()));
                ungated.retain(|(p, gate)| !(*p == project && *gate == kind));
                let change = Change {
                    resource_version: rv,
                    kind,
                    project,
                    type_,
                    object: object.clone(),
                    body,
                    request_id: audit.trace_id().to_string(),
                    line: Default::default(),
                };
                outcomes.push(Ok((Mutation { object, committed: true }, Some(change))));
            }
            if wrote {
                if let Some(statement) = sql.notify {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            Ok((outcomes, last))
        })
    }
}

/// Refuses a write whose fence names a lease term that has ended (the
/// lease, stored as `lease`, names another holder or a later term, or is
/// gone).
fn check_fence(fence: &nexus_api::lease::Fence, lease: Option<&str>) -> Result<(), ApiError> {
    let stored = lease.and_then(|body| serde_json::from_str::<nexus_api::Lease>(body).ok());
    if fence.admits(stored.as_ref().map(|l| &l.spec)) {
        return Ok(());
    }
    metrics::counter!("nexus_apiserver_fenced_writes_total").increment(1);
    let now = stored
        .and_then(|l| l.spec.holder_identity.map(|h| format!("{h} in term {}", l.spec.lease_transitions)))
        .unwrap_or_else(|| "nobody".to_string());
    tracing::warn!(lease = %fence.lease, holder = %fence.holder, term = fence.transitions, now = %now, "refused a fenced-off write");
    Err(ApiError::Fenced {
        message: format!(
            "lease {:?} is no longer held by {} in term {} (it is held by {now}); this change was not made",
            fence.lease, fence.holder, fence.transitions
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::lease::Fence;

    type Decided = oneshot::Receiver<Result<Mutation, ApiError>>;

    /// A job for `commit`, and where its answer comes.
    fn job(
        kind: &str,
        name: &str,
        reads: Reads,
        decide: impl FnOnce(Option<Value>, &Seen, i64) -> Result<Write, ApiError> + Send + 'static,
    ) -> (Job, Decided) {
        let (reply, answer) = oneshot::channel();
        let audit = AuditInfo { request_id: "r".into(), actor: "a".into(), verb: "update", ..Default::default() };
        let (kind, project, name) = (kind.to_string(), "p".to_string(), name.to_string());
        (Job { kind, project, name, audit, reads, decide: Box::new(decide), reply }, answer)
    }

    fn object(name: &str, n: i64) -> Value {
        serde_json::json!({"metadata": {"name": name, "uid": format!("u-{name}-{n}")}, "spec": {"n": n}})
    }

    async fn n_of(store: &Store, name: &str) -> Option<i64> {
        store.get("VM", "p", name).await.unwrap().map(|v| v["spec"]["n"].as_i64().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_in_a_batch_reads_what_the_batch_wrote_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("nexus.db")).await.unwrap();
        let audit = AuditInfo { request_id: "r".into(), actor: "a".into(), verb: "create", ..Default::default() };
        let stored = object("old", 1);
        store.mutate("VM", "p", "old", &audit, move |_, _| Ok(Write::Put(stored))).await.unwrap();
        let next = |name: &'static str| {
            move |current: Option<Value>, _: &Seen, _| {
                let n = current.map_or(0, |c| c["spec"]["n"].as_i64().unwrap());
                Ok(Write::Put(object(name, n + 1)))
            }
        };
        let (a, _) = job("VM", "new", Reads::Nothing, next("new"));
        let (b, _) = job("VM", "new", Reads::Nothing, next("new"));
        let (c, _) = job("VM", "old", Reads::Nothing, |current, _, _| {
            Ok(Write::Delete(current.unwrap_or_else(|| object("old", -100))))
        });
        let (d, _) = job("VM", "old", Reads::Nothing, next("old"));
        let (e, _) = job("VM", "kept", Reads::Nothing, |_, _, _| Ok(Write::Unchanged(object("kept", 0))));
        store.core.commit(vec![a, b, c, d, e]).await;
        assert_eq!(n_of(&store, "new").await, Some(2), "the second write saw the first");
        assert_eq!(n_of(&store, "old").await, Some(1), "the object deleted earlier in the batch was gone");
        assert_eq!(n_of(&store, "kept").await, None, "nothing written");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quota_made_earlier_in_a_batch_is_seen_by_the_writes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("nexus.db")).await.unwrap();
        let gated = || Reads::InProject { project: "p".into(), gate: "ResourceQuota", then: vec!["VM"] };
        // Each VM records how many quotas and VMs its write saw.
        let counted = |name: &'static str| {
            move |_: Option<Value>, seen: &Seen, _| {
                let n = (seen.of("ResourceQuota").len() * 10 + seen.of("VM").len()) as i64;
                Ok(Write::Put(object(name, n)))
            }
        };
        let (a, _) = job("VM", "first", gated(), counted("first"));
        let (b, _) = job("VM", "second", gated(), counted("second"));
        let (quota, _) = job("ResourceQuota", "q", Reads::Nothing, |_, _, _| Ok(Write::Put(object("q", 0))));
        let (c, _) = job("VM", "third", gated(), counted("third"));
        store.core.commit(vec![a, b, quota, c]).await;
        assert_eq!(n_of(&store, "first").await, Some(0));
        assert_eq!(n_of(&store, "second").await, Some(0), "no quota yet: the VMs are not read");
        assert_eq!(n_of(&store, "third").await, Some(12), "the quota and the two VMs before it");
    }

    fn lease(holder: &str, transitions: u32) -> Value {
        serde_json::json!({"apiVersion": "nexus/v1", "kind": "Lease",
            "metadata": {"name": "nexus-controller", "uid": "u-lease"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 2, "leaseTransitions": transitions}})
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_fenced_with_an_ended_term_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("nexus.db")).await.unwrap();
        let plain = AuditInfo { request_id: "r".into(), actor: "a".into(), verb: "update", ..Default::default() };
        let l = lease("new", 1);
        store.mutate("Lease", "", "nexus-controller", &plain, move |_, _| Ok(Write::Put(l))).await.unwrap();
        let fenced = |holder: &str, transitions| AuditInfo {
            fence: Some(Fence { lease: "nexus-controller".into(), holder: holder.into(), transitions }),
            ..plain.clone()
        };
        let vm = |name: &str| serde_json::json!({"metadata": {"name": name, "uid": format!("u-{name}")}});

        let (current, old) = (fenced("new", 1), fenced("old", 0));
        let v = vm("by-new");
        let m = store.mutate("VM", "p", "by-new", &current, move |_, _| Ok(Write::Put(v))).await.unwrap();
        assert!(m.committed);
        let v = vm("by-old");
        let refused = store.mutate("VM", "p", "by-old", &old, move |_, _| Ok(Write::Put(v))).await.unwrap_err();
        assert!(matches!(refused, ApiError::Fenced { .. }), "{refused}");
        assert!(refused.to_string().contains("held by new in term 1"), "{refused}");
        assert!(store.get("VM", "p", "by-old").await.unwrap().is_none(), "nothing stored");
        // The lease itself is not fenced: contenders race on its version.
        let l = lease("old", 2);
        let m = store.mutate("Lease", "", "nexus-controller", &old, move |_, _| Ok(Write::Put(l))).await.unwrap();
        assert!(m.committed);
        let v = vm("by-new-again");
        let refused = store.mutate("VM", "p", "by-new-again", &current, move |_, _| Ok(Write::Put(v))).await;
        assert!(matches!(refused, Err(ApiError::Fenced { .. })), "the term of `new` ended too");
    }
}
