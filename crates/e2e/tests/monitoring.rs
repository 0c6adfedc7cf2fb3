//! The Grafana dashboard and the Prometheus alert rules in `docs/monitoring`
//! are valid: every query parses as PromQL, the rule file has the shape
//! Prometheus loads, the alerts the runbook names exist, and every metric
//! they use is one that nexus exports.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

fn monitoring(file: &str) -> String {
    std::fs::read_to_string(nexus_e2e::repo_root().join("docs/monitoring").join(file)).unwrap()
}

/// Every source file of the crates, concatenated: where metric names live.
fn sources() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = String::new();
    for krate in ["apiserver", "controller", "nodeagent"] {
        walk(&nexus_e2e::repo_root().join("crates").join(krate).join("src"), &mut out);
    }
    out
}

/// The metric names `expr` mentions (nexus's own and the HTTP ones).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("nexus_") || t.starts_with("http_"))
        .map(str::to_string)
        .collect()
}

/// Whether nexus exports `name` (a histogram's series by its base name;
/// the agent's per-VM counters by their suffix, as `vm_metrics` lists them).
fn exported(name: &str, sources: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
    if sources.contains(&format!("\"{base}\"")) {
        return true;
    }
    base.strip_prefix("nexus_vm_")
        .and_then(|rest| rest.strip_suffix("_total"))
        .is_some_and(|suffix| sources.contains(&format!("(\"{suffix}\"")))
}

fn check_promql(what: &str, expr: &str, sources: &str, problems: &mut Vec<String>) {
    if let Err(e) = promql_parser::parser::parse(expr) {
        problems.push(format!("{what}: {expr:?} does not parse: {e}"));
    }
    for name in metric_names(expr) {
        if !exported(&name, sources) {
            problems.push(format!("{what}: {name} is not a metric nexus exports"));
        }
    }
}

#[test]
fn the_alert_rules_parse_and_cover_what_the_runbook_names() {
    let sources = sources();
    let rules: Value = serde_saphyr::from_str(&monitoring("nexus-alerts.yaml")).unwrap();
    let mut problems = Vec::new();
    let mut alerts = BTreeSet::new();
    let groups = rules["groups"].as_array().expect("groups: a list");
    for group in groups {
        assert!(group["name"].as_str().is_some_and(|n| !n.is_empty()), "a group without a name");
        for rule in group["rules"].as_array().expect("rules: a list") {
            let name = rule["alert"].as_str().expect("every rule is an alert with a name").to_string();
            let expr = rule["expr"].as_str().expect("expr");
            check_promql(&name, expr, &sources, &mut problems);
            let keys: BTreeSet<&str> = rule.as_object().unwrap().keys().map(String::as_str).collect();
            let allowed: BTreeSet<&str> = ["alert", "expr", "for", "keep_firing_for", "labels", "annotations"].into();
            if !keys.is_subset(&allowed) {
                problems.push(format!("{name}: unknown keys {:?}", keys.difference(&allowed).collect::<Vec<_>>()));
            }
            let duration = rule["for"].as_str().unwrap_or_default();
            if !duration.is_empty() && promql_parser::util::parse_duration(duration).is_err() {
                problems.push(format!("{name}: for: {duration:?} is not a duration"));
            }
            if !matches!(rule["labels"]["severity"].as_str(), Some("warning" | "critical")) {
                problems.push(format!("{name}: labels.severity must be warning or critical"));
            }
            if rule["annotations"]["summary"].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{name}: no annotations.summary"));
            }
            if !alerts.insert(name.clone()) {
                problems.push(format!("{name}: defined twice"));
            }
        }
    }
    for required in ["NexusNodeNotReady", "NexusVMFailed", "NexusReconcileErrors", "NexusApiserverSlow"] {
        if !alerts.contains(required) {
            problems.push(format!("no alert {required}"));
        }
    }
    println!("{} alerts checked: {}", alerts.len(), alerts.iter().cloned().collect::<Vec<_>>().join(", "));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_dashboard_is_grafana_json_whose_queries_parse() {
    let sources = sources();
    let dash: Value = serde_json::from_str(&monitoring("nexus-dashboard.json")).unwrap();
    let mut problems = Vec::new();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "uid");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()), "title");
    assert!(dash["schemaVersion"].as_u64().is_some(), "schemaVersion");
    let variables: Vec<String> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("<untitled>");
        if !ids.insert(panel["id"].as_u64().expect("every panel has a numeric id")) {
            problems.push(format!("panel {title}: duplicate id"));
        }
        let grid = &panel["gridPos"];
        if ["x", "y", "w", "h"].iter().any(|k| grid[k].as_u64().is_none())
            || grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() > 24
        {
            problems.push(format!("panel {title}: gridPos must fit 24 columns"));
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            // Template variables, as Grafana fills them in.
            let mut filled = expr.to_string();
            for var in &variables {
                filled = filled.replace(&format!("${{{var}}}"), ".*").replace(&format!("${var}"), ".*");
            }
            if filled.contains('$') {
                problems.push(format!("panel {title}: {expr:?} uses an undefined variable"));
            }
            check_promql(&format!("panel {title}"), &filled, &sources, &mut problems);
            queries += 1;
        }
    }
    println!("{} panels, {queries} queries checked", ids.len());
    assert!(queries >= 10, "{queries} queries");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_refuses_what_is_wrong() {
    let sources = sources();
    let mut problems = Vec::new();
    check_promql("bad", "sum(rate(nexus_vms[5m]", &sources, &mut problems);
    check_promql("unknown", "nexus_no_such_metric > 0", &sources, &mut problems);
    check_promql("good", "max(nexus_vm_block_read_bytes_total) > 0", &sources, &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");
}
