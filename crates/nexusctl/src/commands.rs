//! The subcommands.

use std::time::Duration;

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets};
use nexus_api::client::{Client, ClientError};
use nexus_api::{NodeSpec, Object, ResourceSpec, VmSpec};
use serde_json::{Value, json};

use crate::kinds::{self, KindInfo};
use crate::manifest::{self, Document};

/// What every command needs.
#[derive(Debug)]
pub struct Context {
    pub client: Client,
    pub project: String,
}

/// Formats an API error with its suggestion, never a debug dump.
fn api_error(e: ClientError) -> String {
    match e {
        ClientError::Api(body) => {
            let mut s = body.message.clone();
            if let Some(f) = &body.fault_message {
                s.push_str(&format!("\n  firecracker: {f}"));
            }
            if let Some(h) = &body.suggestion {
                s.push_str(&format!("\n  hint: {h}"));
            }
            s
        }
        ClientError::Transport { url, source } => {
            format!("cannot reach the apiserver at {url} ({source}); is it running? Set --server or NEXUS_SERVER")
        }
        other => other.to_string(),
    }
}

/// Deserializes a document as kind `S` (applying defaults) and serializes
/// it back; errors name the field.
fn normalize_as<S: ResourceSpec>(value: &Value) -> Result<Value, String> {
    let obj: Object<S> = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        format!("field {path}: {}", e.into_inner())
    })?;
    serde_json::to_value(obj).map_err(|e| e.to_string())
}

fn normalize(kind: &KindInfo, value: &Value) -> Result<Value, String> {
    match kind.kind {
        "VM" => normalize_as::<VmSpec>(value),
        "Node" => normalize_as::<NodeSpec>(value),
        other => Err(kinds::unknown(other)),
    }
}

/// Merges `patch` into `base`: objects recursively, anything else replaced.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// `apply -f`.
pub async fn apply(ctx: &Context, files: &[String]) -> Result<(), String> {
    let mut docs = Vec::new();
    for f in files {
        docs.extend(manifest::read(f)?);
    }
    let mut failed = 0;
    for doc in &docs {
        match apply_one(ctx, doc).await {
            Ok(line) => println!("{line}"),
            Err(e) => {
                failed += 1;
                eprintln!("error: {} (document {}): {e}", doc.source, doc.index);
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {} objects failed to apply", docs.len()));
    }
    Ok(())
}

async fn apply_one(ctx: &Context, doc: &Document) -> Result<String, String> {
    let kind_name = doc.value["kind"].as_str().ok_or("missing field `kind`")?;
    let kind = kinds::lookup(kind_name).ok_or_else(|| kinds::unknown(kind_name))?;
    let name = doc.value["metadata"]["name"].as_str().ok_or("missing field `metadata.name`")?.to_string();
    let mut desired = doc.value.clone();
    let project = if kind.namespaced {
        let p = desired["metadata"]["project"].as_str().unwrap_or(&ctx.project).to_string();
        desired["metadata"]["project"] = json!(p);
        p
    } else {
        String::new()
    };
    normalize(kind, &desired)?;
    let label = format!("{}/{name}", kind.kind.to_lowercase());
    for _attempt in 0..5 {
        let existing: Result<Value, ClientError> =
            ctx.client.raw(reqwest::Method::GET, &kind.object(&project, &name), None).await;
        let existing = match existing {
            Err(e) if e.is_not_found() => {
                let created: Result<Value, _> =
                    ctx.client.raw(reqwest::Method::POST, &kind.collection(&project), Some(&desired)).await;
                match created {
                    Ok(_) => return Ok(format!("{label} created")),
                    // Someone created it meanwhile: apply onto theirs.
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(api_error(e)),
                }
            }
            Err(e) => return Err(api_error(e)),
            Ok(v) => v,
        };
        let mut next = existing.clone();
        merge(&mut next["spec"], &desired["spec"]);
        for field in ["labels", "annotations"] {
            match desired["metadata"].get(field) {
                Some(v) => next["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = next["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        let next = normalize(kind, &next)?;
        if normalize(kind, &existing)? == next {
            return Ok(format!("{label} unchanged"));
        }
        let updated: Result<Value, _> =
            ctx.client.raw(reqwest::Method::PUT, &kind.object(&project, &name), Some(&next)).await;
        match updated {
            Ok(_) => return Ok(format!("{label} configured")),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(api_error(e)),
        }
    }
    Err(format!("{label} kept changing under us; try again"))
}

/// `get KIND [NAME]`.
pub async fn get(ctx: &Context, kind: &str, name: Option<&str>, output: Option<&str>, all: bool) -> Result<(), String> {
    let kind = kinds::lookup(kind).ok_or_else(|| kinds::unknown(kind))?;
    let items: Vec<Value> = match name {
        Some(n) => {
            vec![ctx.client.raw(reqwest::Method::GET, &kind.object(&ctx.project, n), None).await.map_err(api_error)?]
        }
        None => {
            let path = if all { kind.all_projects() } else { kind.collection(&ctx.project) };
            let list: Value = ctx.client.raw(reqwest::Method::GET, &path, None).await.map_err(api_error)?;
            list["items"].as_array().cloned().unwrap_or_default()
        }
    };
    let single = name.is_some();
    match output.unwrap_or("table") {
        "json" => {
            let v = if single {
                items[0].clone()
            } else {
                json!({"apiVersion": nexus_api::API_VERSION, "kind": "List", "items": items})
            };
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        "yaml" => {
            let v = if single {
                items[0].clone()
            } else {
                json!({"apiVersion": nexus_api::API_VERSION, "kind": "List", "items": items})
            };
            print!("{}", serde_saphyr::to_string(&v).map_err(|e| e.to_string())?);
        }
        "name" => {
            for item in &items {
                println!("{}/{}", kind.kind.to_lowercase(), item["metadata"]["name"].as_str().unwrap_or(""));
            }
        }
        "table" | "wide" => {
            if items.is_empty() {
                let scope =
                    if all || !kind.namespaced { String::new() } else { format!(" in project {}", ctx.project) };
                eprintln!("No {} found{scope}.", kind.plural);
                return Ok(());
            }
            println!("{}", table(kind, &items, all, output == Some("wide")));
        }
        other => return Err(format!("unknown output format {other:?}; use table, wide, yaml, json or name")),
    }
    Ok(())
}

fn age(v: &Value) -> String {
    let Some(ts) = v["metadata"]["creationTimestamp"].as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok()) else {
        return "<unknown>".into();
    };
    let secs = (Utc::now() - ts).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".into(),
        other => other.to_string(),
    }
}

fn table(kind: &KindInfo, items: &[Value], all: bool, wide: bool) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    let mut header: Vec<&str> = Vec::new();
    if all && kind.namespaced {
        header.push("PROJECT");
    }
    match kind.kind {
        "VM" => {
            header.extend(["NAME", "STATE", "PHASE", "NODE", "VCPU", "MEMORY", "AGE"]);
            if wide {
                header.extend(["TAP", "MAC", "PID"]);
            }
        }
        _ => header.extend(["NAME", "READY", "ADDRESS", "AGE"]),
    }
    t.set_header(header);
    for item in items {
        let mut row: Vec<String> = Vec::new();
        if all && kind.namespaced {
            row.push(s(&item["metadata"]["project"]));
        }
        row.push(s(&item["metadata"]["name"]));
        match kind.kind {
            "VM" => {
                row.push(s(&item["spec"]["state"]));
                row.push(item["status"]["phase"].as_str().unwrap_or("Pending").to_string());
                row.push(s(&item["spec"]["nodeName"]));
                row.push(s(&item["spec"]["vcpu"]));
                row.push(format!("{}Mi", s(&item["spec"]["memMib"])));
                row.push(age(item));
                if wide {
                    let rt = &item["status"]["runtime"];
                    row.extend([s(&rt["tapName"]), s(&rt["mac"]), s(&rt["pid"])]);
                }
            }
            _ => {
                let ready = item["status"]["conditions"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                    .map(|c| s(&c["status"]))
                    .unwrap_or_else(|| "Unknown".into());
                row.push(ready);
                row.push(s(&item["status"]["address"]));
                row.push(age(item));
            }
        }
        t.add_row(row);
    }
    t
}

/// `delete KIND NAME`.
pub async fn delete(ctx: &Context, kind: &str, name: &str, wait: bool) -> Result<(), String> {
    let kind = kinds::lookup(kind).ok_or_else(|| kinds::unknown(kind))?;
    let path = kind.object(&ctx.project, name);
    let _: Value = ctx.client.raw(reqwest::Method::DELETE, &path, None).await.map_err(api_error)?;
    println!("{} \"{name}\" deleted", kind.kind.to_lowercase());
    if wait {
        loop {
            let got: Result<Value, ClientError> = ctx.client.raw(reqwest::Method::GET, &path, None).await;
            match got {
                Err(e) if e.is_not_found() => break,
                Err(e) => return Err(api_error(e)),
                Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}

/// `version`: the client's version, then the server's.
pub async fn version(ctx: &Context) -> Result<(), String> {
    println!("Client Version: {}", env!("CARGO_PKG_VERSION"));
    let server = ctx.client.version().await.map_err(api_error)?;
    println!("Server Version: {}", server["version"].as_str().unwrap_or("unknown"));
    Ok(())
}
