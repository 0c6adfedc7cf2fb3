//! `get`: one kind or several (`get vms,snapshots`), as a table, YAML,
//! JSON, names or a JSONPath template, and `-w` to follow the changes.

use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::commands::{get_json, list_path};
use crate::context::{Context, Failure};
use crate::follow;
use crate::jsonpath::Template;
use crate::kinds::{self, KindInfo};
use crate::render;

/// Options of `get`.
#[derive(Debug, Default)]
pub struct GetOptions<'a> {
    pub output: Option<&'a str>,
    pub labels: Option<&'a str>,
    pub fields: Option<&'a str>,
    pub all_projects: bool,
    pub watch: bool,
}

/// `get KIND [NAME...]`.
pub async fn get(ctx: &Context, kinds: &str, names: &[String], o: &GetOptions<'_>) -> Result<(), Failure> {
    let kinds: Vec<&'static KindInfo> =
        kinds.split(',').map(|k| kinds::resolve(k.trim())).collect::<Result<_, _>>().map_err(Failure::usage)?;
    if kinds.len() > 1 && !names.is_empty() {
        return Err(Failure::usage("names go with one kind: get vm NAME..."));
    }
    if kinds.len() > 1 && o.watch {
        return Err(Failure::usage("-w follows one kind at a time"));
    }
    let format = o.output.unwrap_or("table");
    let jsonpath = match format.strip_prefix("jsonpath=") {
        Some(t) => Some(Template::parse(t).map_err(Failure::usage)?),
        None if ["table", "wide", "yaml", "json", "name"].contains(&format) => None,
        None => {
            return Err(Failure::usage(format!(
                "unknown output format {format:?}; use wide, yaml, json, name or jsonpath=TEMPLATE"
            )));
        }
    };
    let mut found = Vec::with_capacity(kinds.len());
    for kind in &kinds {
        found.push((*kind, fetch(ctx, kind, names, o).await?));
    }
    let single = names.len() == 1;
    let all: Vec<Value> = found.iter().flat_map(|(_, (items, _))| items.iter().cloned()).collect();
    let whole = if single {
        all[0].clone()
    } else {
        json!({"apiVersion": nexus_api::API_VERSION, "kind": "List", "items": all})
    };
    match (format, &jsonpath) {
        (_, Some(t)) => println!("{}", t.render(&whole)),
        ("json", _) => println!("{}", serde_json::to_string_pretty(&whole).unwrap_or_default()),
        ("yaml", _) => print!("{}", serde_saphyr::to_string(&whole).map_err(|e| Failure::error(e.to_string()))?),
        ("name", _) => {
            for (kind, (items, _)) in &found {
                items
                    .iter()
                    .for_each(|i| println!("{}/{}", kind.short(), i["metadata"]["name"].as_str().unwrap_or("")));
            }
        }
        _ if all.is_empty() && !o.watch => {
            let plural: Vec<&str> = kinds.iter().map(|k| k.plural).collect();
            let scope = if o.all_projects || !kinds.iter().any(|k| k.namespaced) {
                String::new()
            } else {
                format!(" in project {}", ctx.project)
            };
            eprintln!("No {} found{scope}.", plural.join(" or "));
        }
        _ => {
            // One table a kind, as kubectl prints them, kinds with nothing left out.
            let tables: Vec<String> = found
                .iter()
                .filter(|(_, (items, _))| !items.is_empty() || o.watch)
                .map(|(kind, (items, _))| render::table(kind, items, o.all_projects, format == "wide", Utc::now()))
                .collect();
            println!("{}", tables.join("\n\n"));
        }
    }
    if o.watch {
        let (kind, (_, list_rv)) = found.swap_remove(0);
        watch_rows(ctx, kind, o, list_rv).await?;
    }
    Ok(())
}

/// The objects of `kind` a `get` shows (listed, or `names` one by one),
/// and the list's resourceVersion (to watch from).
async fn fetch(
    ctx: &Context,
    kind: &KindInfo,
    names: &[String],
    o: &GetOptions<'_>,
) -> Result<(Vec<Value>, Option<String>), Failure> {
    if names.is_empty() {
        let list = get_json(ctx, &list_path(kind, ctx, o.all_projects, o.labels, o.fields))
            .await
            .map_err(|e| Failure::api(&e))?;
        return Ok((
            list["items"].as_array().cloned().unwrap_or_default(),
            list["metadata"]["resourceVersion"].as_str().map(str::to_string),
        ));
    }
    let mut items = Vec::new();
    for n in names {
        items.push(get_json(ctx, &kind.object(&ctx.project, n)).await.map_err(|e| Failure::api(&e))?);
    }
    Ok((items, None))
}

/// `get -w`: one row per change, as it happens.
async fn watch_rows(ctx: &Context, kind: &KindInfo, o: &GetOptions<'_>, rv: Option<String>) -> Result<(), Failure> {
    let mut path = list_path(kind, ctx, o.all_projects, o.labels, o.fields);
    path.push(if path.contains('?') { '&' } else { '?' });
    path.push_str("watch=true");
    if let Some(rv) = rv {
        path.push_str(&format!("&resourceVersion={rv}"));
    }
    let body = ctx.client.get_stream(&path).await.map_err(|e| Failure::api(&e))?;
    let mut events = std::pin::pin!(follow::events(body));
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| Failure::error(format!("watch ended: {e}")))?;
        if event["type"] == "BOOKMARK" {
            continue;
        }
        if event["type"] == "ERROR" {
            return Err(Failure::error(format!("watch ended: {}", event["object"]["message"])));
        }
        let table = render::table(
            kind,
            std::slice::from_ref(&event["object"]),
            o.all_projects,
            o.output == Some("wide"),
            Utc::now(),
        );
        if let Some(row) = table.lines().nth(1) {
            let tag = if event["type"] == "DELETED" { " (deleted)" } else { "" };
            println!("{row}{tag}");
        }
    }
    Ok(())
}
