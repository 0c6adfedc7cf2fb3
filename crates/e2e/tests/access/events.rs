//! `POST /v1/events:record`: the controller's events in one request, each
//! created or folded into the Event of its name, each change audited; the
//! roles that may not write Events are refused, and a batch with one bad
//! event stores nothing.

use super::*;

fn event(name: &str, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "nexus/v1", "kind": "Event", "metadata": {"name": name},
           "spec": {"involvedObject": {"kind": "VM", "name": "web", "project": "p1"},
                    "type": "Normal", "reason": reason, "message": message}})
}

async fn record(backend: Backend, dir: &std::path::Path) {
    let server = ApiServer::start(&backend, dir, &[]).await;
    let admin = As::at(&server, Some(server.admin_token.as_deref().unwrap()));
    let client = server.client();
    let controller = As::at(&server, Some(&issue(&client, "system:controller").await));
    let batch = json!({"items": [event("ev-a", "Scheduled", "to n1"), event("ev-b", "Started", "in 300 ms"),
                                 event("ev-b", "Started", "in 250 ms")]});
    let (status, body) = controller.call("POST", "/v1/events:record", Some(&batch)).await;
    assert_eq!(status, 200, "{body}");
    let counts: Vec<(String, u64)> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), i["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(counts, [("ev-a".to_string(), 1), ("ev-b".to_string(), 2)], "a repeat in one batch folds");
    // Again: folded into what is stored.
    let again = json!({"items": [event("ev-b", "Started", "in 200 ms")]});
    let (status, body) = controller.call("POST", "/v1/events:record", Some(&again)).await;
    assert_eq!((status, body["items"][0]["count"].as_u64()), (200, Some(3)), "{body}");
    let (_, stored) = admin.call("GET", "/v1/events/ev-b", None).await;
    assert_eq!((stored["spec"]["count"].as_u64(), stored["spec"]["message"].as_str()), (Some(3), Some("in 200 ms")));
    assert!(stored["metadata"]["uid"].is_string() && stored["metadata"]["creationTimestamp"].is_string());
    let (_, audit) = admin.call("GET", "/v1/audit?kind=Event", None).await;
    let recorded = audit["items"].as_array().unwrap().iter().filter(|r| r["verb"] == "record").count();
    println!("audit records of verb record: {recorded}");
    assert_eq!(recorded, 3, "each change on record: {audit}");

    // Only who may write Events may record them; a refusal stores nothing.
    for subject in ["user:viv", "node:n1"] {
        let caller = As::at(&server, Some(&issue(&client, subject).await));
        let (status, body) =
            caller.call("POST", "/v1/events:record", Some(&json!({"items": [event("ev-c", "Started", "x")]}))).await;
        assert_eq!(status, 403, "{subject}: {body}");
    }
    // One bad event refuses the batch, naming its place.
    let bad = json!({"items": [event("ev-c", "Started", "fine"), event("ev-d", "not camel", "bad")]});
    let (status, body) = controller.call("POST", "/v1/events:record", Some(&bad)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["message"].as_str().unwrap().contains("items[1].spec.reason"), "{body}");
    assert_eq!(admin.call("GET", "/v1/events/ev-c", None).await.0, 404, "nothing of a refused batch is stored");
    let (status, body) = controller.call("POST", "/v1/events:record", Some(&json!({"items": []}))).await;
    assert_eq!(status, 422, "{body}");
}

#[test]
fn events_are_recorded_in_one_request_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(record(Backend::Sqlite(dir.path().join("data")), dir.path()));
}

#[test]
fn events_are_recorded_in_one_request_on_postgres() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(record(Backend::Postgres(pg.fresh_database()), dir.path()));
}
