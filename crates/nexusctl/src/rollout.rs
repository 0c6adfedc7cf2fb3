//! `scale` and `rollout`: a pool's size, and its rollouts (status,
//! history, pause, resume, undo), kubectl's way.

use std::time::Duration;

use nexus_api::pool::{PoolRevision, RolloutPhase, VmPool};
use nexus_api::{Object, ResourceSpec, VmPoolSpec};
use serde_json::Value;

use crate::context::{Context, Failure};
use crate::follow::{self, Seen};
use crate::kinds;
use crate::render;

/// Checks that `kind` names VMPools (the only kind with replicas and rollouts).
pub fn pool_kind(kind: &str, what: &str) -> Result<(), Failure> {
    let k = kinds::resolve(kind).map_err(Failure::usage)?;
    if k.kind != VmPoolSpec::KIND {
        return Err(Failure::usage(format!("only VMPools have {what}, not {}", k.plural)));
    }
    Ok(())
}

async fn get(ctx: &Context, name: &str) -> Result<VmPool, Failure> {
    ctx.client.get::<VmPoolSpec>(&ctx.project, name).await.map_err(|e| Failure::api(&e))
}

/// Reads pool `name`, changes it with `edit` and writes it back, again on
/// a conflict. `edit` returns false when there is nothing to change.
async fn update(
    ctx: &Context,
    name: &str,
    mut edit: impl FnMut(&mut VmPool) -> Result<bool, Failure>,
) -> Result<bool, Failure> {
    for _ in 0..5 {
        let mut pool = get(ctx, name).await?;
        if !edit(&mut pool)? {
            return Ok(false);
        }
        match ctx.client.replace(&pool).await {
            Ok(_) => return Ok(true),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(Failure::api(&e)),
        }
    }
    Err(Failure::error(format!("vmpool/{name} kept changing while it was updated; try again")))
}

/// `scale vmpool NAME --replicas N`.
pub async fn scale(ctx: &Context, name: &str, replicas: u32) -> Result<(), Failure> {
    let changed = update(ctx, name, |p| {
        let changed = p.spec.replicas != replicas;
        p.spec.replicas = replicas;
        Ok(changed)
    })
    .await?;
    println!("vmpool/{name} {}", if changed { "scaled" } else { "unchanged" });
    Ok(())
}

/// `rollout pause` and `rollout resume`.
pub async fn set_paused(ctx: &Context, name: &str, paused: bool) -> Result<(), Failure> {
    let changed = update(ctx, name, |p| {
        let changed = p.spec.paused != paused;
        p.spec.paused = paused;
        Ok(changed)
    })
    .await?;
    let done = match (paused, changed) {
        (true, true) => "paused",
        (false, true) => "resumed",
        (true, false) => "is already paused",
        (false, false) => "is not paused",
    };
    println!("vmpool/{name} {done}");
    Ok(())
}

/// `rollout undo [--to-revision N]`: the pool's template becomes that of
/// revision N (default: the one before the current template's), which
/// rolls out as a new revision.
pub async fn undo(ctx: &Context, name: &str, to: Option<u64>) -> Result<(), Failure> {
    let mut target = 0;
    let changed = update(ctx, name, |p| {
        let status = p.status_or_default();
        let update = status.update_revision.unwrap_or(0);
        let numbers: Vec<String> = status.revisions.iter().map(|r| r.revision.to_string()).collect();
        let revision =
            match to {
                Some(n) => status.revision(n).ok_or_else(|| {
                    Failure::error(format!(
                        "vmpool/{name} has no revision {n}; it has {} (`nexusctl rollout history vmpool {name}`)",
                        numbers.join(", ")
                    ))
                })?,
                None => status.revisions.iter().filter(|r| r.revision < update).max_by_key(|r| r.revision).ok_or_else(
                    || Failure::error(format!("vmpool/{name} has no revision before {update} to go back to")),
                )?,
            };
        target = revision.revision;
        let changed = p.spec.template != revision.template;
        p.spec.template = revision.template.clone();
        Ok(changed)
    })
    .await?;
    let revision = target;
    if changed {
        println!("vmpool/{name} rolled back to the template of revision {revision}");
    } else {
        println!("vmpool/{name} already has the template of revision {revision}");
    }
    Ok(())
}

/// `rollout history [--revision N]`.
pub async fn history(ctx: &Context, name: &str, revision: Option<u64>) -> Result<(), Failure> {
    let pool = get(ctx, name).await?;
    let status = pool.status_or_default();
    if let Some(n) = revision {
        let r = status.revision(n).ok_or_else(|| Failure::error(format!("vmpool/{name} has no revision {n}")))?;
        let template = serde_json::to_value(&r.template).unwrap_or_default();
        print!("{}", serde_saphyr::to_string(&template).map_err(|e| Failure::error(e.to_string()))?);
        return Ok(());
    }
    let mut rows = vec![vec!["REVISION".to_string(), "HASH".into(), "CREATED".into(), "STATE".into(), "CHANGE".into()]];
    let now = chrono::Utc::now();
    let mut previous: Option<&PoolRevision> = None;
    for r in &status.revisions {
        let state = match (Some(r.revision) == status.current_revision, Some(r.revision) == status.update_revision) {
            (true, true) => "current",
            (true, false) => "current (rollout from)",
            (false, true) => "rolling out",
            (false, false) => "",
        };
        rows.push(vec![
            r.revision.to_string(),
            r.hash.clone(),
            format!("{} ago", render::age(Some(&r.created_at.to_rfc3339()), now)),
            state.to_string(),
            previous.map(|p| change(&p.template, &r.template)).unwrap_or_else(|| "<first>".into()),
        ]);
        previous = Some(r);
    }
    println!("vmpool/{name}");
    print!("{}", render::columns(&rows));
    Ok(())
}

/// The fields that differ between two templates, as `path: old -> new`.
fn change(old: &impl serde::Serialize, new: &impl serde::Serialize) -> String {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flatten("", &serde_json::to_value(old).unwrap_or_default(), &mut a);
    flatten("", &serde_json::to_value(new).unwrap_or_default(), &mut b);
    let get = |v: &[(String, String)], k: &str| v.iter().find(|(p, _)| p == k).map(|(_, x)| x.clone());
    let mut keys: Vec<String> = a.iter().chain(&b).map(|(k, _)| k.clone()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .iter()
        .filter_map(|k| {
            let (x, y) = (get(&a, k), get(&b, k));
            (x != y).then(|| {
                format!("{k}: {} -> {}", x.unwrap_or_else(|| "<none>".into()), y.unwrap_or_else(|| "<none>".into()))
            })
        })
        .collect();
    if diffs.is_empty() { "<none>".into() } else { diffs.join("; ") }
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&p, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// `rollout status`: the rollout at a glance, followed until it ends
/// (exit 0 when complete, 1 when it halted, rolled back or timed out)
/// unless `watch` is off.
pub async fn status(ctx: &Context, name: &str, watch: bool, timeout: Duration) -> Result<(), Failure> {
    let mut last = String::new();
    let bar =
        crate::progress::Progress::items(crate::progress::wanted(None) && watch, 0, "VMs up to date and available");
    let mut judge = |obj: Option<&serde_json::Value>| {
        let Some(pool) = obj.and_then(|o| serde_json::from_value::<Object<VmPoolSpec>>(o.clone()).ok()) else {
            return Seen::Failed(format!("vmpool/{name} not found"));
        };
        let s = pool.status_or_default();
        let current_generation = s.observed_generation == pool.metadata.generation;
        let rollout = s.rollout.clone().filter(|_| current_generation);
        let line = match &rollout {
            None => "waiting for the controller to look at the pool".to_string(),
            Some(r) => format!(
                "revision {} {:?}: {}; {} VMs, {} up to date, {} available of {}",
                r.revision,
                r.phase,
                r.message,
                s.replicas,
                s.updated_replicas,
                s.available_replicas,
                pool.spec.replicas
            ),
        };
        bar.set_length(u64::from(pool.spec.replicas));
        bar.set_position(u64::from(s.updated_replicas.min(s.available_replicas)));
        if line != last {
            bar.println(&format!("vmpool/{name}: {line}"));
            last = line;
        }
        let phase = rollout.as_ref().map(|r| r.phase);
        let complete = phase == Some(RolloutPhase::Complete) && s.available_replicas >= pool.spec.replicas;
        match phase {
            _ if complete => Seen::Done,
            Some(RolloutPhase::Halted | RolloutPhase::RolledBack) => {
                Seen::Failed(format!("vmpool/{name}: the rollout did not complete"))
            }
            _ if !watch => Seen::Done,
            _ => Seen::Waiting(last.clone()),
        }
    };
    let kind = kinds::resolve("vmpool").map_err(Failure::usage)?;
    let done = follow::until(ctx, kind, &ctx.project, name, timeout, &mut judge).await;
    bar.finish();
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_names_each_differing_field() {
        let a = serde_json::json!({"spec": {"kernel": "k1", "vcpu": 1}, "metadata": {"labels": {"app": "ci"}}});
        let b = serde_json::json!({"spec": {"kernel": "k2", "vcpu": 1}, "metadata": {"labels": {"app": "ci"}}});
        assert_eq!(change(&a, &b), "spec.kernel: k1 -> k2");
        assert_eq!(change(&a, &a), "<none>");
    }
}
