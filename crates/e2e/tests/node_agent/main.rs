//! The node agent as a real process in a network namespace the test owns,
//! driving simulated VMMs: idempotence and crash recovery (`lifecycle`),
//! the guarded proxy, logs, metrics and a path-traversal corpus (`proxy`),
//! addresses, scopes, snapshots and O(1) disks (`disks`), and the jail
//! each VMM runs in (`jail`). This file holds the harness they share.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nexus_api::PowerState;
use nexus_api::agent::{EnsureVm, Inventory, ObservedState, VmReport};
use nexus_e2e::{Proc, bin, host, in_private_netns, wait_until};
use serde_json::Value;

const ADDR: &str = "127.0.0.1:7444";

struct Agent {
    proc: Proc,
    dir: PathBuf,
    http: reqwest::Client,
    /// The CA the agent's certificate is signed by.
    ca: PathBuf,
    /// The agent's own credential, which it made in its state directory.
    token: String,
}

impl Agent {
    async fn start(dir: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::start_with(dir, env, &["--process-manager", "direct"]).await
    }

    async fn start_with(dir: &Path, env: &[(&str, &str)], extra: &[&str]) -> Agent {
        let s = |p: PathBuf| p.display().to_string();
        // No apiserver answers at 127.0.0.1:9: the agent serves its API all
        // the same, with the credential it keeps in its state directory.
        let mut args: Vec<String> = ["--apiserver", "http://127.0.0.1:9", "--node-name", "n1", "--listen", ADDR]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(["--state-dir".into(), s(dir.join("state")), "--run-dir".into(), s(dir.join("run"))]);
        args.extend(["--firecracker".into(), s(bin("firecracker-sim"))]);
        // The agent serves HTTPS, as it does in a cluster.
        let pki = dir.join("pki");
        let ca = nexus_e2e::init_pki(&pki);
        let (cert, key) = nexus_e2e::issue_cert(&pki, "agent", &["127.0.0.1"]);
        args.extend(["--tls-cert".into(), s(cert), "--tls-key".into(), s(key)]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The environment reaches the agent and the VMMs it starts.
        let proc = nexus_e2e::spawn_env("nodeagent", &bin("nexus-nodeagent"), &args, &dir.join("agent.log"), env);
        let http = nexus_e2e::https_client(&ca);
        let cred = dir.join("state/agent.credential");
        wait_until(Duration::from_secs(10), "the agent's credential", || async { cred.exists() }).await;
        let token = std::fs::read_to_string(&cred).unwrap().trim().to_string();
        let agent = Agent { proc, dir: dir.to_path_buf(), http, ca, token };
        wait_until(Duration::from_secs(10), "the agent to answer", || async {
            agent.http.get(format!("https://{ADDR}/healthz")).bearer_auth(&agent.token).send().await.is_ok()
        })
        .await;
        agent
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("https://{ADDR}{path}")).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Removes VM `uid`: a `DELETE`, answered `202` while the removal is
    /// under way, asked again until it answers otherwise (`200` once
    /// nothing is left); returns that answer and how many 202s came first.
    async fn remove(&self, uid: &str) -> (u16, String, usize) {
        let mut accepted = 0;
        loop {
            let (status, body) = self.call("DELETE", &format!("/v1/vms/{uid}"), None).await;
            if status != 202 {
                return (status, body, accepted);
            }
            accepted += 1;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Sends the request line exactly as given (no client-side `..`
    /// resolution or escaping, as a URL library would do).
    async fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let tcp = tokio::net::TcpStream::connect(ADDR).await.unwrap();
        let mut stream = nexus_e2e::tls_connect(tcp, &self.ca, "127.0.0.1").await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {ADDR}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.token,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    async fn ensure(&self, req: &EnsureVm) -> VmReport {
        let (status, body) =
            self.call("PUT", &format!("/v1/vms/{}", req.uid), Some(&serde_json::to_value(req).unwrap())).await;
        assert_eq!(
            status,
            200,
            "ensure: {body}\n{}",
            std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
        );
        serde_json::from_str(&body).unwrap()
    }

    async fn inventory(&self) -> Inventory {
        let (status, body) = self.call("GET", "/v1/inventory?vms=true", None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // VMMs outlive their agent by design; a finished test takes them
        // down, after the agent, which would start them again.
        self.proc.stop();
        nexus_e2e::kill_vmms_under(&self.run_dir());
    }
}

fn request(uid: &str) -> EnsureVm {
    EnsureVm {
        uid: uid.into(),
        display_name: "test/vm".into(),
        state: PowerState::Running,
        vcpu: 1,
        mem_mib: 128,
        kernel_path: "/var/lib/nexus/images/vmlinux".into(),
        rootfs_path: "/var/lib/nexus/images/rootfs.ext4".into(),
        boot_args: "console=ttyS0".into(),
        mac: "06:00:ac:10:00:02".into(),
        ip: None,
        restore: None,
        restart_policy: Default::default(),
        kernel_sha256: None,
        rootfs_sha256: None,
        kernel_source: None,
        rootfs_source: None,
        initrd_path: None,
        initrd_sha256: None,
        initrd_source: None,
        probe: None,
        ..Default::default()
    }
}

const UID: &str = "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11";

/// What the agent has on the host: TAPs, sockets, VMMs, run directories.
fn host_state(run: &Path) -> (Vec<String>, Vec<String>, Vec<u32>, Vec<String>) {
    let taps: Vec<String> = host::taps().into_iter().map(|l| l.name).collect();
    let vmms: Vec<u32> = host::vmm_processes_under(run).into_iter().map(|(p, _)| p).collect();
    (taps, host::sockets_under(run), vmms, host::run_dirs(run))
}

mod disks;
mod jail;
mod lifecycle;
mod proxy;
