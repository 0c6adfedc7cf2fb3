//! Event expiry: an Event lives for a TTL after it last happened (its
//! `lastTimestamp`; repeats are aggregated into one Event whose count and
//! last time move, so a recurring event stays). Expired ones are deleted
//! as any object is, so watches see them go and the audit log says who.

use std::time::Duration;

use chrono::{DateTime, Utc};
use nexus_api::Event;

use crate::error::ApiError;
use crate::store::{AuditInfo, Store};

/// How long an Event is kept after it last happened, unless configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// When `event` last happened, as far as it says.
fn last_seen(event: &Event) -> Option<DateTime<Utc>> {
    event.spec.last_timestamp.or(event.spec.first_timestamp).or(event.metadata.creation_timestamp)
}

/// Deletes every Event that last happened more than `ttl` before `now`,
/// a few hundred to a transaction; returns how many went.
pub async fn expire_once(store: &Store, ttl: Duration, now: DateTime<Utc>) -> Result<usize, ApiError> {
    let cutoff = now - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    let kind = <nexus_api::EventSpec as nexus_api::ResourceSpec>::KIND;
    let (items, _) = store.list(kind, None).await?;
    let old: Vec<(String, String)> = items
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Event>(v).ok())
        .filter(|e| last_seen(e).is_some_and(|t| t < cutoff))
        .map(|e| (e.metadata.project.clone().unwrap_or_default(), e.name().to_string()))
        .collect();
    let audit = AuditInfo {
        request_id: uuid::Uuid::new_v4().to_string(),
        actor: "system:apiserver".into(),
        verb: "expire",
        status_code: 200,
        ..Default::default()
    };
    let mut expired = 0;
    for batch in old.chunks(BATCH) {
        // Read again under the write: one that happened again since stays.
        expired += store
            .delete_expired(kind, batch, &audit, |v| {
                serde_json::from_value::<Event>(v.clone()).ok().and_then(|e| last_seen(&e)).is_some_and(|t| t < cutoff)
            })
            .await?;
    }
    Ok(expired)
}

/// Events deleted in one transaction.
const BATCH: usize = 250;

/// Expires Events every `ttl / 4` (at least every second, at most every
/// minute) until `stop` turns true.
pub async fn expire_loop(store: Store, ttl: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match expire_once(&store, ttl, Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, ttl_secs = ttl.as_secs(), "expired events"),
            Err(e) => tracing::warn!(error = %e, "expiring events failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Write;

    async fn put_event(store: &Store, name: &str, last: DateTime<Utc>) {
        let audit = AuditInfo { request_id: "r".into(), actor: "a".into(), verb: "create", ..Default::default() };
        let event = serde_json::json!({"apiVersion": "nexus/v1", "kind": "Event",
            "metadata": {"name": name, "uid": format!("u-{name}"), "creationTimestamp": last},
            "spec": {"involvedObject": {"kind": "VM", "name": "a"}, "type": "Normal", "reason": "R",
                     "message": "m", "count": 1, "firstTimestamp": last, "lastTimestamp": last}});
        store.mutate("Event", "", name, &audit, move |_, _| Ok(Write::Put(event))).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_events_older_than_the_ttl_go_and_watchers_see_them_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("nexus.db")).await.unwrap();
        let now = Utc::now();
        put_event(&store, "old-1", now - chrono::Duration::seconds(120)).await;
        put_event(&store, "old-2", now - chrono::Duration::seconds(61)).await;
        put_event(&store, "recent", now - chrono::Duration::seconds(5)).await;
        let mut changes = store.subscribe();
        assert_eq!(expire_once(&store, Duration::from_secs(60), now).await.unwrap(), 2);
        let (left, _) = store.list("Event", None).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0]["metadata"]["name"], "recent");
        for _ in 0..2 {
            let change = changes.recv().await.unwrap();
            assert_eq!(change.type_, crate::store::ChangeType::Deleted);
        }
        assert_eq!(expire_once(&store, Duration::from_secs(60), now).await.unwrap(), 0, "nothing twice");
    }
}
