//! `POST /v1/events:record`: many events in one request. A controller
//! records an event per decision (two for each VM it starts); sent one by
//! one, each would cost a request, with its TLS record, authentication and
//! answer. Here each event is created, or folded into the Event of its
//! name when one exists ([`EventSpec::fold`]), and the writes share the
//! store's commits.
//!
//! Every event is checked before any is written: one refused refuses the
//! request and nothing is stored. Each write is audited in its own
//! transaction (verb `record`), as any change is.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use nexus_api::event::{EventRecordResult, MAX_RECORDED, RecordedEvent};
use nexus_api::rbac::{Request, Verb, decide};
use nexus_api::validation::{FieldError, FieldErrors};
use nexus_api::{Event, EventSpec, ResourceSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::request_id::RequestIds;
use crate::resources::{audit, object_from_value, stamp_new};
use crate::state::{AppState, SharedState};
use crate::store::{AuditInfo, Write};

/// The route's path.
pub const PATH: &str = "/v1/events:record";

/// What a refusal of the body names as its kind.
const REQUEST_KIND: &str = "EventRecordRequest";

/// The record route.
pub fn routes() -> Router<SharedState> {
    Router::new().route(PATH, post(record))
}

/// The body, with its events not yet checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    items: Vec<Value>,
}

async fn record(
    State(state): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Extension(ids): Extension<RequestIds>,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Creating Events was allowed at the door; folding a repeat updates one.
    decide(
        &caller.subject,
        &caller.grants,
        &Request { verb: Verb::Update, kind: EventSpec::KIND, project: "", name: "" },
    )?;
    let events = parse(&body)?;
    for event in &events {
        crate::admission::create(&state, &caller, "", event).await?;
    }
    let info = audit(&caller, &ids, "record", 200);
    let writes = events.into_iter().map(|event| write(&state, &info, event));
    let items = futures::future::join_all(writes).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut resp = (StatusCode::OK, Json(EventRecordResult { items })).into_response();
    resp.extensions_mut().insert(crate::audit::Recorded);
    Ok(resp)
}

/// The body's events, checked as a create of each would check it, with
/// repeats of one name folded into its first: 1 to [`MAX_RECORDED`].
fn parse(body: &[u8]) -> Result<Vec<Event>, ApiError> {
    let malformed = |message: String| ApiError::Malformed { kind: REQUEST_KIND.into(), message };
    let body: Body = serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    if body.items.is_empty() || body.items.len() > MAX_RECORDED {
        let mut errors = FieldErrors::default();
        errors.add(
            "items",
            format!("<{} events>", body.items.len()),
            &format!("must hold 1 to {MAX_RECORDED} events; send more in further requests"),
        );
        return Err(ApiError::Invalid { kind: REQUEST_KIND.into(), errors });
    }
    let mut errors = FieldErrors::default();
    let mut events: Vec<Event> = Vec::with_capacity(body.items.len());
    for (i, item) in body.items.iter().enumerate() {
        match object_from_value::<EventSpec>(item) {
            Ok(event) => match events.iter_mut().find(|e| e.name() == event.name()) {
                Some(first) => first.spec.fold(&event.spec),
                None => events.push(event),
            },
            Err(ApiError::Invalid { errors: refused, .. }) => errors
                .0
                .extend(refused.0.into_iter().map(|e| FieldError { field: format!("items[{i}].{}", e.field), ..e })),
            Err(ApiError::Malformed { message, .. }) => return Err(malformed(format!("items[{i}]: {message}"))),
            Err(other) => return Err(other),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid { kind: REQUEST_KIND.into(), errors });
    }
    Ok(events)
}

/// Creates `event`, or folds it into the stored Event of its name.
async fn write(state: &AppState, info: &AuditInfo, mut event: Event) -> Result<RecordedEvent, ApiError> {
    let name = event.name().to_string();
    let written = state
        .store
        .mutate(EventSpec::KIND, "", &name, info, move |current, rv| {
            let mut next = match current {
                Some(stored) => {
                    let mut stored: Event = serde_json::from_value(stored)?;
                    stored.spec.fold(&event.spec);
                    stored
                }
                None => {
                    event.metadata.project = None;
                    stamp_new(&mut event);
                    event
                }
            };
            next.metadata.resource_version = Some(rv.to_string());
            Ok(Write::Put(serde_json::to_value(&next)?))
        })
        .await?;
    let spec = &written.object["spec"];
    Ok(RecordedEvent {
        name,
        count: spec["count"].as_u64().unwrap_or(1).try_into().unwrap_or(u32::MAX),
        resource_version: written.object["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, reason: &str, message: &str) -> Value {
        serde_json::json!({
            "apiVersion": "nexus/v1", "kind": "Event", "metadata": {"name": name},
            "spec": {"involvedObject": {"kind": "VM", "name": "a", "project": "p"}, "type": "Normal",
                     "reason": reason, "message": message}
        })
    }

    fn body(items: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "items": items })).unwrap()
    }

    #[test]
    fn events_are_checked_as_creates_and_repeats_fold_into_the_first() {
        let events = parse(&body(vec![
            item("ev-a", "Started", "one"),
            item("ev-b", "Scheduled", "x"),
            item("ev-a", "Started", "two"),
        ]))
        .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].spec.count, events[0].spec.message.as_str()), (2, "two"));
        assert_eq!(events[1].name(), "ev-b");
    }

    #[test]
    fn a_refused_event_names_its_place_in_the_list() {
        let Err(ApiError::Invalid { errors, .. }) =
            parse(&body(vec![item("ev-a", "Started", "ok"), item("ev-b", "not camel", "bad")]))
        else {
            panic!("an invalid reason must be refused");
        };
        assert_eq!(errors.0[0].field, "items[1].spec.reason");
        let Err(ApiError::Malformed { message, .. }) = parse(&body(vec![serde_json::json!({"spec": []})])) else {
            panic!("a malformed event must be refused");
        };
        assert!(message.starts_with("items[0]: "), "{message}");
    }

    #[test]
    fn an_empty_or_oversized_list_and_unknown_fields_are_refused() {
        assert!(matches!(parse(&body(vec![])), Err(ApiError::Invalid { .. })));
        let many = (0..=MAX_RECORDED).map(|i| item(&format!("ev-{i}"), "Started", "m")).collect();
        let Err(ApiError::Invalid { errors, .. }) = parse(&body(many)) else { panic!("too many") };
        assert_eq!(errors.0[0].field, "items");
        assert!(matches!(parse(br#"{"items": [], "extra": 1}"#), Err(ApiError::Malformed { .. })));
        assert!(matches!(parse(b"[1, 2]"), Err(ApiError::Malformed { .. })));
    }
}
