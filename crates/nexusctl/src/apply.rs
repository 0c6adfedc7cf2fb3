//! `apply`, `diff` and pruning: three-way merges of files into live objects.
//!
//! What was last applied is kept in the `nexus.dev/last-applied`
//! annotation, so a field removed from a file is removed from the object,
//! while fields the system set (such as `spec.nodeName`) are kept.

use std::collections::{BTreeSet, HashMap};

use futures::StreamExt;
use nexus_client::ClientError;
use serde_json::{Map, Value, json};

use crate::context::{Context, Failure, urlencode};
use crate::kinds::{self, normalize};
use crate::manifest::{self, LAST_APPLIED, Target, clean};
use crate::progress::{self, Progress};
use crate::render;

/// What applying one document will do.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Create(Value),
    Update(Value),
    Unchanged,
}

/// The merge patch that takes `last` to `desired`: what `desired` says,
/// plus `null` for what `last` had and `desired` dropped.
fn three_way(last: &Value, desired: &Value) -> Value {
    match (last, desired) {
        (Value::Object(l), Value::Object(d)) => {
            let mut patch = Map::new();
            for (k, dv) in d {
                patch.insert(k.clone(), three_way(l.get(k).unwrap_or(&Value::Null), dv));
            }
            for k in l.keys() {
                if !d.contains_key(k) {
                    patch.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(patch)
        }
        (_, d) => d.clone(),
    }
}

static EMPTY_MAP: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::Object(Map::new()));

/// `v`, or an empty object when `v` is absent (`null`).
fn map_or_empty(v: &Value) -> &Value {
    if v.is_null() { &EMPTY_MAP } else { v }
}

fn without_last_applied(mut v: Value) -> Value {
    if let Some(a) = v["metadata"].get_mut("annotations").and_then(Value::as_object_mut) {
        a.remove(LAST_APPLIED);
        if a.is_empty()
            && let Some(m) = v["metadata"].as_object_mut()
        {
            m.remove("annotations");
        }
    }
    v
}

/// Decides what applying `target` onto `live` does.
pub fn plan(target: &Target, live: Option<&Value>) -> Result<Plan, String> {
    let record = serde_json::to_string(&target.desired).map_err(|e| e.to_string())?;
    let Some(live) = live else {
        let mut body = target.desired.clone();
        body["metadata"]["annotations"][LAST_APPLIED] = json!(record);
        return Ok(Plan::Create(normalize(target.kind, &body)?));
    };
    let last: Value = live["metadata"]["annotations"][LAST_APPLIED]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| json!({}));
    let mut next = live.clone();
    if let Some(o) = next.as_object_mut() {
        o.remove("status");
    }
    json_patch::merge(&mut next["spec"], &three_way(&last["spec"], &target.desired["spec"]));
    for field in ["labels", "annotations"] {
        // An absent map is an empty one: a file without annotations owns
        // none, and says nothing about those the system wrote.
        let patch = three_way(map_or_empty(&last["metadata"][field]), map_or_empty(&target.desired["metadata"][field]));
        json_patch::merge(&mut next["metadata"][field], &patch);
        if next["metadata"][field].as_object().is_some_and(Map::is_empty) || next["metadata"][field].is_null() {
            if let Some(m) = next["metadata"].as_object_mut() {
                m.remove(field);
            }
        }
    }
    let mut live_cmp = live.clone();
    if let Some(o) = live_cmp.as_object_mut() {
        o.remove("status");
    }
    let before = normalize(target.kind, &without_last_applied(live_cmp))?;
    let after = normalize(target.kind, &without_last_applied(next.clone()))?;
    if before == after {
        return Ok(Plan::Unchanged);
    }
    next["metadata"]["annotations"][LAST_APPLIED] = json!(record);
    Ok(Plan::Update(normalize(target.kind, &next)?))
}

async fn get_live(ctx: &Context, t: &Target) -> Result<Option<Value>, String> {
    let got: Result<Value, ClientError> =
        ctx.client.raw(reqwest::Method::GET, &t.kind.object(&t.project, &t.name), None).await;
    match got {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(render::client_error(&e)),
    }
}

/// Applies one target; returns `created`, `configured` or `unchanged`,
/// with the object as the server now holds it. `listed` is the object as a
/// list of its kind just showed it (`None` inside when the list did not
/// have it); without a list it is read first.
async fn apply_one(
    ctx: &Context,
    t: &Target,
    listed: Option<Option<Value>>,
    dry_run: bool,
) -> Result<(&'static str, Value), String> {
    let q = if dry_run { "?dryRun=All" } else { "" };
    let mut listed = listed;
    // A conflict means someone wrote in between (or since the list): plan
    // again on their version, read afresh.
    for _ in 0..5 {
        let live = match listed.take() {
            Some(live) => live,
            None => get_live(ctx, t).await?,
        };
        let (method, path, body, outcome) = match plan(t, live.as_ref())? {
            Plan::Unchanged => return Ok(("unchanged", live.unwrap_or_default())),
            Plan::Create(body) => (reqwest::Method::POST, t.kind.collection(&t.project), body, "created"),
            Plan::Update(body) => (reqwest::Method::PUT, t.kind.object(&t.project, &t.name), body, "configured"),
        };
        let result: Result<Value, ClientError> = ctx.client.raw(method, &format!("{path}{q}"), Some(&body)).await;
        match result {
            Ok(stored) => return Ok((outcome, stored)),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(render::client_error(&e)),
        }
    }
    Err(format!("{} kept changing while being applied; try again", t.label()))
}

fn read_targets(ctx: &Context, files: &[String]) -> Result<Vec<Target>, Failure> {
    let mut targets = Vec::new();
    for f in files {
        for doc in manifest::read(f).map_err(Failure::error)? {
            targets.push(
                Target::from_doc(&doc, &ctx.project).map_err(|e| Failure::error(format!("{}: {e}", doc.origin())))?,
            );
        }
    }
    Ok(targets)
}

/// `apply -f ... [--dry-run=server] [--prune -l SELECTOR] [-o name|json|yaml]`.
pub async fn apply(
    ctx: &Context,
    files: &[String],
    dry_run: bool,
    prune: Option<&str>,
    output: Option<&str>,
) -> Result<(), Failure> {
    if let Some(o) = output.filter(|o| !["name", "json", "yaml"].contains(o)) {
        return Err(Failure::usage(format!("unknown output format {o:?}; use name, json or yaml")));
    }
    let targets = read_targets(ctx, files)?;
    let suffix = if dry_run { " (server dry run)" } else { "" };
    let mut failed = 0;
    let mut applied = Vec::new();
    let bar = Progress::items(progress::wanted(output) && targets.len() > 1, targets.len() as u64, "applying");
    for run in runs(&targets) {
        let mut listed = list_live(ctx, run).await;
        // Objects of one run go out together; results print in file order.
        let results = futures::stream::iter(run.iter().map(|t| {
            let known = take_listed(&mut listed, t);
            async move { (t, apply_one(ctx, t, known, dry_run).await) }
        }))
        .buffered(APPLY_CONCURRENCY);
        let mut results = std::pin::pin!(results);
        while let Some((t, result)) = results.next().await {
            bar.inc(1);
            match (result, output) {
                (Ok((what, _)), None) => bar.println(&format!("{} {what}{suffix}", t.label())),
                (Ok(_), Some("name")) => bar.println(&format!("{}/{}", t.kind.short(), t.name)),
                (Ok((_, obj)), _) => applied.push(obj),
                (Err(e), _) => {
                    failed += 1;
                    bar.suspend(|| eprintln!("error: {}: {e}", t.label()));
                }
            }
        }
    }
    bar.finish();
    match output {
        Some("json") | Some("yaml") => {
            let list = json!({"apiVersion": nexus_api::API_VERSION, "kind": "List", "items": applied});
            if output == Some("json") {
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                print!("{}", serde_saphyr::to_string(&list).map_err(|e| Failure::error(e.to_string()))?);
            }
        }
        _ => {}
    }
    if let Some(selector) = prune {
        failed += prune_absent(ctx, &targets, selector, dry_run).await?;
    }
    if failed > 0 {
        return Err(Failure::error(format!("{failed} objects failed")));
    }
    Ok(())
}

/// Requests `apply` has in flight at once.
const APPLY_CONCURRENCY: usize = 16;

/// Runs at least this long are read with one list per project instead of
/// one GET per object.
const LIST_FROM: usize = 32;

/// The live objects of a long run's kind in the run's projects, by
/// (project, name); `None` when the run is short or a list fails, and each
/// object is then read on its own (so a failure is reported per object, as
/// for a short run).
async fn list_live(ctx: &Context, run: &[Target]) -> Option<HashMap<(String, String), Value>> {
    let first = run.first()?;
    if run.len() < LIST_FROM {
        return None;
    }
    let projects: BTreeSet<&str> = run.iter().map(|t| t.project.as_str()).collect();
    let mut live = HashMap::new();
    for project in projects {
        let list: Value = ctx.client.raw(reqwest::Method::GET, &first.kind.collection(project), None).await.ok()?;
        for item in list["items"].as_array()? {
            let name = item["metadata"]["name"].as_str()?.to_string();
            live.insert((project.to_string(), name), item.clone());
        }
    }
    Some(live)
}

/// Splits `targets` into runs that may be applied concurrently: objects of
/// one kind in a row, each named once. Runs go in file order, so what a
/// file lists first (a Template, a quota) is stored before what follows.
fn runs(targets: &[Target]) -> Vec<&[Target]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut names = BTreeSet::new();
    for (i, t) in targets.iter().enumerate() {
        let same_kind = targets[start].kind.kind == t.kind.kind;
        let key = (t.project.clone(), t.name.clone());
        if i > start && (!same_kind || names.contains(&key)) {
            runs.push(&targets[start..i]);
            start = i;
            names.clear();
        }
        names.insert(key);
    }
    if start < targets.len() {
        runs.push(&targets[start..]);
    }
    runs
}

/// Deletes objects matching `selector` in the applied projects that no file
/// named. Returns how many deletions failed.
async fn prune_absent(ctx: &Context, targets: &[Target], selector: &str, dry_run: bool) -> Result<usize, Failure> {
    let keep: BTreeSet<(String, String, String)> =
        targets.iter().map(|t| (t.kind.kind.to_string(), t.project.clone(), t.name.clone())).collect();
    let mut projects: BTreeSet<String> =
        targets.iter().filter(|t| t.kind.namespaced).map(|t| t.project.clone()).collect();
    projects.insert(ctx.project.clone());
    let q = if dry_run { "?dryRun=All" } else { "" };
    let suffix = if dry_run { " (server dry run)" } else { "" };
    let mut failed = 0;
    for kind in kinds::kinds().iter().filter(|k| k.namespaced) {
        for project in &projects {
            let path = format!("{}?labelSelector={}", kind.collection(project), urlencode(selector));
            let list: Value = ctx
                .client
                .raw(reqwest::Method::GET, &path, None)
                .await
                .map_err(|e| Failure::error(render::client_error(&e)))?;
            for item in list["items"].as_array().into_iter().flatten() {
                let name = item["metadata"]["name"].as_str().unwrap_or_default().to_string();
                if keep.contains(&(kind.kind.to_string(), project.clone(), name.clone())) {
                    continue;
                }
                let deleted: Result<Value, ClientError> =
                    ctx.client.raw(reqwest::Method::DELETE, &format!("{}{q}", kind.object(project, &name)), None).await;
                match deleted {
                    Ok(_) => println!("{}/{name} pruned{suffix}", kind.short()),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        failed += 1;
                        eprintln!("error: pruning {}/{name}: {}", kind.short(), render::client_error(&e));
                    }
                }
            }
        }
    }
    Ok(failed)
}

fn yaml(v: &Value) -> String {
    serde_saphyr::to_string(v).unwrap_or_default()
}

/// `diff -f ...`: what apply would change, as a unified diff. Returns
/// whether anything would change.
pub async fn diff(ctx: &Context, files: &[String]) -> Result<bool, Failure> {
    let targets = read_targets(ctx, files)?;
    let mut changed = false;
    for run in runs(&targets) {
        let mut listed = list_live(ctx, run).await;
        for t in run {
            let live = match take_listed(&mut listed, t) {
                Some(live) => live,
                None => get_live(ctx, t).await.map_err(Failure::error)?,
            };
            changed |= print_diff(t, live.as_ref())?;
        }
    }
    Ok(changed)
}

/// What the run's list showed of `t` (`Some(None)`: it was not there), or
/// `None` without a list.
fn take_listed(listed: &mut Option<HashMap<(String, String), Value>>, t: &Target) -> Option<Option<Value>> {
    listed.as_mut().map(|l| l.remove(&(t.project.clone(), t.name.clone())))
}

/// Prints what applying `t` onto `live` would change, as a unified diff;
/// returns whether anything would.
fn print_diff(t: &Target, live: Option<&Value>) -> Result<bool, Failure> {
    let (old, new) = match plan(t, live).map_err(|e| Failure::error(format!("{}: {e}", t.label())))? {
        Plan::Unchanged => return Ok(false),
        Plan::Create(body) => (String::new(), yaml(&clean(&body))),
        Plan::Update(body) => (yaml(&clean(live.unwrap_or(&Value::Null))), yaml(&clean(&body))),
    };
    let label = t.label();
    let text = similar::TextDiff::from_lines(&old, &new);
    print!("{}", text.unified_diff().context_radius(3).header(&format!("live/{label}"), &format!("applied/{label}")));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Document;

    fn target(spec: Value) -> Target {
        let doc = Document {
            source: "t.yaml".into(),
            index: 1,
            value: json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "a", "labels": {"app": "x"}}, "spec": spec}),
        };
        Target::from_doc(&doc, "default").unwrap()
    }

    fn spec() -> Value {
        json!({"vcpu": 1, "memMib": 128, "kernel": "/k", "rootfs": "/r", "bootArgs": "console=ttyS0"})
    }

    fn named(kind: &str, name: &str) -> Target {
        let doc = Document {
            source: "t.yaml".into(),
            index: 1,
            value: json!({"apiVersion": "nexus/v1", "kind": kind, "metadata": {"name": name}, "spec": {}}),
        };
        Target::from_doc(&doc, "default").unwrap()
    }

    #[test]
    fn runs_keep_kinds_in_file_order_and_each_name_once() {
        let targets = vec![
            named("Template", "t"),
            named("VM", "a"),
            named("VM", "b"),
            named("VM", "a"),
            named("VM", "c"),
            named("Snapshot", "s"),
        ];
        let shape: Vec<Vec<String>> =
            runs(&targets).iter().map(|r| r.iter().map(|t| format!("{}/{}", t.kind.kind, t.name)).collect()).collect();
        assert_eq!(
            shape,
            vec![vec!["Template/t"], vec!["VM/a", "VM/b"], vec!["VM/a", "VM/c"], vec!["Snapshot/s"]],
            "a second `a` waits for the first"
        );
        assert!(runs(&[]).is_empty());
    }

    fn stored(body: Value) -> Value {
        let mut v = body;
        v["metadata"]["uid"] = json!("u");
        v["metadata"]["resourceVersion"] = json!("5");
        v["spec"]["nodeName"] = json!("node-a");
        v["status"] = json!({"phase": "Running"});
        v
    }

    #[test]
    fn unchanged_when_only_system_fields_differ_then_configured_on_an_edit() {
        let Plan::Create(body) = plan(&target(spec()), None).unwrap() else { panic!("create") };
        let live = stored(body);
        assert_eq!(plan(&target(spec()), Some(&live)).unwrap(), Plan::Unchanged);
        let mut edited = spec();
        edited["memMib"] = json!(256);
        let Plan::Update(next) = plan(&target(edited), Some(&live)).unwrap() else { panic!("update") };
        assert_eq!(next["spec"]["memMib"], 256);
        assert_eq!(next["spec"]["nodeName"], "node-a", "fields set by the system are kept");
        assert_eq!(next["metadata"]["resourceVersion"], "5", "sent back for optimistic concurrency");
    }

    #[test]
    fn a_field_removed_from_the_file_is_removed_from_the_object() {
        let Plan::Create(body) = plan(&target(spec()), None).unwrap() else { panic!("create") };
        let live = stored(body);
        let mut trimmed = spec();
        trimmed.as_object_mut().unwrap().remove("bootArgs");
        let Plan::Update(next) = plan(&target(trimmed), Some(&live)).unwrap() else { panic!("update") };
        assert!(next["spec"].get("bootArgs").is_none(), "{next}");
    }

    #[test]
    fn reapplying_a_file_without_metadata_maps_keeps_what_the_system_wrote() {
        let doc = Document {
            source: "t.yaml".into(),
            index: 1,
            value: json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "a"}, "spec": spec()}),
        };
        let t = Target::from_doc(&doc, "default").unwrap();
        let Plan::Create(body) = plan(&t, None).unwrap() else { panic!("create") };
        let mut live = stored(body);
        live["metadata"]["annotations"]["nexus.dev/placed-by"] = json!("scheduler");
        live["metadata"]["labels"] = json!({"added-by": "someone-else"});
        assert_eq!(plan(&t, Some(&live)).unwrap(), Plan::Unchanged, "no annotation or label of the file changed");
        let mut edited = t.clone();
        edited.desired["spec"]["memMib"] = json!(256);
        let Plan::Update(next) = plan(&edited, Some(&live)).unwrap() else { panic!("update") };
        assert_eq!(next["metadata"]["annotations"]["nexus.dev/placed-by"], "scheduler", "{next}");
        assert_eq!(next["metadata"]["labels"]["added-by"], "someone-else", "{next}");
    }

    #[test]
    fn a_label_dropped_from_the_file_is_removed_and_others_stay() {
        let Plan::Create(body) = plan(&target(spec()), None).unwrap() else { panic!("create") };
        let mut live = stored(body);
        live["metadata"]["annotations"]["nexus.dev/placed-by"] = json!("scheduler");
        let doc = Document {
            source: "t.yaml".into(),
            index: 1,
            value: json!({"apiVersion": "nexus/v1", "kind": "VM", "metadata": {"name": "a"}, "spec": spec()}),
        };
        let t = Target::from_doc(&doc, "default").unwrap();
        let Plan::Update(next) = plan(&t, Some(&live)).unwrap() else { panic!("update") };
        assert!(next["metadata"].get("labels").is_none(), "the file's label app=x went: {next}");
        assert_eq!(next["metadata"]["annotations"]["nexus.dev/placed-by"], "scheduler");
    }

    #[test]
    fn reapplying_get_output_is_unchanged() {
        let Plan::Create(body) = plan(&target(spec()), None).unwrap() else { panic!("create") };
        let live = stored(body);
        let doc = Document { source: "get.yaml".into(), index: 1, value: live.clone() };
        let t = Target::from_doc(&doc, "default").unwrap();
        assert_eq!(plan(&t, Some(&live)).unwrap(), Plan::Unchanged);
    }
}
