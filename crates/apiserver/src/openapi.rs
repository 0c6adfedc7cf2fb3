//! `/openapi.json`: an OpenAPI 3.1 document built from the kinds the server
//! serves and the JSON Schemas generated from their types.

use nexus_api::ResourceSpec;
use nexus_api::registry::{KindInfo, KindVisitor, visit_kinds};
use serde_json::{Map, Value, json};

/// The full document.
pub fn document() -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    struct Kinds<'a>(&'a mut Map<String, Value>, &'a mut Map<String, Value>);
    impl KindVisitor for Kinds<'_> {
        fn visit<S: ResourceSpec>(&mut self) {
            add_kind::<S>(self.0, self.1);
        }
    }
    visit_kinds(&mut Kinds(&mut paths, &mut schemas));
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error", "message", "status", "requestId"],
            "properties": {
                "error": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"},
                "faultMessage": {"type": "string"}, "suggestion": {"type": "string"}, "requestId": {"type": "string"}
            }
        }),
    );
    for (path, summary) in nexus_api::OPERATIONS_ROUTES.iter().filter(|(p, _)| *p != "/openapi.json") {
        let operations: Map<String, Value> = methods(summary)
            .into_iter()
            .map(|m| (m.to_lowercase(), json!({"summary": summary, "responses": {"200": {"description": "OK"}}})))
            .collect();
        paths.insert(path.to_string(), Value::Object(operations));
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "nexus", "version": env!("CARGO_PKG_VERSION"), "description": "Declarative control plane for Firecracker microVMs"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// The HTTP methods an operations route's description names, each at the
/// start of one of its `;`-separated parts ("GET: list tokens; POST:
/// create one"); GET when it names none.
fn methods(summary: &str) -> Vec<&'static str> {
    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
    let named: Vec<&'static str> = summary
        .split(';')
        .filter_map(|part| {
            let word = part.trim_start().split(|c: char| !c.is_ascii_uppercase()).next()?;
            METHODS.iter().copied().find(|m| *m == word)
        })
        .collect();
    if named.is_empty() { vec!["GET"] } else { named }
}

/// Moves a schema's `$defs` into `schemas` and points its `$ref`s there.
fn hoist(mut schema: Value, schemas: &mut Map<String, Value>) -> Value {
    if let Some(Value::Object(defs)) = schema.as_object_mut().and_then(|o| o.remove("$defs")) {
        for (name, def) in defs {
            let def = hoist(def, schemas);
            schemas.insert(name, def);
        }
    }
    rewrite_refs(&mut schema);
    if let Some(o) = schema.as_object_mut() {
        o.remove("$schema");
    }
    schema
}

fn rewrite_refs(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("$ref")
                && let Some(name) = r.strip_prefix("#/$defs/")
            {
                *r = format!("#/components/schemas/{name}");
            }
            o.values_mut().for_each(rewrite_refs);
        }
        Value::Array(a) => a.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

fn add_kind<S: ResourceSpec>(paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>) {
    let schema = serde_json::to_value(schemars::schema_for!(nexus_api::Object<S>)).unwrap_or_default();
    let schema = hoist(schema, schemas);
    schemas.insert(S::KIND.into(), schema);
    let r = json!({"$ref": format!("#/components/schemas/{}", S::KIND)});
    let list = json!({"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "metadata": {"type": "object", "properties": {"resourceVersion": {"type": "string"}, "continue": {"type": "string"}}},
        "items": {"type": "array", "items": r}
    }});
    let err = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let ok = |d: &str| json!({"description": d, "content": {"application/json": {"schema": r}}});
    let q = |name: &str, desc: &str| json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": "string"}});
    let p = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
    let fields = KindInfo::of::<S>().field_selectors.join(", ");
    let list_params = vec![
        q("labelSelector", "a=b,c!=d,e,!f"),
        q("fieldSelector", &fields),
        q("limit", "page size"),
        q("continue", "token from the previous page"),
        q("watch", "true: stream changes as newline-delimited JSON"),
        q("resourceVersion", "watch changes after this version"),
    ];
    let (collection, object, mut base) = if S::NAMESPACED {
        (
            format!("/v1/projects/{{project}}/{}", S::PLURAL),
            format!("/v1/projects/{{project}}/{}/{{name}}", S::PLURAL),
            vec![p("project")],
        )
    } else {
        (format!("/v1/{}", S::PLURAL), format!("/v1/{}/{{name}}", S::PLURAL), vec![])
    };
    let body = json!({"required": true, "content": {"application/json": {"schema": r}}});
    let dry = q("dryRun", "All: validate without storing");
    paths.insert(collection, json!({
        "parameters": base.clone(),
        "get": {"operationId": format!("list{}", S::KIND), "parameters": list_params,
                "responses": {"200": {"description": "List or watch stream", "content": {"application/json": {"schema": list}}}, "default": err}},
        "post": {"operationId": format!("create{}", S::KIND), "parameters": [dry], "requestBody": body,
                 "responses": {"201": ok("Created"), "default": err}},
    }));
    base.push(p("name"));
    paths.insert(object.clone(), json!({
        "parameters": base.clone(),
        "get": {"operationId": format!("read{}", S::KIND), "responses": {"200": ok("The object"), "default": err}},
        "put": {"operationId": format!("replace{}", S::KIND), "parameters": [dry], "requestBody": body, "responses": {"200": ok("Replaced"), "default": err}},
        "delete": {"operationId": format!("delete{}", S::KIND), "parameters": [dry], "responses": {"200": ok("Deleted, or marked for deletion"), "default": err}},
    }));
    paths.insert(format!("{object}/status"), json!({
        "parameters": base,
        "put": {"operationId": format!("replace{}Status", S::KIND), "parameters": [dry], "requestBody": body, "responses": {"200": ok("Status replaced"), "default": err}},
    }));
    if S::NAMESPACED {
        paths.insert(
            format!("/v1/{}", S::PLURAL),
            json!({
                "get": {"operationId": format!("list{}AllProjects", S::KIND), "parameters": list_params_all(),
                        "responses": {"200": {"description": "List or watch stream across projects"}, "default": err}},
            }),
        );
    }
}

fn list_params_all() -> Value {
    json!([
        {"name": "labelSelector", "in": "query", "schema": {"type": "string"}},
        {"name": "fieldSelector", "in": "query", "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "schema": {"type": "string"}},
        {"name": "continue", "in": "query", "schema": {"type": "string"}},
        {"name": "watch", "in": "query", "schema": {"type": "string"}},
        {"name": "resourceVersion", "in": "query", "schema": {"type": "string"}}
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_kind_has_its_paths_and_no_dangling_refs() {
        let doc = super::document();
        let text = doc.to_string();
        for path in [
            "/v1/projects/{project}/vms/{name}/status",
            "/v1/nodes/{name}",
            "/v1/projects/{project}/templates",
            "/v1/events",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
        assert!(!text.contains("#/$defs/"), "all refs point into components");
        // The other routes under the methods they answer.
        let ops = |path: &str| doc["paths"][path].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(ops("/v1/events:record"), ["post"]);
        assert_eq!(ops("/v1/projects/{project}/vms/{name}/fork"), ["post"]);
        assert_eq!(ops("/v1/tokens"), ["get", "post"]);
        assert_eq!(ops("/v1/tokens/{id}"), ["delete", "get"]);
        assert_eq!(ops("/v1/nodes/{name}/credential"), ["get", "put"]);
        assert_eq!(ops("/healthz"), ["get"]);
        for r in text.split("#/components/schemas/").skip(1) {
            let name: String = r.chars().take_while(|c| *c != '"').collect();
            assert!(doc["components"]["schemas"].get(&name).is_some(), "dangling ref {name}");
        }
    }
}
