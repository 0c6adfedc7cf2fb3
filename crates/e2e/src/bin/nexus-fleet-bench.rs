//! `nexus-fleet-bench`: one apiserver (SQLite), one controller and N node
//! agents, each agent in its own network namespace on the simulated VMM.
//! Applies V VMs at once and measures apply → Running for the fleet and per
//! VM, the spread, each process's RSS, then deletes every VM and measures
//! the teardown and what is left. Prints a table and JSON. Needs root.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use nexus_api::client::ListParams;
use nexus_api::meta::find_condition;
use nexus_api::{ConditionStatus, VmPhase, VmSpec};
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::percentile as pct;

struct Args {
    vms: usize,
    agents: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { vms: 1000, agents: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--vms" => args.vms = value()?.parse()?,
            "--agents" => args.agents = value()?.parse()?,
            "--help" | "-h" => {
                println!("nexus-fleet-bench [--vms 1000] [--agents 10]   (as root)");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}; see --help"),
        }
    }
    anyhow::ensure!(args.vms > 0 && (1..=50).contains(&args.agents), "--vms > 0 and --agents 1..=50");
    Ok(args)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn nexusctl(fleet: &MultiNode, args: &[&str]) -> anyhow::Result<()> {
    let (ok, _, err) = fleet.nexusctl(args);
    anyhow::ensure!(ok, "nexusctl {args:?}: {err}");
    Ok(())
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("nexus-fleet-bench").tempdir_in("/var/tmp")?;
    // Under the agents' default image root, where `hack/images.sh` puts them.
    nexus_e2e::ensure_example_images();
    let (kernel, rootfs) = ("/var/lib/nexus/images/vmlinux", "/var/lib/nexus/images/rootfs.ext4");
    let max_vms = (args.vms.div_ceil(args.agents) + 10) as u32;
    let sim = nexus_e2e::bin("firecracker-sim");
    let mut fleet = MultiNode::start_for_bench(&dir.path().join("fleet"), args.agents, max_vms, &sim).await;
    let client = fleet.client();
    let yaml: Vec<String> = (0..args.vms)
        .map(|i| {
            format!(
                "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: bench-{i:04}\n  labels:\n    bench: \"yes\"\nspec:\n  \
                 vcpu: 1\n  memMib: 128\n  kernel: {kernel}\n  rootfs: {rootfs}\n"
            )
        })
        .collect();
    let file = dir.path().join("vms.yaml");
    std::fs::write(&file, yaml.join("---\n"))?;

    eprintln!("applying {} VMs to {} agents ...", args.vms, args.agents);
    let started = Instant::now();
    nexusctl(&fleet, &["apply", "-f", &file.display().to_string()])?;
    let applied = started.elapsed();
    let params = ListParams { label_selector: Some("bench=yes".into()), ..Default::default() };
    let deadline = Instant::now() + Duration::from_secs(1800);
    let vms = loop {
        let vms = client.list::<VmSpec>(Some("default"), &params).await?.items;
        let ready = vms
            .iter()
            .filter(|v| {
                let s = v.status_or_default();
                s.phase == VmPhase::Running
                    && find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
            })
            .count();
        if ready == args.vms {
            break vms;
        }
        if let Some(failed) = vms.iter().find(|v| v.status_or_default().phase == VmPhase::Failed) {
            let why = find_condition(&failed.status_or_default().conditions, "Ready").map(|c| c.message.clone());
            anyhow::bail!("VM {} failed: {}", failed.name(), why.unwrap_or_default());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {ready} of {} VMs Running after 30 min", args.vms);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let all_running = started.elapsed();

    let mut per_vm: Vec<f64> = vms
        .iter()
        .filter_map(|v| {
            let created = v.metadata.creation_timestamp?;
            let ready = find_condition(&v.status.as_ref()?.conditions, "Ready")?.last_transition_time;
            Some((ready - created).num_milliseconds() as f64)
        })
        .collect();
    per_vm.sort_by(f64::total_cmp);
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for v in &vms {
        *per_node.entry(v.spec.node_name.clone().unwrap_or_default()).or_default() += 1;
    }
    let (spread_min, spread_max) =
        (per_node.values().min().copied().unwrap_or(0), per_node.values().max().copied().unwrap_or(0));

    let apiserver_rss = rss_kib(fleet.apiserver.pid());
    let controller_rss = rss_kib(fleet.controller.pid());
    let agent_rss: Vec<u64> = fleet.agents.iter().map(|a| rss_kib(a.pid())).collect();
    let sims: Vec<u64> = (1..=args.agents)
        .flat_map(|i| nexus_e2e::host::vmm_processes_under(&fleet.dir.join(format!("run-{i}"))))
        .map(|(pid, _)| rss_kib(pid))
        .collect();
    let mean = |v: &[u64]| if v.is_empty() { 0 } else { v.iter().sum::<u64>() / v.len() as u64 };

    eprintln!("deleting every VM ...");
    let deleting = Instant::now();
    nexusctl(&fleet, &["delete", "vm", "-l", "bench=yes", "--wait", "--timeout", "1800"])?;
    let deleted = deleting.elapsed();
    let leftovers = (fleet.vmms(), fleet.taps(), fleet.run_dirs());
    let rows_left = client.list::<VmSpec>(None, &ListParams::default()).await?.items.len();
    fleet.stop();

    println!("{:<44} {:>12}", "measure", "value");
    let line = |k: &str, v: String| println!("{k:<44} {v:>12}");
    line("VMs / agents", format!("{} / {}", args.vms, args.agents));
    line("apply (nexusctl, all objects stored) ms", applied.as_millis().to_string());
    line("apply -> all Running ms", all_running.as_millis().to_string());
    line("VMs Running per second", format!("{:.1}", args.vms as f64 / all_running.as_secs_f64()));
    line("per VM created -> Ready p50 ms", format!("{:.0}", pct(&per_vm, 0.50)));
    line("per VM created -> Ready p95 ms", format!("{:.0}", pct(&per_vm, 0.95)));
    line("per VM created -> Ready p99 ms", format!("{:.0}", pct(&per_vm, 0.99)));
    line("per VM created -> Ready max ms", format!("{:.0}", per_vm.last().copied().unwrap_or(0.0)));
    line("VMs per node min / max", format!("{spread_min} / {spread_max}"));
    line("RSS apiserver KiB", apiserver_rss.to_string());
    line("RSS controller KiB", controller_rss.to_string());
    line("RSS agent mean / max KiB", format!("{} / {}", mean(&agent_rss), agent_rss.iter().max().unwrap_or(&0)));
    line("RSS simulated VMM mean KiB", mean(&sims).to_string());
    line("delete all (--wait) ms", deleted.as_millis().to_string());
    line(
        "left: VMMs / TAPs / dirs / VM rows",
        format!("{} / {} / {} / {rows_left}", leftovers.0, leftovers.1, leftovers.2),
    );
    let json = serde_json::json!({
        "vms": args.vms, "agents": args.agents,
        "applyMs": applied.as_millis() as u64,
        "allRunningMs": all_running.as_millis() as u64,
        "perVmReadyMs": {"p50": pct(&per_vm, 0.5), "p95": pct(&per_vm, 0.95), "p99": pct(&per_vm, 0.99),
                         "max": per_vm.last().copied().unwrap_or(0.0)},
        "perNode": per_node,
        "rssKiB": {"apiserver": apiserver_rss, "controller": controller_rss, "agents": agent_rss,
                   "vmmMean": mean(&sims)},
        "deleteAllMs": deleted.as_millis() as u64,
        "left": {"vmms": leftovers.0, "taps": leftovers.1, "dirs": leftovers.2, "vmRows": rows_left},
    });
    println!("{json}");
    anyhow::ensure!(
        leftovers == (0, 0, 0) && rows_left == 0,
        "something was left behind: {leftovers:?}, {rows_left} rows"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    anyhow::ensure!(nexus_e2e::is_root(), "nexus-fleet-bench needs root (network namespaces, bridges, TAPs)");
    // Every thread the runtime starts inherits this private namespace.
    nexus_e2e::enter_private_netns();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(bench(args))
}
