//! A throwaway PostgreSQL for tests: `$DATABASE_URL` when set, otherwise a
//! cluster made with `initdb` in a temporary directory, run as the
//! `postgres` user when the tests run as root, and removed afterwards.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A PostgreSQL server the tests may create databases on.
#[derive(Debug)]
pub struct TestPostgres {
    /// `postgres://user@host:port` without a database name.
    base: String,
    server: Option<(Child, tempfile::TempDir)>,
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn pg_bin(name: &str) -> PathBuf {
    if let Ok(out) = Command::new("sh").args(["-c", &format!("command -v {name}")]).output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin").join(name)).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    candidates.sort();
    candidates
        .pop()
        .unwrap_or_else(|| panic!("{name} not found: install Debian's postgresql package (hack/test.sh does)"))
}

/// uid and gid of `postgres` when running as root (initdb refuses root).
fn run_as() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user =
        nix::unistd::User::from_name("postgres").ok().flatten().expect("a postgres user (from the postgresql package)");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl TestPostgres {
    /// Uses `$DATABASE_URL` (its server) or starts a private cluster.
    pub fn start() -> TestPostgres {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let base = match url.rfind('/') {
                Some(i) if i > "postgres://".len() => url[..i].to_string(),
                _ => url,
            };
            return TestPostgres { base, server: None };
        }
        let dir = tempfile::Builder::new().prefix("nexus-pg-").tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        let ids = run_as();
        if let Some((uid, gid)) = ids {
            for p in [dir.path(), data.as_path()] {
                nix::unistd::chown(p, Some(uid.into()), Some(gid.into())).expect("chown to postgres");
            }
        }
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb.args(["-D", &data.display().to_string(), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]);
        if let Some((uid, gid)) = ids {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().expect("running initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let mut server = Command::new(pg_bin("postgres"));
        server
            .args(["-D", &data.display().to_string(), "-p", &port.to_string(), "-k", &dir.path().display().to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = ids {
            server.uid(uid).gid(gid);
        }
        // Its own process group: a Ctrl-C to the tests does not reach it first.
        server.process_group(0);
        let child = server.spawn().expect("starting postgres");
        let base = format!("postgres://postgres@127.0.0.1:{port}");
        let pg = TestPostgres { base, server: Some((child, dir)) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while pg.psql("postgres", "SELECT 1").is_err() {
            assert!(Instant::now() < deadline, "postgres did not start within 30s");
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(pg_bin("psql"))
            .args([&format!("{}/{db}", self.base), "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Creates an empty database and returns its URL.
    pub fn fresh_database(&self) -> String {
        let name = format!("nexus_test_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::SeqCst));
        self.psql("postgres", &format!("CREATE DATABASE {name}")).expect("CREATE DATABASE");
        format!("{}/{name}", self.base)
    }

    /// Creates an empty database whose tables live in `dir` (a tablespace
    /// there: a small filesystem there fills up under them) and returns
    /// its URL; `None` with `$DATABASE_URL`, whose server cannot see `dir`.
    pub fn database_in(&self, dir: &std::path::Path) -> Option<String> {
        self.server.as_ref()?;
        if let Some((uid, gid)) = run_as() {
            nix::unistd::chown(dir, Some(uid.into()), Some(gid.into())).expect("chown to postgres");
        }
        let n = NEXT_DB.fetch_add(1, Ordering::SeqCst);
        let (space, name) =
            (format!("nexus_ts_{}_{n}", std::process::id()), format!("nexus_test_{}_{n}", std::process::id()));
        self.psql("postgres", &format!("CREATE TABLESPACE {space} LOCATION '{}'", dir.display()))
            .expect("CREATE TABLESPACE");
        self.psql("postgres", &format!("CREATE DATABASE {name} TABLESPACE {space}")).expect("CREATE DATABASE");
        Some(format!("{}/{name}", self.base))
    }

    /// Runs one query on `url`'s database and returns its rows as text.
    pub fn query(&self, url: &str, sql: &str) -> String {
        let db = url.rsplit('/').next().unwrap_or("postgres");
        self.psql(db, sql).expect("query")
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Some((child, _dir)) = &mut self.server {
            // SIGINT: PostgreSQL's fast shutdown.
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
