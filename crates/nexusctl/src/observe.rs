//! `logs` and `top`: what a VM prints and what it uses, read through the
//! apiserver from the VM's node agent.

use std::io::Write;

use futures::StreamExt;
use nexus_api::agent::{NodeStats, VmStats};
use serde_json::Value;

use crate::context::{Context, Failure, urlencode};
use crate::render;

/// Options of `logs`.
#[derive(Debug, Default)]
pub struct LogOptions<'a> {
    pub follow: bool,
    pub tail: Option<usize>,
    /// The VMM's own log instead of the guest console.
    pub vmm: bool,
    pub since: Option<&'a str>,
}

/// The path of VM `name`'s log with `o`'s query.
pub fn log_path(project: &str, name: &str, o: &LogOptions) -> String {
    let mut path = format!(
        "/v1/projects/{}/vms/{}/log?source={}",
        urlencode(project),
        urlencode(name),
        if o.vmm { "vmm" } else { "console" }
    );
    if let Some(n) = o.tail {
        path.push_str(&format!("&tail={n}"));
    }
    if o.follow {
        path.push_str("&follow=true");
    }
    if let Some(s) = o.since {
        path.push_str(&format!("&since={}", urlencode(s)));
    }
    path
}

/// Prints VM `name`'s log; with `follow`, as it grows, until the VM is
/// deleted (exit 0) or the connection breaks (exit 1).
pub async fn logs(ctx: &Context, kind: &str, name: &str, o: &LogOptions<'_>) -> Result<(), Failure> {
    if crate::kinds::resolve(kind).map_err(Failure::usage)?.kind != <nexus_api::VmSpec as nexus_api::ResourceSpec>::KIND
    {
        return Err(Failure::usage(format!("only VMs have logs, not {kind}")));
    }
    let body = ctx
        .client
        .get_stream(&log_path(&ctx.project, name, o))
        .await
        .map_err(|e| Failure::error(render::client_error(&e)))?;
    let mut body = std::pin::pin!(body);
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Failure::error(format!("the log stream broke: {}", render::client_error(&e))))?;
        out.write_all(&chunk).and_then(|()| out.flush()).map_err(|e| Failure::error(format!("stdout: {e}")))?;
    }
    Ok(())
}

/// One VM's row in `top vms`.
#[derive(Debug, Clone)]
pub struct VmUsage {
    pub project: String,
    pub name: String,
    pub node: String,
    /// `None`: the node has no sample of it (not running, or just started).
    pub stats: Option<VmStats>,
}

/// One node's row in `top nodes`.
#[derive(Debug, Clone)]
pub struct NodeUsage {
    pub name: String,
    pub stats: Option<NodeStats>,
}

fn rate(stats: &VmStats, key: &str) -> f64 {
    stats.rates_per_second.get(key).copied().unwrap_or(0.0)
}

fn per_second(n: f64) -> String {
    format!("{}/s", render::bytes(n.max(0.0).round() as u64))
}

fn percent(p: Option<f64>) -> String {
    p.map(|p| format!("{p:.1}%")).unwrap_or_else(|| "-".into())
}

/// The `top vms` table: CPU (percent of one CPU), resident memory of the
/// VMM, disk and network throughput over the node's last sample.
pub fn vms_table(rows: &[VmUsage], all_projects: bool) -> String {
    let mut table = Vec::new();
    let mut header = vec!["NAME", "NODE", "CPU", "MEMORY", "DISK-READ", "DISK-WRITE", "NET-RX", "NET-TX"];
    if all_projects {
        header.insert(0, "PROJECT");
    }
    table.push(header.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for r in rows {
        let mut row = Vec::new();
        if all_projects {
            row.push(r.project.clone());
        }
        row.push(r.name.clone());
        row.push(if r.node.is_empty() { "<none>".into() } else { r.node.clone() });
        match &r.stats {
            Some(s) => {
                row.push(percent(s.cpu_percent));
                row.push(render::bytes(s.rss_bytes));
                row.push(per_second(rate(s, "block_read_bytes")));
                row.push(per_second(rate(s, "block_write_bytes")));
                row.push(per_second(rate(s, "net_rx_bytes")));
                row.push(per_second(rate(s, "net_tx_bytes")));
            }
            None => row.extend(std::iter::repeat_n("-".to_string(), 6)),
        }
        table.push(row);
    }
    render::columns(&table)
}

/// The `top vms --drives` table: each drive of each running VM, with what
/// its VMM counted of it.
pub fn drives_table(rows: &[VmUsage], all_projects: bool) -> String {
    let mut table = Vec::new();
    let mut header = vec!["NAME", "DRIVE", "READ", "WRITTEN", "READ-OPS", "WRITE-OPS", "THROTTLED"];
    if all_projects {
        header.insert(0, "PROJECT");
    }
    table.push(header.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for r in rows {
        let Some(s) = &r.stats else { continue };
        for (drive, c) in &s.drives {
            let n = |k: &str| c.get(k).copied().unwrap_or(0.0);
            let mut row = Vec::new();
            if all_projects {
                row.push(r.project.clone());
            }
            row.push(r.name.clone());
            row.push(drive.clone());
            row.push(render::bytes(n("read_bytes") as u64));
            row.push(render::bytes(n("write_bytes") as u64));
            row.push(format!("{}", n("read_ops") as u64));
            row.push(format!("{}", n("write_ops") as u64));
            row.push(format!("{}", n("throttled") as u64));
            table.push(row);
        }
    }
    render::columns(&table)
}

/// The `top nodes` table: the host's CPU and memory, and what its VMs hold.
pub fn nodes_table(rows: &[NodeUsage]) -> String {
    let mut table = vec![
        ["NAME", "CPU", "MEMORY", "MEMORY%", "VMS", "VM-MEMORY"].iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    ];
    for r in rows {
        let mut row = vec![r.name.clone()];
        match &r.stats {
            Some(s) => {
                let used = s.memory_total_bytes.saturating_sub(s.memory_available_bytes);
                row.push(percent(s.cpu_percent));
                row.push(render::bytes(used));
                row.push(if s.memory_total_bytes > 0 {
                    format!("{:.0}%", used as f64 / s.memory_total_bytes as f64 * 100.0)
                } else {
                    "-".into()
                });
                row.push(s.vms.len().to_string());
                row.push(render::bytes(s.vm_rss_bytes));
            }
            None => row.extend(std::iter::repeat_n("<unknown>".to_string(), 5)),
        }
        table.push(row);
    }
    render::columns(&table)
}

/// `top vms`: every VM of the project (or all), with its node's latest sample.
pub async fn top_vms(ctx: &Context, all_projects: bool, drives: bool) -> Result<(), Failure> {
    let path = if all_projects { "/v1/vms".to_string() } else { format!("/v1/projects/{}/vms", ctx.project) };
    let list: Value = ctx
        .client
        .raw(reqwest::Method::GET, &path, None)
        .await
        .map_err(|e| Failure::error(render::client_error(&e)))?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let reads = items.iter().map(|vm| async move {
        let project = vm["metadata"]["project"].as_str().unwrap_or_default().to_string();
        let name = vm["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let node = vm["status"]["nodeName"].as_str().unwrap_or_default().to_string();
        let running = matches!(vm["status"]["phase"].as_str(), Some("Running" | "Paused"));
        let stats = if running {
            let path = format!("/v1/projects/{}/vms/{}/metrics", urlencode(&project), urlencode(&name));
            ctx.client.raw::<VmStats>(reqwest::Method::GET, &path, None).await.ok()
        } else {
            None
        };
        VmUsage { project, name, node, stats }
    });
    let rows = futures::future::join_all(reads).await;
    if rows.is_empty() {
        eprintln!("No VMs found.");
        return Ok(());
    }
    if drives {
        print!("{}", drives_table(&rows, all_projects));
    } else {
        print!("{}", vms_table(&rows, all_projects));
    }
    Ok(())
}

/// `top nodes`: every node's latest sample.
pub async fn top_nodes(ctx: &Context) -> Result<(), Failure> {
    let list: Value = ctx
        .client
        .raw(reqwest::Method::GET, "/v1/nodes", None)
        .await
        .map_err(|e| Failure::error(render::client_error(&e)))?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let reads = items.iter().map(|node| async move {
        let name = node["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let path = format!("/v1/nodes/{}/metrics", urlencode(&name));
        let stats = ctx.client.raw::<NodeStats>(reqwest::Method::GET, &path, None).await.ok();
        NodeUsage { name, stats }
    });
    let rows = futures::future::join_all(reads).await;
    if rows.is_empty() {
        eprintln!("No nodes found.");
        return Ok(());
    }
    print!("{}", nodes_table(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn stats(cpu: Option<f64>, rss: u64, rates: &[(&str, f64)]) -> VmStats {
        VmStats {
            uid: "u".into(),
            at: "2026-12-01T10:00:00Z".parse().unwrap(),
            counters: BTreeMap::new(),
            rates_per_second: rates.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            cpu_seconds: 1.0,
            cpu_percent: cpu,
            rss_bytes: rss,
            ..Default::default()
        }
    }

    #[test]
    fn top_vms() {
        let rows = vec![
            VmUsage {
                project: "ci".into(),
                name: "build-1".into(),
                node: "node-a".into(),
                stats: Some(stats(
                    Some(12.345),
                    (140 << 20) + (300 << 10),
                    &[("block_read_bytes", 4096.0 * 300.0), ("block_write_bytes", 0.0), ("net_rx_bytes", 1500.0)],
                )),
            },
            VmUsage {
                project: "ci".into(),
                name: "build-2".into(),
                node: "node-b".into(),
                stats: Some(stats(None, 3 << 30, &[("net_tx_bytes", 12.5 * 1048576.0)])),
            },
            VmUsage { project: "web".into(), name: "stopped".into(), node: String::new(), stats: None },
        ];
        insta::assert_snapshot!(vms_table(&rows, false));
        insta::assert_snapshot!("top_vms_all_projects", vms_table(&rows, true));
    }

    #[test]
    fn top_vms_drives() {
        let counters = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mut s = stats(Some(3.0), 128 << 20, &[]);
        s.drives = BTreeMap::from([
            (
                "rootfs".to_string(),
                counters(&[("read_bytes", 12.0 * 1048576.0), ("write_bytes", 1.5 * 1048576.0), ("read_ops", 3072.0)]),
            ),
            ("scratch".to_string(), counters(&[("write_bytes", 98304.0), ("write_ops", 192.0), ("throttled", 12.0)])),
        ]);
        let rows = vec![
            VmUsage { project: "ci".into(), name: "runner-1".into(), node: "node-a".into(), stats: Some(s) },
            VmUsage { project: "ci".into(), name: "stopped".into(), node: String::new(), stats: None },
        ];
        insta::assert_snapshot!(drives_table(&rows, false));
    }

    #[test]
    fn top_nodes() {
        let rows = vec![
            NodeUsage {
                name: "node-a".into(),
                stats: Some(NodeStats {
                    at: "2026-12-01T10:00:00Z".parse().unwrap(),
                    cpu_percent: Some(37.5),
                    cpus: 2,
                    memory_total_bytes: 24 << 30,
                    memory_available_bytes: 18 << 30,
                    vm_rss_bytes: 512 << 20,
                    vms: vec![stats(Some(1.0), 256 << 20, &[]), stats(Some(2.0), 256 << 20, &[])],
                }),
            },
            NodeUsage { name: "node-b".into(), stats: None },
        ];
        insta::assert_snapshot!(nodes_table(&rows));
    }

    #[test]
    fn log_paths_carry_the_kubectl_options() {
        let o = LogOptions { follow: true, tail: Some(20), vmm: true, since: Some("5m") };
        assert_eq!(log_path("p", "vm-1", &o), "/v1/projects/p/vms/vm-1/log?source=vmm&tail=20&follow=true&since=5m");
        assert_eq!(log_path("p", "a", &LogOptions::default()), "/v1/projects/p/vms/a/log?source=console");
    }
}
