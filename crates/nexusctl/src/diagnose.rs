//! What an object says about itself: its recent Events, and, when a wait
//! gives up, its last conditions and Events, so the reason is on screen.

use chrono::Utc;
use serde_json::Value;

use crate::context::{Context, urlencode};
use crate::kinds::KindInfo;
use crate::render;

/// The latest 20 Events about `kind/name` in `project`, oldest first
/// (none when they cannot be read).
pub async fn recent_events(ctx: &Context, kind: &KindInfo, project: &str, name: &str) -> Vec<Value> {
    let mut selector = format!("spec.involvedObject.kind={},spec.involvedObject.name={name}", kind.kind);
    if kind.namespaced {
        selector.push_str(&format!(",spec.involvedObject.project={project}"));
    }
    let path = format!("/v1/events?fieldSelector={}", urlencode(&selector));
    let listed: Result<Value, _> = ctx.client.raw(reqwest::Method::GET, &path, None).await;
    let mut events = listed.map(|l| l["items"].as_array().cloned().unwrap_or_default()).unwrap_or_default();
    events.sort_by_key(|e| {
        e["spec"]["lastTimestamp"].as_str().or(e["metadata"]["creationTimestamp"].as_str()).unwrap_or("").to_string()
    });
    let skip = events.len().saturating_sub(20);
    events.split_off(skip)
}

/// The object's conditions and recent Events, as `describe` shows them
/// (empty when the object cannot be read).
pub async fn last_words(ctx: &Context, kind: &KindInfo, project: &str, name: &str) -> String {
    let got: Result<Value, _> = ctx.client.raw(reqwest::Method::GET, &kind.object(project, name), None).await;
    let Ok(obj) = got else { return String::new() };
    let events = recent_events(ctx, kind, project, name).await;
    let text = render::describe(kind, &obj, &events, Utc::now());
    text.find("Conditions:").map(|at| text[at..].to_string()).unwrap_or_default()
}
