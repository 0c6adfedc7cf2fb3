//! Event expiry: an Event lives for a TTL after it last happened (its
//! `lastTimestamp`; repeats are aggregated into one Event whose count and
//! last time move, so a recurring event stays). Expired ones are deleted
//! as any object is, so watches see them go and the audit log says who.

use std::time::Duration;

use chrono::{DateTime, Utc};
use nexus_api::Event;

use crate::error::ApiError;
use crate::store::{AuditInfo, Store, Write};

/// How long an Event is kept after it last happened, unless configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// When `event` last happened, as far as it says.
fn last_seen(event: &Event) -> Option<DateTime<Utc>> {
    event.spec.last_timestamp.or(event.spec.first_timestamp).or(event.metadata.creation_timestamp)
}

/// Deletes every Event that last happened more than `ttl` before `now`;
/// returns how many went.
pub async fn expire_once(store: &Store, ttl: Duration, now: DateTime<Utc>) -> Result<usize, ApiError> {
    let cutoff = now - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    let (items, _) = store.list(<nexus_api::EventSpec as nexus_api::ResourceSpec>::KIND, None).await?;
    let mut expired = 0;
    for value in items {
        let Ok(event) = serde_json::from_value::<Event>(value) else { continue };
        if last_seen(&event).is_none_or(|t| t >= cutoff) {
            continue;
        }
        let audit = AuditInfo {
            request_id: uuid::Uuid::new_v4().to_string(),
            actor: "system:apiserver".into(),
            verb: "expire",
            status_code: 200,
            ..Default::default()
        };
        let project = event.metadata.project.clone().unwrap_or_default();
        let result = store
            .mutate(
                <nexus_api::EventSpec as nexus_api::ResourceSpec>::KIND,
                &project,
                event.name(),
                &audit,
                move |current, rv| {
                    // Gone already, or happened again since it was read: keep.
                    let Some(current) = current else { return Err(ApiError::Internal("gone".into())) };
                    let mut current: Event = serde_json::from_value(current)?;
                    if last_seen(&current).is_none_or(|t| t >= cutoff) {
                        return Ok(Write::Unchanged(serde_json::to_value(&current)?));
                    }
                    current.metadata.deletion_timestamp = Some(Utc::now());
                    current.metadata.resource_version = Some(rv.to_string());
                    Ok(Write::Delete(serde_json::to_value(&current)?))
                },
            )
            .await;
        if let Ok(m) = result
            && m.committed
        {
            expired += 1;
        }
    }
    Ok(expired)
}

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
