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
