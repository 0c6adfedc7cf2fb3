//! `schemas/` must match the types. Regenerate with `hack/update-schemas.sh`.

use std::path::Path;

#[test]
fn committed_schemas_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let update = std::env::var_os("NEXUS_UPDATE_SCHEMAS").is_some();
    let mut stale = Vec::new();
    for (stem, schema) in nexus_api::schema::all() {
        let path = dir.join(format!("{stem}.json"));
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        if update {
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(format!("schemas/{stem}.json"));
        }
    }
    assert!(
        stale.is_empty(),
        "{} out of date with the types: run hack/update-schemas.sh and commit the result",
        stale.join(", ")
    );
}

const ROUTES_BEGIN: &str = "<!-- routes: generated from the kind registry by hack/update-schemas.sh -->\n";
const ROUTES_END: &str = "<!-- end of routes -->";

#[test]
fn the_api_reference_lists_every_route_of_every_kind() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (head, rest) = doc.split_once(ROUTES_BEGIN).expect("docs/api.md has the routes markers");
    let (_, tail) = rest.split_once(ROUTES_END).expect("docs/api.md has the end-of-routes marker");
    let fresh = format!("{head}{ROUTES_BEGIN}{}{ROUTES_END}{tail}", nexus_api::registry::route_table_markdown());
    if std::env::var_os("NEXUS_UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, fresh).unwrap();
        return;
    }
    assert!(doc == fresh, "docs/api.md's route table is out of date: run hack/update-schemas.sh and commit the result");
}
