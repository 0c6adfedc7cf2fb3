//! The subcommands other than apply and diff.

use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use nexus_api::{ResourceSpec, VmSpec};
use nexus_client::ClientError;
use serde_json::{Value, json};

use crate::context::{Context, Failure, urlencode};
use crate::follow::{self, Seen};
use crate::jsonpath::Template;
use crate::kinds::{self, KindInfo};
use crate::manifest;
use crate::render;

pub(crate) async fn get_json(ctx: &Context, path: &str) -> Result<Value, ClientError> {
    ctx.client.raw(reqwest::Method::GET, path, None).await
}

pub(crate) fn list_path(
    kind: &KindInfo,
    ctx: &Context,
    all: bool,
    labels: Option<&str>,
    fields: Option<&str>,
) -> String {
    let mut path = if all { kind.all_projects() } else { kind.collection(&ctx.project) };
    let mut q = Vec::new();
    if let Some(l) = labels {
        q.push(format!("labelSelector={}", urlencode(l)));
    }
    if let Some(f) = fields {
        q.push(format!("fieldSelector={}", urlencode(f)));
    }
    if !q.is_empty() {
        path.push('?');
        path.push_str(&q.join("&"));
    }
    path
}

/// `describe KIND NAME`.
pub async fn describe(ctx: &Context, kind: &str, name: &str) -> Result<(), Failure> {
    let kind = kinds::resolve(kind).map_err(Failure::usage)?;
    let obj = get_json(ctx, &kind.object(&ctx.project, name)).await.map_err(|e| Failure::api(&e))?;
    let recent = crate::diagnose::recent_events(ctx, kind, &ctx.project, name, obj["metadata"]["uid"].as_str()).await;
    print!("{}", render::describe(kind, &obj, &recent, Utc::now()));
    Ok(())
}

/// Which objects a command acts on: names, files or a selector.
#[derive(Debug, Default)]
pub struct Selection<'a> {
    pub kind: Option<&'a str>,
    pub names: &'a [String],
    pub files: &'a [String],
    pub labels: Option<&'a str>,
    /// Every object of the kind (`delete vm --all`).
    pub all: bool,
}

async fn select(ctx: &Context, sel: &Selection<'_>) -> Result<Vec<(&'static KindInfo, String, String)>, Failure> {
    let mut out = Vec::new();
    for f in sel.files {
        for doc in manifest::read(f).map_err(Failure::error)? {
            let t = crate::manifest::Target::from_doc(&doc, &ctx.project)
                .map_err(|e| Failure::error(format!("{}: {e}", doc.origin())))?;
            out.push((t.kind, t.project, t.name));
        }
    }
    if sel.all && (!sel.names.is_empty() || !sel.files.is_empty() || sel.labels.is_some()) {
        return Err(Failure::usage("--all selects every object of the kind: leave out names, -f and -l"));
    }
    if sel.files.is_empty() {
        let kind = kinds::resolve(sel.kind.ok_or_else(|| Failure::usage("name a kind, such as `vm`, or use -f FILE"))?)
            .map_err(Failure::usage)?;
        let project = if kind.namespaced { ctx.project.clone() } else { String::new() };
        if sel.all {
            let list = get_json(ctx, &list_path(kind, ctx, false, None, None)).await.map_err(|e| Failure::api(&e))?;
            for i in list["items"].as_array().into_iter().flatten() {
                out.push((kind, project.clone(), i["metadata"]["name"].as_str().unwrap_or_default().to_string()));
            }
            return Ok(out);
        }
        for n in sel.names {
            out.push((kind, project.clone(), n.clone()));
        }
        if let Some(l) = sel.labels {
            let list =
                get_json(ctx, &list_path(kind, ctx, false, Some(l), None)).await.map_err(|e| Failure::api(&e))?;
            for i in list["items"].as_array().into_iter().flatten() {
                out.push((kind, project.clone(), i["metadata"]["name"].as_str().unwrap_or_default().to_string()));
            }
        }
        if sel.names.is_empty() && sel.labels.is_none() {
            return Err(Failure::usage("name the objects, or select them with -l SELECTOR, -f FILE or --all"));
        }
    }
    Ok(out)
}

/// `delete KIND NAME... | -f FILE | -l SELECTOR [--wait]`.
pub async fn delete(ctx: &Context, sel: &Selection<'_>, wait: bool, timeout: Duration) -> Result<(), Failure> {
    let targets = select(ctx, sel).await?;
    if targets.is_empty() {
        eprintln!("No objects matched.");
    }
    // Several at once (their writes share the store's commits), reported
    // in order.
    let deletes = futures::stream::iter(&targets).map(|(kind, project, name)| async move {
        let deleted: Result<Value, ClientError> =
            ctx.client.raw(reqwest::Method::DELETE, &kind.object(project, name), None).await;
        deleted.map(|_| (kind, name))
    });
    let mut deletes = std::pin::pin!(deletes.buffered(DELETES_AT_ONCE));
    while let Some(done) = deletes.next().await {
        let (kind, name) = done.map_err(|e| Failure::api(&e))?;
        println!("{} \"{name}\" deleted", kind.short());
    }
    if wait {
        let deadline = Instant::now() + timeout;
        let on = crate::progress::wanted(None) && targets.len() > 1;
        let bar = crate::progress::Progress::items(on, targets.len() as u64, "waiting for them to go");
        // One watch per kind and project, until none of its objects is left.
        let mut groups: Vec<(&KindInfo, &str, std::collections::BTreeSet<&str>)> = Vec::new();
        for (kind, project, name) in &targets {
            match groups.iter_mut().find(|(k, p, _)| std::ptr::eq(*k, *kind) && p == project) {
                Some((_, _, names)) => {
                    names.insert(name);
                }
                None => groups.push((kind, project, [name.as_str()].into())),
            }
        }
        let total = targets.len();
        let mut gone_before = 0;
        for (kind, project, names) in &groups {
            let left = deadline.saturating_duration_since(Instant::now());
            if names.len() <= FOLLOWED_BY_NAME {
                // A few: each by name, not the whole collection.
                for name in names {
                    let left = deadline.saturating_duration_since(Instant::now());
                    follow::until(ctx, kind, project, name, left, |obj| match obj {
                        None => Seen::Done,
                        Some(o) => Seen::Waiting(format!("still there, finalizers {}", o["metadata"]["finalizers"])),
                    })
                    .await?;
                    gone_before += 1;
                    bar.set_position(gone_before as u64);
                }
                continue;
            }
            // The names still there, kept up to date with each change (a
            // look at every name after every event made a large delete's
            // wait quadratic). A name once gone stays gone: an object made
            // again under it is another object.
            let mut there = names.clone();
            follow::until_all(ctx, kind, project, "", left, |objects, changed| {
                match changed {
                    Some(name) if !objects.contains_key(name) => {
                        there.remove(name);
                    }
                    Some(_) => {}
                    None => there.retain(|n| objects.contains_key(*n)),
                }
                bar.set_position((gone_before + names.len() - there.len()) as u64);
                match there.first() {
                    None => Seen::Done,
                    Some(n) => Seen::Waiting(format!(
                        "{} of {total} still there, {}/{n} with finalizers {}",
                        there.len(),
                        kind.short(),
                        objects.get(*n).map_or(&Value::Null, |o| &o["metadata"]["finalizers"])
                    )),
                }
            })
            .await?;
            gone_before += names.len();
        }
        bar.finish();
    }
    Ok(())
}

/// How many deletes `delete` has in flight.
const DELETES_AT_ONCE: usize = 16;
/// Up to how many deleted objects of one kind `--wait` follows one by one
/// (more: one watch of their collection).
const FOLLOWED_BY_NAME: usize = 4;

/// What `wait --for` waits for.
#[derive(Debug, Clone)]
pub enum WaitFor {
    Condition { type_: String, status: String },
    JsonPath { template: Template, value: Option<String> },
    Delete,
}

impl WaitFor {
    /// Parses `condition=Ready[=True]`, `jsonpath={.status.phase}=Running` or `delete`.
    pub fn parse(text: &str) -> Result<WaitFor, String> {
        if text == "delete" {
            return Ok(WaitFor::Delete);
        }
        if let Some(rest) = text.strip_prefix("condition=") {
            let (t, s) = rest.split_once('=').unwrap_or((rest, "True"));
            if t.is_empty() {
                return Err("--for=condition= needs a condition type, such as condition=Ready".into());
            }
            return Ok(WaitFor::Condition { type_: t.to_string(), status: s.to_string() });
        }
        if let Some(rest) = text.strip_prefix("jsonpath=") {
            let rest = rest.trim_matches('\'');
            let (expr, value) = match rest.rfind("}=") {
                Some(i) => (&rest[..=i], Some(rest[i + 2..].to_string())),
                None => (rest, None),
            };
            return Ok(WaitFor::JsonPath { template: Template::parse(expr)?, value });
        }
        Err(format!(
            "--for={text:?} is not understood; use condition=TYPE[=STATUS], jsonpath={{.path}}=VALUE or delete"
        ))
    }

    /// Whether `obj` (None: absent) satisfies the wait, and what it saw.
    fn check(&self, obj: Option<&Value>) -> (bool, String) {
        match (self, obj) {
            (WaitFor::Delete, None) => (true, "deleted".into()),
            (WaitFor::Delete, Some(_)) => (false, "still exists".into()),
            (_, None) => (false, "does not exist".into()),
            (WaitFor::Condition { type_, status }, Some(o)) => {
                let c =
                    o["status"]["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == type_.as_str()));
                match c {
                    Some(c) => {
                        let now = c["status"].as_str().unwrap_or("");
                        (
                            now.eq_ignore_ascii_case(status),
                            format!("condition {type_} is {now} ({})", c["reason"].as_str().unwrap_or("")),
                        )
                    }
                    None => (false, format!("condition {type_} is not set")),
                }
            }
            (WaitFor::JsonPath { template, value }, Some(o)) => {
                let found = template.values(o);
                let text = template.render(o);
                let ok = match value {
                    Some(v) => found.iter().any(|f| crate::jsonpath::scalar(f) == *v),
                    None => !found.is_empty(),
                };
                (ok, format!("value is {text:?}"))
            }
        }
    }
}

/// `wait KIND NAME --for=... --timeout`.
pub async fn wait(ctx: &Context, kind: &str, name: &str, cond: &WaitFor, timeout: Duration) -> Result<(), Failure> {
    let kind = kinds::resolve(kind).map_err(Failure::usage)?;
    follow::until(ctx, kind, &ctx.project, name, timeout, |obj| match cond.check(obj) {
        (true, _) => Seen::Done,
        (false, seen) => Seen::Waiting(seen),
    })
    .await?;
    println!("{}/{name} condition met", kind.short());
    Ok(())
}

/// `start|stop|pause|resume vm NAME... | -l SELECTOR`: edits `spec.state`.
pub async fn power(
    ctx: &Context,
    state: &str,
    verb_done: &str,
    sel: &Selection<'_>,
    wait: Option<Duration>,
) -> Result<(), Failure> {
    let targets = select(ctx, sel).await?;
    if let Some((k, _, _)) = targets.iter().find(|(k, _, _)| k.kind != VmSpec::KIND) {
        return Err(Failure::usage(format!("only VMs have a power state, not {}", k.plural)));
    }
    if targets.is_empty() {
        eprintln!("No VMs matched.");
    }
    let mut failed = 0;
    for (kind, project, name) in &targets {
        let path = kind.object(project, name);
        let mut outcome = Err(String::new());
        for _ in 0..5 {
            let mut vm = match get_json(ctx, &path).await {
                Ok(v) => v,
                Err(e) => {
                    outcome = Err(render::client_error(&e));
                    break;
                }
            };
            if vm["spec"]["state"].as_str().unwrap_or("Running") == state {
                outcome = Ok("unchanged");
                break;
            }
            vm["spec"]["state"] = json!(state);
            let put: Result<Value, ClientError> = ctx.client.raw(reqwest::Method::PUT, &path, Some(&vm)).await;
            match put {
                Ok(_) => {
                    outcome = Ok(verb_done);
                    break;
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => {
                    outcome = Err(render::client_error(&e));
                    break;
                }
            }
        }
        match outcome {
            Ok(done) => println!("vm/{name} {done}"),
            Err(e) => {
                failed += 1;
                eprintln!("error: vm/{name}: {e}");
            }
        }
    }
    if let Some(timeout) = wait
        && failed == 0
    {
        let deadline = Instant::now() + timeout;
        for (kind, project, name) in &targets {
            let left = deadline.saturating_duration_since(Instant::now());
            follow::until(ctx, kind, project, name, left, |obj| reached(obj, state)).await?;
            println!("vm/{name} {state}");
        }
    }
    if failed > 0 { Err(Failure::error(format!("{failed} VMs failed"))) } else { Ok(()) }
}

/// Whether a VM (None: gone) is in the power state `state` asked for.
fn reached(vm: Option<&Value>, state: &str) -> Seen {
    let Some(vm) = vm else { return Seen::Failed("the VM was deleted".into()) };
    let status = &vm["status"];
    match status["phase"].as_str().unwrap_or("Pending") {
        phase if phase == state => Seen::Done,
        "Failed" => Seen::Failed(format!("the VM Failed: {}", status["lastError"]["message"].as_str().unwrap_or(""))),
        phase => Seen::Waiting(format!("phase {phase}")),
    }
}

/// `version`: the client's, then the server's.
pub async fn version(ctx: &Context) -> Result<(), Failure> {
    println!("Client Version: {}", env!("CARGO_PKG_VERSION"));
    let server = ctx.client.version().await.map_err(|e| Failure::api(&e))?;
    println!("Server Version: {}", server["version"].as_str().unwrap_or("unknown"));
    Ok(())
}

/// `snapshot VM NAME [--stay-paused] [--wait]`: writes a Snapshot object.
pub async fn snapshot(
    ctx: &Context,
    vm: &str,
    name: &str,
    stay_paused: bool,
    wait: Option<Duration>,
) -> Result<(), Failure> {
    let spec = nexus_api::SnapshotSpec { vm_name: vm.to_string(), resume_after: !stay_paused };
    let obj = nexus_api::Object::new(name, Some(&ctx.project), spec);
    ctx.client.create(&obj).await.map_err(|e| Failure::api(&e))?;
    println!("snapshot/{name} created");
    let Some(timeout) = wait else { return Ok(()) };
    let kind = kinds::resolve("snapshot").map_err(Failure::usage)?;
    let spinner = crate::progress::Progress::spinner(crate::progress::wanted(None), &format!("snapshot/{name}"));
    follow::until(ctx, kind, &ctx.project, name, timeout, |obj| {
        let Some(obj) = obj else { return Seen::Failed(format!("snapshot/{name} was deleted")) };
        let status = &obj["status"];
        spinner.set_message(format!("snapshot/{name}: {}", status["phase"].as_str().unwrap_or("Pending")));
        match status["phase"].as_str().unwrap_or("Pending") {
            "Ready" => Seen::Done,
            "Failed" => Seen::Failed(format!(
                "snapshot/{name} Failed: {}",
                status["lastError"]["message"].as_str().unwrap_or("")
            )),
            phase => Seen::Waiting(format!("phase {phase}")),
        }
    })
    .await?;
    spinner.finish();
    let snap = ctx.client.get::<nexus_api::SnapshotSpec>(&ctx.project, name).await.map_err(|e| Failure::api(&e))?;
    let status = snap.status_or_default();
    let size = status.size_bytes.map(render::bytes).unwrap_or_default();
    println!("snapshot/{name} Ready: {size} on node {}", status.node_name.unwrap_or_default());
    Ok(())
}

/// `restore SNAPSHOT NEW_VM [--paused] [--wait]`: writes a VM restored
/// from the snapshot.
pub async fn restore(
    ctx: &Context,
    snapshot: &str,
    new_vm: &str,
    paused: bool,
    wait: Option<Duration>,
) -> Result<(), Failure> {
    let spec = nexus_api::VmSpec {
        restore_from: Some(nexus_api::vm::RestoreSource { snapshot: snapshot.to_string() }),
        state: if paused { nexus_api::PowerState::Paused } else { nexus_api::PowerState::Running },
        ..Default::default()
    };
    let obj = nexus_api::Object::new(new_vm, Some(&ctx.project), spec);
    ctx.client.create(&obj).await.map_err(|e| Failure::api(&e))?;
    println!("vm/{new_vm} created from snapshot/{snapshot}");
    let Some(timeout) = wait else { return Ok(()) };
    let want = if paused { "Paused" } else { "Running" };
    let cond = WaitFor::parse(&format!("jsonpath={{.status.phase}}={want}")).map_err(Failure::error)?;
    self::wait(ctx, "vm", new_vm, &cond, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_conditions_parse_and_check() {
        let ready = WaitFor::parse("condition=Ready").unwrap();
        let obj = json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "reason": "Running"}]}});
        assert!(ready.check(Some(&obj)).0);
        assert!(!WaitFor::parse("condition=Ready=False").unwrap().check(Some(&obj)).0);
        assert!(WaitFor::parse("jsonpath={.status.phase}=Running").unwrap().check(Some(&obj)).0);
        assert!(!WaitFor::parse("jsonpath='{.status.phase}=Paused'").unwrap().check(Some(&obj)).0);
        assert!(WaitFor::parse("delete").unwrap().check(None).0);
        assert!(WaitFor::parse("ready").is_err());
    }
}
