//! A whole cluster on one node: apiserver, controller and node agent (on the
//! simulated VMM), as real processes in the calling thread's namespace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nexus_client::Client;

use crate::*;

/// An apiserver, controller and node agent (on the simulated VMM), started
/// as real processes in the calling thread's network namespace.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub run_dir: PathBuf,
    pub server: String,
    /// The cluster's CA file: the apiserver's and the agent's certificates
    /// are signed by it.
    pub ca: PathBuf,
    pub apiserver: Proc,
    /// The second apiserver, with [`ClusterOptions::second_apiserver`].
    pub apiserver2: Option<Proc>,
    pub agent: Proc,
    pub controller: Proc,
    /// A cluster-admin token (the bootstrap admin's).
    pub admin_token: String,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    apiserver_args: Vec<String>,
    apiserver_wrapper: Vec<String>,
}

/// How [`Cluster::start_opts`] starts the processes, beyond the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterOptions<'a> {
    /// Extra flags for the node agent.
    pub agent_args: &'a [&'a str],
    /// Extra flags for the apiserver.
    pub apiserver_args: &'a [&'a str],
    /// Environment of the node agent (and so of the VMMs it starts).
    pub agent_env: &'a [(&'a str, &'a str)],
    /// A command the apiserver runs under (`strace …` to inject faults):
    /// its program, then its arguments; the apiserver's command follows.
    pub apiserver_wrapper: &'a [&'a str],
    /// A second apiserver on [`SECOND_APISERVER_ADDR`] with the same flags
    /// (give both `--database-url`); every component is then given both.
    pub second_apiserver: bool,
}

/// Where [`ClusterOptions::second_apiserver`] listens.
pub const SECOND_APISERVER_ADDR: &str = "127.0.0.1:7446";

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed test must not leave VMMs behind: they outlive the agent.
        // The agent goes first, or its restart policy would start again
        // the VMMs being killed.
        self.agent.stop();
        kill_vmms_under(&self.run_dir);
        self.stop_wrapped_apiserver();
    }
}

/// Starts the apiserver with `args`, under `wrapper` when it is not empty.
fn spawn_apiserver(wrapper: &[String], args: &[String], log: &Path) -> Proc {
    let apiserver = bin("nexus-apiserver").display().to_string();
    match wrapper.split_first() {
        None => {
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn("apiserver", &bin("nexus-apiserver"), &argv, log)
        }
        Some((program, rest)) => {
            let argv: Vec<&str> = rest
                .iter()
                .map(String::as_str)
                .chain([apiserver.as_str()])
                .chain(args.iter().map(String::as_str))
                .collect();
            spawn("apiserver", Path::new(program), &argv, log)
        }
    }
}

/// SIGKILLs every VMM whose API socket lies under `dir`, warm ones too.
pub fn kill_vmms_under(dir: &Path) {
    for (pid, _) in host::all_vmm_processes_under(dir) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Ports used inside the test's own namespace (no clash with the host).
pub const APISERVER_ADDR: &str = "127.0.0.1:7443";
pub const AGENT_ADDR: &str = "127.0.0.1:7444";

impl Cluster {
    /// Starts the three processes with state under `dir` and waits until
    /// the node is registered and Ready.
    pub async fn start(dir: &Path, node: &str) -> Cluster {
        Cluster::start_with(dir, node, &[]).await
    }

    /// Like [`Cluster::start`], with extra flags for the node agent.
    pub async fn start_with(dir: &Path, node: &str, agent_extra: &[&str]) -> Cluster {
        Cluster::start_full(dir, node, agent_extra, &[]).await
    }

    /// Like [`Cluster::start`], with extra flags for the node agent and the
    /// apiserver. Every connection is HTTPS: the apiserver finds its
    /// certificate where `nexus-apiserver init-pki` puts it (`pki/` in its
    /// data directory), and the agent's is issued for its address.
    pub async fn start_full(dir: &Path, node: &str, agent_extra: &[&str], apiserver_extra: &[&str]) -> Cluster {
        let opts = ClusterOptions { agent_args: agent_extra, apiserver_args: apiserver_extra, ..Default::default() };
        Cluster::start_opts(dir, node, &opts).await
    }

    /// Like [`Cluster::start`], started as `opts` say.
    pub async fn start_opts(dir: &Path, node: &str, opts: &ClusterOptions<'_>) -> Cluster {
        let (agent_extra, apiserver_extra) = (opts.agent_args, opts.apiserver_args);
        let agent_env: Vec<(String, String)> =
            opts.agent_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        std::fs::create_dir_all(dir).expect("cluster dir");
        let run_dir = dir.join("run");
        let data = dir.join("data");
        let pki = data.join("pki");
        let ca = init_pki(&pki);
        let agent_ip = AGENT_ADDR.split(':').next().expect("agent address");
        let (agent_cert, agent_key) = issue_cert(&pki, "agent", &[agent_ip]);
        let server = format!("https://{APISERVER_ADDR}");
        let s = |p: &Path| p.display().to_string();
        let mut apiserver_args: Vec<String> =
            ["--listen", APISERVER_ADDR, "--data-dir", &s(&data), "--bookmark-interval-secs", "2", "--allow-raw-paths"]
                .iter()
                .map(|a| a.to_string())
                .collect();
        // Tests are not about request budgets, unless they say so.
        if !apiserver_extra.contains(&"--rate-limit-qps") {
            apiserver_args.extend(["--rate-limit-qps", "100000", "--rate-limit-burst", "100000"].map(String::from));
        }
        apiserver_args.extend(apiserver_extra.iter().map(|a| a.to_string()));
        let apiserver_wrapper: Vec<String> = opts.apiserver_wrapper.iter().map(|a| a.to_string()).collect();
        let apiserver = spawn_apiserver(&apiserver_wrapper, &apiserver_args, &dir.join("apiserver.log"));
        let admin_token = wait_admin_token(&data.join("admin.token")).await;
        let client = Client::with_trust(&server, Some(admin_token.clone()), trust(&ca));
        wait_until(Duration::from_secs(10), "the apiserver to answer", || async { client.version().await.is_ok() })
            .await;
        let (apiserver2, server) = if opts.second_apiserver {
            let mut args = apiserver_args.clone();
            if let Some(at) = args.iter().position(|a| a == "--listen") {
                args[at + 1] = SECOND_APISERVER_ADDR.to_string();
            }
            let second = spawn_apiserver(&apiserver_wrapper, &args, &dir.join("apiserver2.log"));
            let only = Client::with_trust(&format!("https://{SECOND_APISERVER_ADDR}"), None, trust(&ca));
            wait_until(Duration::from_secs(10), "the second apiserver", || async { only.version().await.is_ok() })
                .await;
            (Some(second), format!("{server},https://{SECOND_APISERVER_ADDR}"))
        } else {
            (None, server)
        };
        let client = Client::with_trust(&server, Some(admin_token.clone()), trust(&ca));
        let (join, controller_token) = component_tokens(&client, dir).await;
        let agent_args: Vec<String> = [
            "--apiserver",
            &server,
            "--ca-file",
            &s(&ca),
            "--tls-cert",
            &s(&agent_cert),
            "--tls-key",
            &s(&agent_key),
            "--node-name",
            node,
            "--listen",
            AGENT_ADDR,
            "--state-dir",
            &s(&dir.join("agent-state")),
            "--join-token-file",
            &s(&join),
            "--run-dir",
            &s(&run_dir),
            "--firecracker",
            &s(&bin("firecracker-sim")),
            "--heartbeat-secs",
            "1",
            "--process-manager",
            "direct",
        ]
        .iter()
        .chain(agent_extra)
        .map(|a| a.to_string())
        .collect();
        let argv: Vec<&str> = agent_args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let agent = spawn_env("nodeagent", &bin("nexus-nodeagent"), &argv, &dir.join("agent.log"), &env);
        let controller =
            spawn_controller(&server, &ca, &controller_token, "127.0.0.1:7445", &dir.join("controller.log"));
        // Registered, heartbeating, and seen Ready by the controller (its
        // cache trails the apiserver): a VM applied now is placed at once.
        wait_controller_sees_ready_nodes("127.0.0.1:7445", 1).await;
        Cluster {
            dir: dir.to_path_buf(),
            run_dir,
            server,
            ca,
            apiserver,
            apiserver2,
            agent,
            controller,
            admin_token,
            agent_args,
            agent_env,
            apiserver_args,
            apiserver_wrapper,
        }
    }

    /// Starts another controller (a standby while the first leads), serving
    /// its metrics on `metrics_listen`.
    pub fn spawn_controller(&self, metrics_listen: &str, log: &str) -> Proc {
        spawn_controller(
            &self.server,
            &self.ca,
            &self.dir.join("controller.token"),
            metrics_listen,
            &self.dir.join(log),
        )
    }

    /// Starts the apiserver again (after it was killed or stopped) on the
    /// same address and data, and waits until it answers.
    pub async fn restart_apiserver(&mut self) {
        self.apiserver =
            spawn_apiserver(&self.apiserver_wrapper, &self.apiserver_args, &self.dir.join("apiserver.log"));
        let client = self.client();
        wait_until(Duration::from_secs(10), "the apiserver to answer again", || async {
            client.version().await.is_ok()
        })
        .await;
    }

    /// Starts the node agent again (after it was killed or stopped).
    pub fn restart_agent(&mut self) {
        let argv: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.agent = spawn_env("nodeagent", &bin("nexus-nodeagent"), &argv, &self.dir.join("agent.log"), &env);
    }

    /// A client with the cluster admin's token.
    pub fn client(&self) -> Client {
        Client::with_trust(&self.server, Some(self.admin_token.clone()), trust(&self.ca))
    }

    /// Calls the node agent's API as the controller does (with the node's
    /// own credential, over HTTPS verified against the cluster's CA);
    /// returns the status and the body (JSON, or the text as a string).
    pub async fn agent_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let cred =
            std::fs::read_to_string(self.dir.join("agent-state/agent.credential")).expect("the agent's credential");
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut req = https_client(&self.ca).request(m, format!("https://{AGENT_ADDR}{path}")).bearer_auth(cred.trim());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.expect("the agent answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Runs `nexusctl` as the cluster admin; returns (success, stdout, stderr).
    pub fn nexusctl(&self, args: &[&str]) -> (bool, String, String) {
        nexusctl(&self.server, &self.ca, &self.admin_token, args)
    }

    /// `nexusctl apply -f` of `yaml` (written to a file in the cluster's
    /// directory), which must succeed.
    pub fn apply(&self, yaml: &str) {
        let file = self.dir.join(format!("apply-{:016x}.yaml", nexus_api::fnv::fnv1a(yaml.bytes())));
        std::fs::write(&file, yaml).expect("writing the manifest");
        let (ok, out, err) = self.nexusctl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "apply: {out}{err}\n{}", self.logs());
    }

    /// VM `name` of project `default`, which must exist.
    pub async fn vm(&self, name: &str) -> nexus_api::Vm {
        self.client().get::<nexus_api::VmSpec>("default", name).await.expect("the VM")
    }

    /// VM `name` of project `default` once it is Running (within 30 s).
    pub async fn wait_running(&self, name: &str) -> nexus_api::Vm {
        let client = self.client();
        wait_until(Duration::from_secs(30), &format!("VM {name} Running"), || async {
            client
                .get::<nexus_api::VmSpec>("default", name)
                .await
                .is_ok_and(|v| v.status_or_default().phase == nexus_api::VmPhase::Running)
        })
        .await;
        self.vm(name).await
    }

    /// Stops all three processes (controller first).
    pub fn stop(&mut self) {
        self.controller.stop();
        self.agent.stop();
        self.stop_wrapped_apiserver();
        self.apiserver.stop();
    }

    /// Stops the apiserver running under a wrapper (`strace`): a tracer
    /// that is stopped detaches and leaves its tracee running, so the
    /// wrapper's children are stopped first (the wrapper then ends).
    fn stop_wrapped_apiserver(&mut self) {
        if self.apiserver_wrapper.is_empty() || !self.apiserver.is_running() {
            return;
        }
        let pid = self.apiserver.pid();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// The processes' logs, for failure messages.
    pub fn logs(&self) -> String {
        ["apiserver.log", "agent.log", "controller.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `nexusctl --server <server> --certificate-authority <ca> <args>` with
/// `token` and no context, not yet started.
pub fn nexusctl_command(server: &str, ca: &Path, token: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("nexusctl"));
    cmd.args(["--server", server])
        .arg("--certificate-authority")
        .arg(ca)
        .args(args)
        .env("NEXUS_TOKEN", token)
        .env_remove("NEXUS_CONTEXT");
    cmd
}

/// Runs `nexusctl --server <server> --certificate-authority <ca> <args>`
/// with `token`; returns (success, stdout, stderr).
pub fn nexusctl(server: &str, ca: &Path, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = nexusctl_command(server, ca, token, args).output().expect("running nexusctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
