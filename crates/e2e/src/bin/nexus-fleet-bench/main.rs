//! `nexus-fleet-bench`: one apiserver (SQLite), one controller and N node
//! agents, each agent in its own network namespace on the simulated VMM.
//! Applies V VMs at once and measures apply → Running for the fleet and per
//! VM, the spread, each process's RSS, then deletes every VM and measures
//! the teardown, how long VMs created meanwhile take to run, and what is
//! left; first, what the machine charges for a thread's wake-up and a
//! `cpuid` ([`host_costs`]). Prints a table and JSON. Needs root.

mod host_costs;
mod steps;
mod usage;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use nexus_api::meta::find_condition;
use nexus_api::{ConditionStatus, VmPhase, VmSpec};
use nexus_client::{Event, ListParams};
use nexus_e2e::multinode::MultiNode;
use nexus_e2e::percentile as pct;
use usage::{HostCpu, Usage, cpu_ms, cpu_us_precise, dynamically_linked, host_cpu, libc_of, rss_kib};

struct Args {
    vms: usize,
    agents: usize,
    /// Where the fleet's data and run directories go.
    dir: std::path::PathBuf,
    /// How long to watch the Running fleet before deleting it, measuring
    /// what it costs while nothing changes (0: not measured).
    idle_secs: u64,
    /// How often each simulated guest prints a console line (0: quiet
    /// after its boot, as an idle guest is).
    console_secs: u64,
    /// Each VM's memory. Every agent offers the whole host's memory, so
    /// this bounds the VMs per node (188 of 128 MiB on a 24 GiB host).
    mem_mib: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { vms: 1000, agents: 10, dir: "/var/tmp".into(), idle_secs: 0, console_secs: 0, mem_mib: 128 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--vms" => args.vms = value()?.parse()?,
            "--agents" => args.agents = value()?.parse()?,
            "--dir" => args.dir = value()?.into(),
            "--idle-secs" => args.idle_secs = value()?.parse()?,
            "--console-secs" => args.console_secs = value()?.parse()?,
            "--mem-mib" => args.mem_mib = value()?.parse()?,
            "--help" | "-h" => {
                println!(
                    "nexus-fleet-bench [--vms 1000] [--agents 10] [--dir /var/tmp] [--idle-secs 0] [--console-secs 0] [--mem-mib 128]   (as root)"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}; see --help"),
        }
    }
    anyhow::ensure!(args.vms > 0 && (1..=50).contains(&args.agents), "--vms > 0 and --agents 1..=50");
    anyhow::ensure!(args.mem_mib >= 1, "--mem-mib must be at least 1");
    Ok(args)
}

fn nexusctl(fleet: &MultiNode, args: &[&str]) -> anyhow::Result<()> {
    let (ok, _, err) = fleet.nexusctl(args);
    anyhow::ensure!(ok, "nexusctl {args:?}: {err}");
    Ok(())
}

/// `nexusctl delete vm -l bench=yes --wait`, timed from `started`: whether
/// it succeeded, its error output, when its last object was acknowledged
/// deleted (its last "deleted" line) and when it returned.
fn timed_delete(
    server: &str,
    ca: &std::path::Path,
    token: &str,
    started: Instant,
) -> anyhow::Result<(bool, String, Duration, Duration)> {
    use std::io::{BufRead, Read};
    let args = ["delete", "vm", "-l", "bench=yes", "--wait", "--timeout", "1800"];
    let mut child = nexus_e2e::nexusctl_command(server, ca, token, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nexusctl")?;
    let mut acknowledged = Duration::ZERO;
    for line in std::io::BufReader::new(child.stdout.take().context("nexusctl's output")?).lines() {
        if line?.ends_with("deleted") {
            acknowledged = started.elapsed();
        }
    }
    let mut err = String::new();
    child.stderr.take().context("nexusctl's errors")?.read_to_string(&mut err)?;
    let ok = child.wait()?.success();
    Ok((ok, err, acknowledged, started.elapsed()))
}

/// How many VMs are created while the fleet is being deleted.
const DURING: usize = 5;

/// How many times every VM is listed once the fleet is Running.
const LISTS: usize = 5;

/// Lists every VM of every project [`LISTS`] times in turn (one request
/// each, as `nexusctl get vm -A` makes): how long each took, sorted, in
/// milliseconds, and how many VMs the last returned.
async fn list_all(client: &nexus_client::Client) -> anyhow::Result<(Vec<f64>, usize)> {
    let (mut took, mut items) = (Vec::with_capacity(LISTS), 0);
    for _ in 0..LISTS {
        let started = Instant::now();
        items = client.list::<VmSpec>(None, &ListParams::default()).await?.items.len();
        took.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    Ok((took, items))
}

/// Creates [`DURING`] VMs and returns how long until all are Running,
/// following a watch (polling lists would load the apiserver it measures).
async fn created_during(client: &nexus_client::Client, kernel: &str, rootfs: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let params = ListParams { label_selector: Some("bench=during".into()), ..Default::default() };
    let mut stream = Box::pin(client.watch::<VmSpec>(Some("default"), &params, None).await?);
    for i in 0..DURING {
        let spec: VmSpec =
            serde_json::from_value(serde_json::json!({"vcpu": 1, "memMib": 128, "kernel": kernel, "rootfs": rootfs}))?;
        let mut vm = nexus_api::Vm::new(&format!("during-{i}"), Some("default"), spec);
        vm.metadata.labels.insert("bench".into(), "during".into());
        client.create(&vm).await?;
    }
    let mut running = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while running.len() < DURING {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .context("VMs created during the delete not Running after 10 min")?
            .context("the watch ended")??;
        if let Event::Added(vm) | Event::Modified(vm) = event {
            if vm.status_or_default().phase == VmPhase::Running {
                running.insert(vm.name().to_string());
            }
        }
    }
    Ok(started.elapsed())
}

async fn bench(args: Args, costs: host_costs::HostCosts) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("nexus-fleet-bench").tempdir_in(&args.dir)?;
    // Under the agents' default image root, where `hack/images.sh` puts them.
    nexus_e2e::ensure_host_example_images();
    let (kernel, rootfs) = ("/var/lib/nexus/images/vmlinux", "/var/lib/nexus/images/rootfs.ext4");
    let max_vms = (args.vms.div_ceil(args.agents) + 10) as u32;
    let sim = nexus_e2e::bin("firecracker-sim");
    let console = args.console_secs.to_string();
    let env = [("FIRECRACKER_SIM_CONSOLE_SECS", console.as_str())];
    let mut fleet = MultiNode::start_for_bench(&dir.path().join("fleet"), args.agents, max_vms, &sim, &env).await;
    let client = fleet.client();
    let yaml: Vec<String> = (0..args.vms)
        .map(|i| {
            format!(
                "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: bench-{i:04}\n  labels:\n    bench: \"yes\"\nspec:\n  \
                 vcpu: 1\n  memMib: {mem}\n  kernel: {kernel}\n  rootfs: {rootfs}\n",
                mem = args.mem_mib
            )
        })
        .collect();
    let file = dir.path().join("vms.yaml");
    std::fs::write(&file, yaml.join("---\n"))?;

    // One watch, opened before the apply, follows every VM to Ready: the
    // benchmark does not load the apiserver with lists while it measures.
    let params = ListParams { label_selector: Some("bench=yes".into()), ..Default::default() };
    let mut stream = Box::pin(client.watch::<VmSpec>(Some("default"), &params, None).await?);
    // What the fleet's start cost (agents joining, certificates issued) is
    // not the ramp's: CPU is counted from here.
    let before_apply = Usage::of(&fleet, &client).await?;
    let bench_before = cpu_ms(std::process::id());
    eprintln!("applying {} VMs to {} agents ...", args.vms, args.agents);
    let started = Instant::now();
    let applied_at = chrono::Utc::now();
    let host_before = host_cpu();
    let apply = tokio::task::spawn_blocking({
        let (server, ca, token) = (fleet.server.clone(), fleet.ca.clone(), fleet.admin_token.clone());
        let file = file.display().to_string();
        move || {
            let (ok, _, err) = nexus_e2e::nexusctl(&server, &ca, &token, &["apply", "-f", &file]);
            (ok, err, started.elapsed())
        }
    });
    let mut apply = Some(apply);
    let mut applied = Duration::ZERO;
    let mut ready: BTreeMap<String, nexus_api::Vm> = BTreeMap::new();
    let mut lag: Vec<f64> = Vec::with_capacity(args.vms);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    while ready.len() < args.vms {
        let event = tokio::select! {
            // A failed apply ends the run at once, not at the deadline.
            done = async { apply.as_mut().expect("polled only while running").await }, if apply.is_some() => {
                let (ok, err, took) = done?;
                anyhow::ensure!(ok, "nexusctl apply: {err}");
                (applied, apply) = (took, None);
                continue;
            }
            event = tokio::time::timeout_at(deadline, stream.next()) => match event {
                Ok(event) => event.context("the watch ended")??,
                Err(_) => {
                    // One VM that is not Running says why.
                    let waiting =
                        (0..args.vms).map(|i| format!("bench-{i:04}")).find(|n| !ready.contains_key(n)).unwrap_or_default();
                    let words = nexus_e2e::last_words(|a| fleet.nexusctl(a), "vm", &waiting);
                    anyhow::bail!("only {} of {} VMs Running after 30 min; {waiting}:\n{words}", ready.len(), args.vms);
                }
            },
        };
        let (Event::Added(vm) | Event::Modified(vm)) = event else { continue };
        let status = vm.status_or_default();
        if status.phase == VmPhase::Failed {
            let words = nexus_e2e::last_words(|a| fleet.nexusctl(a), "vm", vm.name());
            anyhow::bail!("VM {} failed:\n{words}", vm.name());
        }
        let became_ready = find_condition(&status.conditions, "Ready")
            .filter(|c| status.phase == VmPhase::Running && c.status == ConditionStatus::True)
            .map(|c| c.last_transition_time);
        if let Some(at) = became_ready
            && !ready.contains_key(vm.name())
        {
            // The controller stamps the condition as it writes the status:
            // from that write to this watcher.
            lag.push((chrono::Utc::now() - at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            ready.insert(vm.name().to_string(), vm);
        }
    }
    lag.sort_by(f64::total_cmp);
    let all_running = started.elapsed();
    let host = host_before.zip(host_cpu()).map(|(a, b)| HostCpu::share(&a, &b));
    let ramp = Usage::of(&fleet, &client).await?.since(&before_apply);
    let bench_cpu = cpu_ms(std::process::id()).saturating_sub(bench_before);
    if let Some(apply) = apply {
        let (ok, err, took) = apply.await?;
        anyhow::ensure!(ok, "nexusctl apply: {err}");
        applied = took;
    }
    // Its events from here on would only load the apiserver.
    drop(stream);
    let vms: Vec<nexus_api::Vm> = ready.into_values().collect();

    let mut per_vm: Vec<f64> = vms
        .iter()
        .filter_map(|v| {
            let created = v.metadata.creation_timestamp?;
            let ready = find_condition(&v.status.as_ref()?.conditions, "Ready")?.last_transition_time;
            Some((ready - created).num_milliseconds() as f64)
        })
        .collect();
    per_vm.sort_by(f64::total_cmp);
    let steps = steps::passed(&vms, applied_at);
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for v in &vms {
        *per_node.entry(v.spec.node_name.clone().unwrap_or_default()).or_default() += 1;
    }
    let (spread_min, spread_max) =
        (per_node.values().min().copied().unwrap_or(0), per_node.values().max().copied().unwrap_or(0));

    let requests = &ramp.requests;
    let apiserver_rss = rss_kib(fleet.apiserver.pid());
    let controller_rss = rss_kib(fleet.controller.pid());
    // After the memory above: a list of every VM is built whole in memory.
    let (lists, listed) = list_all(&client).await?;
    let apiserver_rss_listed = rss_kib(fleet.apiserver.pid());
    let agent_rss: Vec<u64> = fleet.agents.iter().map(|a| rss_kib(a.pid())).collect();
    let vmm_pids: Vec<u32> = (1..=args.agents)
        .flat_map(|i| nexus_e2e::host::vmm_processes_under(&fleet.dir.join(format!("run-{i}"))))
        .map(|(pid, _)| pid)
        .collect();
    let sims: Vec<u64> = vmm_pids.iter().map(|p| rss_kib(*p)).collect();
    let mean = |v: &[u64]| if v.is_empty() { 0 } else { v.iter().sum::<u64>() / v.len() as u64 };
    let cpu = serde_json::json!({
        "apiserver": ramp.apiserver,
        "controller": ramp.controller,
        "agents": ramp.agents,
        "bench": bench_cpu,
        "vmms": vmm_pids.iter().map(|p| cpu_us_precise(*p)).sum::<u64>() / 1000,
    });
    let idle = match args.idle_secs {
        0 => None,
        secs => Some(idle_cost(&fleet, Duration::from_secs(secs)).await),
    };

    eprintln!("deleting every VM, and creating {DURING} more half a second into it ...");
    let before_delete = Usage::of(&fleet, &client).await?;
    let deleting = Instant::now();
    let delete = tokio::task::spawn_blocking({
        let (server, ca, token) = (fleet.server.clone(), fleet.ca.clone(), fleet.admin_token.clone());
        move || timed_delete(&server, &ca, &token, deleting)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = created_during(&client, kernel, rootfs).await?;
    let (ok, err, acknowledged, deleted) = delete.await??;
    anyhow::ensure!(ok, "nexusctl delete: {err}");
    let delete_usage = Usage::of(&fleet, &client).await?.since(&before_delete);
    nexusctl(&fleet, &["delete", "vm", "-l", "bench=during", "--wait", "--timeout", "120"])?;
    let leftovers = (fleet.vmms(), fleet.taps(), fleet.run_dirs());
    let rows_left = client.list::<VmSpec>(None, &ListParams::default()).await?.items.len();
    fleet.stop();

    println!("{:<44} {:>12}", "measure", "value");
    let line = |k: &str, v: String| println!("{k:<44} {v:>12}");
    line("VMs / agents", format!("{} / {}", args.vms, args.agents));
    line("memory per VM MiB", args.mem_mib.to_string());
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |us| format!("{us:.1}"));
    line(
        "host: CPU us per wake-up, same / other CPU",
        format!("{} / {}", us(costs.wake_same_cpu), us(costs.wake_other_cpu)),
    );
    line("host: CPU us per cpuid", us(costs.cpuid));
    line("apply (nexusctl, all objects stored) ms", applied.as_millis().to_string());
    line("apply -> all Running ms", all_running.as_millis().to_string());
    line("VMs Running per second", format!("{:.1}", args.vms as f64 / all_running.as_secs_f64()));
    line("per VM created -> Ready p50 ms", format!("{:.0}", pct(&per_vm, 0.50)));
    line("per VM created -> Ready p95 ms", format!("{:.0}", pct(&per_vm, 0.95)));
    line("per VM created -> Ready p99 ms", format!("{:.0}", pct(&per_vm, 0.99)));
    line("per VM created -> Ready max ms", format!("{:.0}", per_vm.last().copied().unwrap_or(0.0)));
    for (name, at) in steps::NAMES.iter().zip(&steps) {
        line(
            &format!("{name}: ms after the apply, p50 / p99 / last"),
            format!("{:.0} / {:.0} / {:.0}", pct(at, 0.5), pct(at, 0.99), at.last().copied().unwrap_or(0.0)),
        );
    }
    line(
        "watch lag, Ready written -> seen p50/p99/max ms",
        format!("{:.1} / {:.1} / {:.1}", pct(&lag, 0.5), pct(&lag, 0.99), lag.last().copied().unwrap_or(0.0)),
    );
    line(
        &format!("list all {listed} VMs p50 / max ms"),
        format!("{:.0} / {:.0}", pct(&lists, 0.5), lists.last().copied().unwrap_or(0.0)),
    );
    line("VMs per node min / max", format!("{spread_min} / {spread_max}"));
    line("RSS apiserver KiB", apiserver_rss.to_string());
    line("RSS controller KiB", controller_rss.to_string());
    line("RSS apiserver after the lists KiB", apiserver_rss_listed.to_string());
    line("RSS agent mean / max KiB", format!("{} / {}", mean(&agent_rss), agent_rss.iter().max().unwrap_or(&0)));
    line("RSS simulated VMM mean KiB", mean(&sims).to_string());
    line(
        "fleet start CPU ms apiserver / controller / agents",
        format!("{} / {} / {}", before_apply.apiserver, before_apply.controller, before_apply.agents),
    );
    // From the apply to all Running.
    line("CPU ms apiserver / controller", format!("{} / {}", cpu["apiserver"], cpu["controller"]));
    line("CPU ms agents / bench", format!("{} / {}", cpu["agents"], cpu["bench"]));
    // Each VMM's from the agent's fork on: its jail's set-up, its start, its
    // configuration and boot.
    line("CPU ms simulated VMMs (all, to Running)", cpu["vmms"].to_string());
    let linked = match dynamically_linked(&sim) {
        Some(true) => "dynamic",
        Some(false) => "static",
        None => "unknown",
    };
    let linked = format!("{linked}, {}", libc_of(&sim).unwrap_or("libc unknown"));
    line("simulated VMM linked", linked.clone());
    if let Some(h) = &host {
        line("host CPU busy / idle / stolen %", format!("{:.0} / {:.0} / {:.0}", h.busy, h.idle, h.stolen));
    }
    for (route, n) in requests.iter().filter(|(_, n)| *n as usize >= args.vms / 10) {
        println!("{:<70} {:>6.2}", format!("apiserver requests per VM: {route}"), *n as f64 / args.vms as f64);
    }
    if let Some(idle) = &idle {
        let idle = |k: &str| idle[k].as_f64().unwrap_or(0.0);
        line(
            "idle fleet: CPU ms/s apiserver / controller",
            format!("{:.0} / {:.0}", idle("apiserver"), idle("controller")),
        );
        line("idle fleet: CPU ms/s agents / VMMs", format!("{:.0} / {:.0}", idle("agents"), idle("vmms")));
        line("idle fleet: host CPU busy %", format!("{:.1}", idle("hostBusy")));
    }
    line("delete all (--wait) ms", deleted.as_millis().to_string());
    line("delete: every DELETE acknowledged ms", acknowledged.as_millis().to_string());
    line(
        "delete: CPU ms apiserver / controller / agents",
        format!("{} / {} / {}", delete_usage.apiserver, delete_usage.controller, delete_usage.agents),
    );
    if let Some(h) = &delete_usage.host {
        line("delete: host CPU busy %", format!("{:.0}", h.busy));
    }
    for (route, n) in delete_usage.requests.iter().filter(|(_, n)| *n as usize >= args.vms / 10) {
        println!("{:<70} {:>6.2}", format!("delete: requests per VM: {route}"), *n as f64 / args.vms as f64);
    }
    line(&format!("{DURING} VMs created during it -> all Running ms"), during.as_millis().to_string());
    line(
        "left: VMMs / TAPs / dirs / VM rows",
        format!("{} / {} / {} / {rows_left}", leftovers.0, leftovers.1, leftovers.2),
    );
    let json = serde_json::json!({
        "vms": args.vms, "agents": args.agents, "memMib": args.mem_mib,
        "hostCostsUs": costs.json(),
        "applyMs": applied.as_millis() as u64,
        "allRunningMs": all_running.as_millis() as u64,
        "perVmReadyMs": {"p50": pct(&per_vm, 0.5), "p95": pct(&per_vm, 0.95), "p99": pct(&per_vm, 0.99),
                         "max": per_vm.last().copied().unwrap_or(0.0)},
        "stepsMs": steps::NAMES.iter().zip(&steps)
            .map(|(name, at)| (name.to_string(), serde_json::json!({"p50": pct(at, 0.5), "p99": pct(at, 0.99), "last": at.last().copied().unwrap_or(0.0)})))
            .collect::<serde_json::Map<_, _>>(),
        "watchLagMs": {"p50": pct(&lag, 0.5), "p99": pct(&lag, 0.99), "max": lag.last().copied().unwrap_or(0.0)},
        "listAllMs": {"items": listed, "p50": pct(&lists, 0.5), "max": lists.last().copied().unwrap_or(0.0)},
        "perNode": per_node,
        "vmmLinked": linked,
        "rssKiB": {"apiserver": apiserver_rss, "apiserverAfterLists": apiserver_rss_listed, "controller": controller_rss, "agents": agent_rss,
                   "vmmMean": mean(&sims)},
        "cpuMs": cpu,
        "startCpuMs": {"apiserver": before_apply.apiserver, "controller": before_apply.controller,
                       "agents": before_apply.agents},
        "hostCpuPercent": host.as_ref().map(|h| serde_json::json!({"busy": h.busy, "idle": h.idle, "stolen": h.stolen})),
        "idleCpuMsPerSec": idle,
        "deleteAllMs": deleted.as_millis() as u64,
        "deleteAcknowledgedMs": acknowledged.as_millis() as u64,
        "deleteCpuMs": {"apiserver": delete_usage.apiserver, "controller": delete_usage.controller,
                        "agents": delete_usage.agents},
        "deleteHostBusyPercent": delete_usage.host.as_ref().map(|h| h.busy),
        "createdDuringDeleteRunningMs": during.as_millis() as u64,
        "left": {"vmms": leftovers.0, "taps": leftovers.1, "dirs": leftovers.2, "vmRows": rows_left},
    });
    println!("{json}");
    anyhow::ensure!(
        leftovers == (0, 0, 0) && rows_left == 0,
        "something was left behind: {leftovers:?}, {rows_left} rows"
    );
    Ok(())
}

/// What the Running fleet costs while nothing changes: CPU milliseconds
/// per second of the apiserver, the controller, the agents together and
/// the VMMs together, and the host's busy share, over `span`.
async fn idle_cost(fleet: &MultiNode, span: Duration) -> serde_json::Value {
    let vmms = || -> Vec<u32> {
        (1..=fleet.agents.len())
            .flat_map(|i| nexus_e2e::host::vmm_processes_under(&fleet.dir.join(format!("run-{i}"))))
            .map(|(pid, _)| pid)
            .collect()
    };
    let sample = || {
        let agents: u64 = fleet.agents.iter().map(|a| cpu_ms(a.pid())).sum();
        [cpu_ms(fleet.apiserver.pid()), cpu_ms(fleet.controller.pid()), agents]
    };
    // Finds the VMMs first: looking through /proc is not the fleet's cost.
    let pids = vmms();
    let (before, vmms_before, host_before) =
        (sample(), pids.iter().map(|p| cpu_us_precise(*p)).sum::<u64>() / 1000, host_cpu());
    let started = Instant::now();
    tokio::time::sleep(span).await;
    let (after, vmms_after, host_after) =
        (sample(), pids.iter().map(|p| cpu_us_precise(*p)).sum::<u64>() / 1000, host_cpu());
    let secs = started.elapsed().as_secs_f64();
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let busy = host_before.zip(host_after).map(|(a, b)| HostCpu::share(&a, &b).busy).unwrap_or(0.0);
    serde_json::json!({
        "apiserver": rate(before[0], after[0]),
        "controller": rate(before[1], after[1]),
        "agents": rate(before[2], after[2]),
        "vmms": rate(vmms_before, vmms_after),
        "hostBusy": busy,
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    anyhow::ensure!(nexus_e2e::is_root(), "nexus-fleet-bench needs root (network namespaces, bridges, TAPs)");
    // Every thread the runtime starts inherits this private namespace.
    nexus_e2e::enter_private_netns();
    // On a quiet machine, before the fleet starts.
    let costs = host_costs::measure(2000);
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(bench(args, costs))
}
