//! `token`, `audit` and `whoami`: who may act, and what was done.

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets};
use nexus_api::auth::{AuditRecord, RotateRequest, TokenInfo, TokenRequest};

use crate::context::{Context, Failure};
use crate::render;

/// Parses a duration such as `90s`, `30m`, `12h`, `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a duration: write a number and s, m, h or d, such as 30m");
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    if secs == 0 {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// A point in time: RFC 3339, or a duration ago (`1h`).
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let d =
        parse_duration(text).map_err(|_| format!("{text:?} is neither a time (RFC 3339) nor a duration ago (1h)"))?;
    Ok(now - chrono::Duration::from_std(d).unwrap_or_default())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    t.lines().map(|l| l.strip_prefix(' ').unwrap_or(&l).trim_end().to_string()).collect::<Vec<_>>().join("\n")
}

fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map(|t| render::age(Some(&t.to_rfc3339()), now)).unwrap_or_else(|| "-".into())
}

/// The token table.
pub fn token_table(items: &[TokenInfo], now: DateTime<Utc>) -> String {
    let rows = items
        .iter()
        .map(|t| {
            let state = match (&t.revoked_at, &t.replaced_by, t.expires_at) {
                (Some(_), _, _) => "revoked".to_string(),
                (_, _, Some(e)) if e <= now => "expired".to_string(),
                (_, Some(by), _) => format!("rotated to {by}"),
                _ => "active".to_string(),
            };
            let expires = match t.expires_at {
                Some(e) if e > now => format!("in {}", render::age(Some(&now.to_rfc3339()), e)),
                Some(_) => "-".into(),
                None => "never".into(),
            };
            vec![
                t.id.clone(),
                t.subject.clone(),
                state,
                when(Some(t.created_at), now),
                expires,
                when(t.last_used_at, now),
                t.description.clone(),
            ]
        })
        .collect();
    table(&["ID", "SUBJECT", "STATE", "AGE", "EXPIRES", "LAST USED", "DESCRIPTION"], rows)
}

/// `token create`.
pub async fn create(
    ctx: &Context,
    subject: Option<&str>,
    description: &str,
    ttl: Option<&str>,
    output: &str,
) -> Result<(), Failure> {
    let ttl_seconds = ttl.map(parse_duration).transpose().map_err(Failure::usage)?.map(|d| d.as_secs());
    let req = TokenRequest { subject: subject.map(str::to_string), description: description.to_string(), ttl_seconds };
    let issued = ctx.client.create_token(&req).await.map_err(|e| Failure::error(render::client_error(&e)))?;
    match output {
        "token" => println!("{}", issued.token),
        "json" => println!("{}", serde_json::to_string_pretty(&issued).unwrap_or_default()),
        _ => {
            println!(
                "token/{} created for {}; it is shown only this once:\n{}",
                issued.info.id, issued.info.subject, issued.token
            );
        }
    }
    Ok(())
}

/// `token list`.
pub async fn list(ctx: &Context, subject: Option<&str>, output: &str) -> Result<(), Failure> {
    let list = ctx.client.list_tokens(subject).await.map_err(|e| Failure::error(render::client_error(&e)))?;
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&list.items).unwrap_or_default()),
        "yaml" => print!("{}", serde_saphyr::to_string(&list.items).unwrap_or_default()),
        _ if list.items.is_empty() => eprintln!("No tokens found."),
        _ => println!("{}", token_table(&list.items, Utc::now())),
    }
    Ok(())
}

/// `token revoke ID`.
pub async fn revoke(ctx: &Context, id: &str) -> Result<(), Failure> {
    let info = ctx.client.revoke_token(id).await.map_err(|e| Failure::error(render::client_error(&e)))?;
    println!("token/{} of {} revoked", info.id, info.subject);
    Ok(())
}

/// `token rotate ID`.
pub async fn rotate(ctx: &Context, id: &str, grace: Option<&str>, output: &str) -> Result<(), Failure> {
    let grace_seconds = grace.map(parse_duration).transpose().map_err(Failure::usage)?.map(|d| d.as_secs());
    let issued = ctx
        .client
        .rotate_token(id, &RotateRequest { grace_seconds })
        .await
        .map_err(|e| Failure::error(render::client_error(&e)))?;
    match output {
        "token" => println!("{}", issued.token),
        "json" => println!("{}", serde_json::to_string_pretty(&issued).unwrap_or_default()),
        _ => println!(
            "token/{id} rotated: token/{} replaces it (the old one works for {} more); shown only this once:\n{}",
            issued.info.id,
            grace.unwrap_or("5m"),
            issued.token
        ),
    }
    Ok(())
}

/// `whoami`.
pub async fn whoami(ctx: &Context) -> Result<(), Failure> {
    let me = ctx.client.whoami().await.map_err(|e| Failure::error(render::client_error(&e)))?;
    println!("{}", me.subject);
    let name = |roles: &[nexus_api::rbac::Role]| {
        roles.iter().map(|r| nexus_api::rbac::role_name(*r)).collect::<Vec<_>>().join(", ")
    };
    if !me.cluster.is_empty() {
        println!("  everywhere: {}", name(&me.cluster));
    }
    for (project, roles) in &me.projects {
        println!("  {project}: {}", name(roles));
    }
    Ok(())
}

/// What `audit` shows.
#[derive(Debug, Default)]
pub struct AuditOptions<'a> {
    pub kind: Option<&'a str>,
    pub name: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub result: Option<&'a str>,
    pub since: Option<&'a str>,
    pub all_projects: bool,
    pub output: &'a str,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// The audit records as CSV (a header line, then one line per record).
pub fn audit_csv(items: &[AuditRecord]) -> String {
    let mut out =
        String::from("at,actor,verb,kind,project,name,result,status,resourceVersion,requestId,changes,message\n");
    for r in items {
        let fields = [
            r.at.to_rfc3339(),
            r.actor.clone(),
            r.verb.clone(),
            r.kind.clone(),
            r.project.clone(),
            r.name.clone(),
            format!("{:?}", r.result).to_lowercase(),
            r.status_code.to_string(),
            r.resource_version.to_string(),
            r.request_id.clone(),
            r.changes.join("; "),
            r.message.clone(),
        ];
        out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

/// The audit table.
pub fn audit_table(items: &[AuditRecord]) -> String {
    let rows = items
        .iter()
        .map(|r| {
            let what = if r.changes.is_empty() { r.message.clone() } else { r.changes.join("; ") };
            vec![
                r.at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                r.actor.clone(),
                r.verb.clone(),
                format!("{}/{}", r.kind.to_lowercase(), r.name),
                format!("{:?} {}", r.result, r.status_code).to_lowercase(),
                what.chars().take(100).collect(),
            ]
        })
        .collect();
    table(&["TIME", "ACTOR", "VERB", "OBJECT", "RESULT", "WHAT"], rows)
}

/// `audit [KIND NAME]`: every record, following pages.
pub async fn audit(ctx: &Context, o: &AuditOptions<'_>) -> Result<(), Failure> {
    let mut query: Vec<(&str, String)> = Vec::new();
    if !o.all_projects {
        query.push(("project", ctx.project.clone()));
    }
    if let Some(k) = o.kind {
        let kind = crate::kinds::resolve(k).map_err(Failure::usage)?;
        query.push(("kind", kind.kind.to_string()));
        if !kind.namespaced {
            query.retain(|(k, _)| *k != "project");
        }
    }
    for (key, value) in [("name", o.name), ("actor", o.actor), ("result", o.result)] {
        if let Some(v) = value {
            query.push((key, v.to_string()));
        }
    }
    if let Some(s) = o.since {
        query.push(("since", parse_since(s, Utc::now()).map_err(Failure::usage)?.to_rfc3339()));
    }
    let mut items = Vec::new();
    loop {
        let page = ctx.client.audit(&query).await.map_err(|e| Failure::error(render::client_error(&e)))?;
        items.extend(page.items);
        match page.continue_token {
            Some(c) => {
                query.retain(|(k, _)| *k != "continue");
                query.push(("continue", c));
            }
            None => break,
        }
    }
    match o.output {
        "json" => println!("{}", serde_json::to_string_pretty(&items).unwrap_or_default()),
        "yaml" => print!("{}", serde_saphyr::to_string(&items).unwrap_or_default()),
        "csv" => print!("{}", audit_csv(&items)),
        _ if items.is_empty() => eprintln!("No audit records found."),
        _ => println!("{}", audit_table(&items)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_parse_as_people_write_them() {
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_duration("2d").unwrap().as_secs(), 172_800);
        assert!(parse_duration("soon").is_err() && parse_duration("0s").is_err() && parse_duration("5w").is_err());
        let now = Utc::now();
        assert_eq!(parse_since("1h", now).unwrap(), now - chrono::Duration::hours(1));
        assert!(parse_since("2026-12-01T10:00:00Z", now).is_ok());
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
