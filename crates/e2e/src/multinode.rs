//! Several node agents, each in a network namespace of its own joined to the
//! test's namespace by a veth pair: the apiserver and controller run in the
//! test's namespace and reach agent `i` at 10.99.`i`.2, agents reach the
//! apiserver at 10.99.`i`.1. Namespaces are deleted on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nexus_client::Client;

use crate::{Proc, bin, run_ok, spawn, spawn_env, wait_until};

/// The `ip` binary (agents run under `ip netns exec`).
fn ip_bin() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("ip"))
}

/// One agent's namespace.
#[derive(Debug)]
pub struct NodeNs {
    pub name: String,
    pub node: String,
    pub index: usize,
}

impl NodeNs {
    /// Runs `ip` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// TAP devices in this namespace.
    pub fn taps(&self) -> Vec<String> {
        let out = self.ip(&["-j", "link", "show"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("nxt"))
            .map(str::to_string)
            .collect()
    }
}

/// The nftables table a partition is made of (the agent's own is `nexus`).
const PARTITION_TABLE: &str = "nexus_e2e_partition";

impl NodeNs {
    /// Cuts this node off: every packet on its link to the control plane is
    /// dropped, both ways, while every process keeps running. Undone by
    /// [`NodeNs::heal`].
    pub fn partition(&self) {
        let link = format!("nxn{}", self.index);
        let rules = format!(
            "table inet {PARTITION_TABLE} {{\n\
             chain in {{ type filter hook input priority -300; iifname \"{link}\" drop; }}\n\
             chain out {{ type filter hook output priority -300; oifname \"{link}\" drop; }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("{}-partition.nft", self.name));
        std::fs::write(&file, rules).expect("the partition's rules");
        run_ok(Command::new("ip").args(["netns", "exec", &self.name, "nft", "-f"]).arg(&file));
        let _ = std::fs::remove_file(file);
    }

    /// Ends a [`NodeNs::partition`].
    pub fn heal(&self) {
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "nft",
            "delete",
            "table",
            "inet",
            PARTITION_TABLE,
        ]));
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// An apiserver, a controller and `n` agents on separate "hosts".
#[derive(Debug)]
pub struct MultiNode {
    pub dir: PathBuf,
    pub server: String,
    /// The cluster's CA file.
    pub ca: PathBuf,
    pub apiserver: Proc,
    pub controller: Proc,
    pub agents: Vec<Proc>,
    pub nodes: Vec<NodeNs>,
    /// A cluster-admin token (the bootstrap admin's).
    pub admin_token: String,
    agent_args: Vec<Vec<String>>,
    /// The agents' environment (and so their VMMs').
    agent_env: Vec<(String, String)>,
    /// Whether the controller runs with the tests' quick settings.
    fast: bool,
}

impl Drop for MultiNode {
    fn drop(&mut self) {
        // The agents first, or they would start again the VMMs being killed.
        for agent in &mut self.agents {
            agent.stop();
        }
        for i in 1..=self.nodes.len() {
            crate::kill_vmms_under(&self.dir.join(format!("run-{i}")));
        }
    }
}

impl MultiNode {
    /// Starts everything; each agent accepts at most `max_vms`.
    pub async fn start(dir: &Path, n: usize, max_vms: u32) -> MultiNode {
        Self::start_with(dir, n, max_vms, &bin("firecracker-sim"), true, &[]).await
    }

    /// [`MultiNode::start`] with `env` in every agent's environment (and so
    /// in their VMMs', for the simulator's flags).
    pub async fn start_env(dir: &Path, n: usize, max_vms: u32, env: &[(&str, &str)]) -> MultiNode {
        Self::start_with(dir, n, max_vms, &bin("firecracker-sim"), true, env).await
    }

    /// Starts everything as a benchmark wants it: the agents running `vmm`
    /// as their Firecracker (`env` in their environment), the controller
    /// with its defaults.
    pub async fn start_for_bench(dir: &Path, n: usize, max_vms: u32, vmm: &Path, env: &[(&str, &str)]) -> MultiNode {
        Self::start_with(dir, n, max_vms, vmm, false, env).await
    }

    async fn start_with(dir: &Path, n: usize, max_vms: u32, vmm: &Path, fast: bool, env: &[(&str, &str)]) -> MultiNode {
        std::fs::create_dir_all(dir).expect("dir");
        let s = |p: &Path| p.display().to_string();
        // One CA; the apiserver's certificate names every address it is
        // reached by, each agent's its own.
        let pki = dir.join("data").join("pki");
        let ca = crate::init_pki(&pki);
        let gateways: Vec<String> = (1..=n).map(|i| format!("10.99.{i}.1")).collect();
        let mut sans = vec!["127.0.0.1"];
        sans.extend(gateways.iter().map(String::as_str));
        crate::issue_cert(&pki, "apiserver", &sans);
        let apiserver = spawn(
            "apiserver",
            &bin("nexus-apiserver"),
            &[
                "--listen",
                "0.0.0.0:7443",
                "--data-dir",
                &s(&dir.join("data")),
                "--allow-raw-paths",
                "--rate-limit-qps",
                "100000",
                "--rate-limit-burst",
                "100000",
            ],
            &dir.join("apiserver.log"),
        );
        let server = "https://127.0.0.1:7443".to_string();
        let admin_token = crate::wait_admin_token(&dir.join("data").join("admin.token")).await;
        let client = Client::with_trust(&server, Some(admin_token.clone()), crate::trust(&ca));
        wait_until(Duration::from_secs(10), "the apiserver", || async { client.version().await.is_ok() }).await;
        let (join, controller_token) = crate::component_tokens(&client, dir).await;
        static FLEETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let fleet_id = FLEETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enabling forwarding between the nodes");
        let mut nodes = Vec::new();
        let mut agents = Vec::new();
        let mut agent_args = Vec::new();
        for i in 1..=n {
            // Named namespaces are host-wide: unique per process and per fleet.
            let name = format!("nxe{}-{}-{i}", std::process::id(), fleet_id);
            let ns = NodeNs { name, node: format!("node-{i}"), index: i };
            run_ok(Command::new("ip").args(["netns", "add", &ns.name]));
            let (host_if, node_if) = (format!("nxh{i}"), format!("nxn{i}"));
            run_ok(Command::new("ip").args(["link", "add", &host_if, "type", "veth", "peer", "name", &node_if]));
            run_ok(Command::new("ip").args(["link", "set", &node_if, "netns", &ns.name]));
            run_ok(Command::new("ip").args(["addr", "add", &format!("10.99.{i}.1/24"), "dev", &host_if]));
            run_ok(Command::new("ip").args(["link", "set", &host_if, "up"]));
            ns.ip(&["addr", "add", &format!("10.99.{i}.2/24"), "dev", &node_if]);
            ns.ip(&["link", "set", &node_if, "up"]);
            ns.ip(&["link", "set", "lo", "up"]);
            // Nodes reach each other through the test's namespace (snapshot copies).
            ns.ip(&["route", "add", "10.99.0.0/16", "via", &format!("10.99.{i}.1")]);
            let (cert, key) = crate::issue_cert(&pki, &ns.node, &[&format!("10.99.{i}.2")]);
            let args: Vec<String> = [
                "netns",
                "exec",
                &ns.name,
                &s(&bin("nexus-nodeagent")),
                "--apiserver",
                &format!("https://10.99.{i}.1:7443"),
                "--ca-file",
                &s(&ca),
                "--tls-cert",
                &s(&cert),
                "--tls-key",
                &s(&key),
                "--node-name",
                &ns.node,
                "--listen",
                &format!("10.99.{i}.2:7444"),
                "--state-dir",
                &s(&dir.join(format!("agent-state-{i}"))),
                "--join-token-file",
                &s(&join),
                "--run-dir",
                &s(&dir.join(format!("run-{i}"))),
                "--firecracker",
                &s(vmm),
                "--heartbeat-secs",
                "1",
                "--process-manager",
                "direct",
                "--max-vms",
                &max_vms.to_string(),
                "--stop-grace-secs",
                "1",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            agents.push(spawn_env("nodeagent", &ip_bin(), &argv, &dir.join(format!("agent-{i}.log")), env));
            agent_args.push(args);
            nodes.push(ns);
        }
        let controller = crate::spawn_controller_tuned(
            &server,
            &ca,
            &controller_token,
            "127.0.0.1:7445",
            &dir.join("controller.log"),
            fast,
        );
        // Every node registered and seen Ready by the controller.
        crate::wait_controller_sees_ready_nodes("127.0.0.1:7445", nodes.len()).await;
        MultiNode {
            dir: dir.to_path_buf(),
            server,
            ca,
            apiserver,
            controller,
            agents,
            nodes,
            admin_token,
            agent_args,
            agent_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            fast,
        }
    }

    /// A client with the cluster admin's token.
    pub fn client(&self) -> Client {
        Client::with_trust(&self.server, Some(self.admin_token.clone()), crate::trust(&self.ca))
    }

    /// Runs `nexusctl` as the cluster admin; returns (success, stdout, stderr).
    pub fn nexusctl(&self, args: &[&str]) -> (bool, String, String) {
        crate::nexusctl(&self.server, &self.ca, &self.admin_token, args)
    }

    /// Runs the apiserver again on the same data (after it was killed).
    pub fn restart_apiserver(&mut self) {
        let data = self.dir.join("data").display().to_string();
        self.apiserver = spawn(
            "apiserver",
            &bin("nexus-apiserver"),
            &[
                "--listen",
                "0.0.0.0:7443",
                "--data-dir",
                &data,
                "--allow-raw-paths",
                "--rate-limit-qps",
                "100000",
                "--rate-limit-burst",
                "100000",
            ],
            &self.dir.join("apiserver.log"),
        );
    }

    /// Runs a new controller (after the old one was killed).
    pub fn restart_controller(&mut self) {
        self.controller = crate::spawn_controller_tuned(
            &self.server,
            &self.ca,
            &self.dir.join("controller.token"),
            "127.0.0.1:7445",
            &self.dir.join("controller.log"),
            self.fast,
        );
    }

    /// Runs agent `i` (0-based) again.
    pub fn restart_agent(&mut self, i: usize) {
        let argv: Vec<&str> = self.agent_args[i].iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.agents[i] = spawn_env("nodeagent", &ip_bin(), &argv, &self.dir.join(format!("agent-{}.log", i + 1)), &env);
    }

    /// Live VMM processes of every agent.
    pub fn vmms(&self) -> usize {
        (1..=self.nodes.len()).map(|i| crate::host::vmm_processes_under(&self.dir.join(format!("run-{i}"))).len()).sum()
    }

    /// TAPs in every node namespace.
    pub fn taps(&self) -> usize {
        self.nodes.iter().map(|n| n.taps().len()).sum()
    }

    /// VM directories on every node.
    pub fn run_dirs(&self) -> usize {
        (1..=self.nodes.len()).map(|i| crate::host::run_dirs(&self.dir.join(format!("run-{i}"))).len()).sum()
    }

    /// Stops everything (controller first).
    pub fn stop(&mut self) {
        self.controller.stop();
        for a in &mut self.agents {
            a.stop();
        }
        self.apiserver.stop();
    }
}
