//! One `nexus-apiserver` process on a chosen storage backend.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nexus_client::Client;

use crate::*;

/// A storage backend an apiserver can run on.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Embedded SQLite in this directory.
    Sqlite(PathBuf),
    /// PostgreSQL at this URL.
    Postgres(String),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// One `nexus-apiserver` process.
#[derive(Debug)]
pub struct ApiServer {
    pub url: String,
    /// The CA file its certificate is signed by (`None` with `--plain-http`).
    pub ca: Option<PathBuf>,
    pub proc: Proc,
    pub log: PathBuf,
    /// The bootstrap admin's token, when this server made it (the first
    /// on an empty store).
    pub admin_token: Option<String>,
}

impl ApiServer {
    /// Starts an apiserver on a free port of 127.0.0.1 and waits until it
    /// answers (`/healthz`: its `/readyz` also wants a Ready node).
    ///
    /// It serves HTTPS with a certificate from the CA in `log_dir/pki` (made
    /// on first use, so apiservers started with the same `log_dir` share
    /// it), unless `extra` holds `--plain-http`.
    pub async fn start(backend: &Backend, log_dir: &Path, extra: &[&str]) -> ApiServer {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let token_file = log_dir.join(format!("admin-{port}.token"));
        let mut args: Vec<String> = vec![
            "--listen".into(),
            listen.clone(),
            "--bootstrap-token-file".into(),
            token_file.display().to_string(),
            "--allow-raw-paths".into(),
        ];
        let ca = (!extra.contains(&"--plain-http")).then(|| {
            let pki = log_dir.join("pki");
            let ca = init_pki(&pki);
            let (cert, key) = issue_cert(&pki, &format!("apiserver-{port}"), &["127.0.0.1", "localhost"]);
            args.extend([
                "--tls-cert".into(),
                cert.display().to_string(),
                "--tls-key".into(),
                key.display().to_string(),
            ]);
            ca
        });
        // Tests are not about request budgets, unless they say so.
        if !extra.contains(&"--rate-limit-qps") {
            args.extend(["--rate-limit-qps", "100000", "--rate-limit-burst", "100000"].map(String::from));
        }
        match backend {
            Backend::Sqlite(dir) => args.extend(["--data-dir".into(), dir.display().to_string()]),
            Backend::Postgres(url) => args.extend(["--database-url".into(), url.clone()]),
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = log_dir.join(format!("apiserver-{port}.log"));
        let proc = spawn("apiserver", &bin("nexus-apiserver"), &argv, &log);
        let url = format!("{}://{listen}", if ca.is_some() { "https" } else { "http" });
        let trust = ca.as_deref().map(trust).unwrap_or_default();
        let http = trust.apply(reqwest::Client::builder()).build().expect("an HTTP client");
        wait_until(Duration::from_secs(20), "the apiserver to be ready", || {
            let http = http.clone();
            let url = url.clone();
            async move { http.get(format!("{url}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        let admin_token = std::fs::read_to_string(&token_file).ok().map(|t| t.trim().to_string());
        ApiServer { url, ca, proc, log, admin_token }
    }

    /// How clients of this server verify it.
    pub fn trust(&self) -> nexus_client::tls::Trust {
        self.ca.as_deref().map(trust).unwrap_or_default()
    }

    /// A client with the bootstrap admin's token (none if this server did
    /// not make it: use [`ApiServer::client_with`]).
    pub fn client(&self) -> Client {
        Client::with_trust(&self.url, self.admin_token.clone(), self.trust())
    }

    /// A client presenting `token`.
    pub fn client_with(&self, token: &str) -> Client {
        Client::with_trust(&self.url, Some(token.to_string()), self.trust())
    }

    /// A raw connection to this server (TLS when it serves TLS), for
    /// requests sent byte for byte.
    pub async fn connect_raw(&self) -> std::io::Result<Box<dyn RawIo>> {
        let addr = self.url.split_once("://").map(|(_, a)| a).unwrap_or(&self.url);
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        match &self.ca {
            None => Ok(Box::new(tcp)),
            Some(ca) => Ok(Box::new(tls_connect(tcp, ca, "127.0.0.1").await?)),
        }
    }

    /// A raw HTTP client that trusts this server, for requests the typed
    /// client cannot make.
    pub fn http(&self) -> reqwest::Client {
        self.trust().apply(reqwest::Client::builder().timeout(Duration::from_secs(30))).build().expect("an HTTP client")
    }
}
