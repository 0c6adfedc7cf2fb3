//! What an object says about itself: its recent Events, and, when a wait
//! gives up, its last conditions and Events, so the reason is on screen.

use chrono::Utc;
use serde_json::Value;

use crate::context::{Context, urlencode};
use crate::kinds::KindInfo;
use crate::render;

/// The latest 20 Events about `kind/name` in `project`, oldest first
/// (none when they cannot be read). With the object's `uid`, only its own:
/// not those of an earlier object of the same name (a CI job's VM made
/// again under its name), as `kubectl describe` shows them.
pub async fn recent_events(ctx: &Context, kind: &KindInfo, project: &str, name: &str, uid: Option<&str>) -> Vec<Value> {
    let mut selector = format!("spec.involvedObject.kind={},spec.involvedObject.name={name}", kind.kind);
    if kind.namespaced {
        selector.push_str(&format!(",spec.involvedObject.project={project}"));
    }
    let path = format!("/v1/events?fieldSelector={}", urlencode(&selector));
    let listed: Result<Value, _> = ctx.client.raw(reqwest::Method::GET, &path, None).await;
    let mut events = listed.map(|l| l["items"].as_array().cloned().unwrap_or_default()).unwrap_or_default();
    events.retain(|e| is_about(e, uid));
    events.sort_by_key(|e| {
        e["spec"]["lastTimestamp"].as_str().or(e["metadata"]["creationTimestamp"].as_str()).unwrap_or("").to_string()
    });
    let skip = events.len().saturating_sub(20);
    events.split_off(skip)
}

/// Whether `event` is about the object of `uid`: an event that names no
/// uid is about whatever has its name, and so is every event when the
/// object's uid is not known.
fn is_about(event: &Value, uid: Option<&str>) -> bool {
    match (event["spec"]["involvedObject"]["uid"].as_str(), uid) {
        (Some(about), Some(uid)) => about == uid,
        _ => true,
    }
}

/// The object's conditions and recent Events, as `describe` shows them
/// (empty when the object cannot be read).
pub async fn last_words(ctx: &Context, kind: &KindInfo, project: &str, name: &str) -> String {
    let got: Result<Value, _> = ctx.client.raw(reqwest::Method::GET, &kind.object(project, name), None).await;
    let Ok(obj) = got else { return String::new() };
    let events = recent_events(ctx, kind, project, name, obj["metadata"]["uid"].as_str()).await;
    let text = render::describe(kind, &obj, &events, Utc::now());
    text.find("Conditions:").map(|at| text[at..].to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_objects_events_are_its_own_not_those_of_an_earlier_one_of_its_name() {
        let event = |uid: Option<&str>| serde_json::json!({"spec": {"involvedObject": {"kind": "VM", "name": "job", "uid": uid}}});
        assert!(is_about(&event(Some("u2")), Some("u2")));
        assert!(!is_about(&event(Some("u1")), Some("u2")), "the earlier VM's");
        assert!(is_about(&event(None), Some("u2")), "an event naming no uid");
        assert!(is_about(&event(Some("u1")), None), "the object's uid unknown");
    }
}
