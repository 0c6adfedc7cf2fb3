//! The real `nexusctl` binary against a real apiserver process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use nexus_e2e::{ApiServer, Backend, repo_root};

struct Env {
    server: ApiServer,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

/// What one nexusctl run did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Env {
    fn new() -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = rt.block_on(ApiServer::start(&Backend::Sqlite(dir.path().join("data")), dir.path(), &[]));
        Env { server, dir, rt }
    }

    fn ctl(&self, args: &[&str]) -> Run {
        self.ctl_with(
            args,
            &[("NEXUS_SERVER", self.server.url.as_str()), ("NEXUS_CA_FILE", self.ca()), ("NEXUS_TOKEN", self.admin())],
        )
    }

    /// The CA file the server's certificate is signed by.
    fn ca(&self) -> &str {
        self.server.ca.as_deref().and_then(Path::to_str).expect("the server serves TLS")
    }

    fn ctl_with(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexusctl"));
        cmd.args(args)
            .env_remove("NEXUS_SERVER")
            .env_remove("NEXUS_CA_FILE")
            .env_remove("NEXUS_TOKEN")
            .env_remove("NEXUS_PROJECT")
            .env("NEXUS_CONFIG", self.dir.path().join("config.yaml"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The bootstrap admin's token.
    fn admin(&self) -> &str {
        self.server.admin_token.as_deref().expect("the bootstrap token")
    }

    fn ok(&self, args: &[&str]) -> String {
        let r = self.ctl(args);
        assert_eq!(r.code, 0, "nexusctl {args:?} failed: {r:?}");
        r.stdout
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

const VM: &str = "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: web\n  labels:\n    app: web\nspec:\n  vcpu: 1\n  memMib: 128\n  kernel: /img/vmlinux\n  rootfs: /img/rootfs.ext4\n  bootArgs: console=ttyS0\n";

#[test]
fn apply_reports_created_unchanged_configured_and_get_output_reapplies_unchanged() {
    let env = Env::new();
    let f = env.file("web.yaml", VM);
    assert_eq!(env.ok(&["apply", "-f", &s(&f)]), "vm/web created\n");
    assert_eq!(env.ok(&["apply", "-f", &s(&f)]), "vm/web unchanged\n");
    env.file("web.yaml", &VM.replace("memMib: 128", "memMib: 256"));
    assert_eq!(env.ok(&["apply", "-f", &s(&f)]), "vm/web configured\n");
    assert_eq!(env.ok(&["get", "vm", "web", "-o", "jsonpath={.spec.memMib}"]).trim(), "256");
    // Removing a field from the file removes it from the object.
    env.file("web.yaml", &VM.replace("memMib: 128", "memMib: 256").replace("  bootArgs: console=ttyS0\n", ""));
    assert_eq!(env.ok(&["apply", "-f", &s(&f)]), "vm/web configured\n");
    assert_eq!(env.ok(&["get", "vm", "web", "-o", "jsonpath={.spec.bootArgs}"]).trim(), "");
    // What `get -o yaml` prints applies as unchanged.
    let yaml = env.ok(&["get", "vm", "web", "-o", "yaml"]);
    let round = env.file("round.yaml", &yaml);
    assert_eq!(env.ok(&["apply", "-f", &s(&round)]), "vm/web unchanged\n");
    let json = env.ok(&["get", "vm", "web", "-o", "json"]);
    let round = env.file("round.json", &json);
    assert_eq!(env.ok(&["apply", "-f", &s(&round)]), "vm/web unchanged\n");
    // From stdin, and the server-side dry run stores nothing.
    let other = env.file("other.yaml", &VM.replace("name: web", "name: other"));
    assert_eq!(env.ok(&["apply", "--dry-run=server", "-f", &s(&other)]), "vm/other created (server dry run)\n");
    assert_eq!(env.ctl(&["get", "vm", "other"]).code, 1);
    // diff shows what apply would change.
    env.file("web.yaml", &VM.replace("memMib: 128", "memMib: 512"));
    let d = env.ctl(&["diff", "-f", &s(&f), "--exit-code"]);
    assert_eq!(d.code, 1, "{d:?}");
    assert!(
        d.stdout.contains("--- live/vm/web")
            && d.stdout.contains("-  memMib: 256")
            && d.stdout.contains("+  memMib: 512"),
        "{}",
        d.stdout
    );
    assert_eq!(env.ok(&["diff", "-f", &s(&round)]), "");
    // -o: the applied objects instead of a line each (and never a bar).
    assert_eq!(env.ok(&["apply", "-f", &s(&round), "-o", "name"]), "vm/web\n");
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["apply", "-f", &s(&round), "-o", "json"])).unwrap();
    assert_eq!((listed["kind"].as_str(), listed["items"][0]["metadata"]["name"].as_str()), (Some("List"), Some("web")));
    assert_eq!(env.ctl(&["apply", "-f", &s(&round), "-o", "wide"]).code, 2);
}

/// The apiserver's count of `method` requests to `route`, from its metrics.
fn requests(env: &Env, method: &str, route: &str) -> u64 {
    use futures::TryStreamExt;
    let client = env.server.client();
    let body: Vec<u8> = env.rt.block_on(async {
        client.get_stream("/metrics").await.unwrap().map_ok(|b| b.to_vec()).try_concat().await.unwrap()
    });
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| {
            l.starts_with("http_requests_total")
                && l.contains(&format!("method=\"{method}\""))
                && l.contains(&format!("route=\"{route}\""))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn a_long_file_is_planned_from_one_list_and_reports_in_file_order() {
    let env = Env::new();
    let vm = |i: usize, mem: u32| {
        VM.replace("name: web", &format!("name: vm-{i:02}")).replace("memMib: 128", &format!("memMib: {mem}"))
    };
    // Two of the forty exist already: one as the file has it, one not.
    env.ok(&["apply", "-f", &s(&env.file("pre.yaml", &format!("{}---\n{}", vm(3, 128), vm(7, 512))))]);
    let all: Vec<String> = (0..40).map(|i| vm(i, 128)).collect();
    let f = env.file("many.yaml", &all.join("---\n"));
    let gets_before = requests(&env, "GET", "/v1/projects/{project}/vms/{name}");
    let expected: String = (0..40)
        .map(|i| match i {
            3 => "vm/vm-03 unchanged\n".to_string(),
            7 => "vm/vm-07 configured\n".to_string(),
            i => format!("vm/vm-{i:02} created\n"),
        })
        .collect();
    assert_eq!(env.ok(&["apply", "-f", &s(&f)]), expected);
    assert_eq!(
        requests(&env, "GET", "/v1/projects/{project}/vms/{name}"),
        gets_before,
        "no object was read on its own"
    );
    assert_eq!(env.ok(&["get", "vm", "vm-07", "-o", "jsonpath={.spec.memMib}"]).trim(), "128");
    // Again, every object is unchanged, and diff (from one list too) agrees.
    let again = env.ok(&["apply", "-f", &s(&f)]);
    assert_eq!(again.lines().filter(|l| l.ends_with(" unchanged")).count(), 40, "{again}");
    assert_eq!(env.ok(&["diff", "-f", &s(&f)]), "");
    env.file(
        "many.yaml",
        &all.join("---\n").replace("name: vm-39\n  labels:\n", "name: vm-39\n  labels:\n    late: \"yes\"\n"),
    );
    let d = env.ok(&["diff", "-f", &s(&f)]);
    assert!(d.contains("--- live/vm/vm-39") && d.contains("+    late: \"yes\"") && !d.contains("vm-38"), "{d}");
    assert_eq!(
        requests(&env, "GET", "/v1/projects/{project}/vms/{name}"),
        gets_before + 1,
        "only the one `get` above read an object on its own"
    );
}

#[test]
fn prune_deletes_a_removed_files_object_and_nothing_else() {
    let env = Env::new();
    let dir = env.dir.path().join("gitops");
    for f in ["template.yaml", "runners/runner-1.yaml", "runners/runner-2.yaml"] {
        let text = std::fs::read_to_string(repo_root().join("examples/gitops").join(f)).unwrap();
        env.file(&format!("gitops/{f}"), &text);
    }
    let keep = env.file("keep.yaml", &VM.replace("name: web", "name: keep-me"));
    env.ok(&["apply", "-f", &s(&keep)]);
    let out = env.ok(&["apply", "-f", &s(&dir), "--prune", "-l", "gitops=demo"]);
    assert_eq!(out, "vm/runner-1 created\nvm/runner-2 created\ntemplate/runner created\n");
    std::fs::remove_file(dir.join("runners/runner-2.yaml")).unwrap();
    let out = env.ok(&["apply", "-f", &s(&dir), "--prune", "-l", "gitops=demo"]);
    assert_eq!(out, "vm/runner-1 unchanged\ntemplate/runner unchanged\nvm/runner-2 pruned\n");
    assert_eq!(env.ok(&["get", "vms", "-o", "name"]), "vm/keep-me\nvm/runner-1\n");
    // --prune without a selector is a usage error.
    assert_eq!(env.ctl(&["apply", "-f", &s(&dir), "--prune"]).code, 2);
}

#[test]
fn every_example_applies_cleanly() {
    let env = Env::new();
    let examples = s(&repo_root().join("examples"));
    let first = env.ok(&["apply", "-f", &examples]);
    let lines: Vec<&str> = first.lines().collect();
    assert!(lines.len() >= 10, "{first}");
    assert!(lines.iter().all(|l| l.ends_with(" created")), "{first}");
    // Every kind of the registry has an example, and it applies.
    for kind in nexus_api::registry::kinds() {
        let prefix = format!("{}/", kind.short());
        assert!(
            lines.iter().any(|l| l.starts_with(&prefix) && l.ends_with(" created")),
            "no example of kind {} in examples/: {first}",
            kind.kind
        );
    }
    let second = env.ok(&["apply", "-f", &examples]);
    assert!(second.lines().all(|l| l.ends_with(" unchanged")), "{second}");
}

#[test]
fn wait_returns_when_the_condition_holds_and_fails_on_timeout() {
    let env = Env::new();
    let f = env.file("web.yaml", VM);
    env.ok(&["apply", "-f", &s(&f)]);
    let client = env.server.client();
    let setter = env.rt.spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        let mut vm = client.get::<nexus_api::VmSpec>("default", "web").await.unwrap();
        let mut status = vm.status_or_default();
        status.phase = nexus_api::VmPhase::Running;
        nexus_api::meta::set_condition(
            &mut status.conditions,
            "Ready",
            nexus_api::ConditionStatus::True,
            "Running",
            "",
        );
        vm.status = Some(status);
        client.replace_status(&vm).await.unwrap();
    });
    let r = env.ctl(&["wait", "vm", "web", "--for=condition=Ready", "--timeout", "15"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "vm/web condition met\n");
    env.rt.block_on(setter).unwrap();
    assert_eq!(env.ctl(&["wait", "vm", "web", "--for=jsonpath={.status.phase}=Running", "--timeout", "5"]).code, 0);
    let started = std::time::Instant::now();
    let r = env.ctl(&["wait", "vm", "web", "--for=jsonpath={.status.phase}=Paused", "--timeout", "1"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("timed out after 1s waiting for vm/web") && r.stderr.contains("Running"), "{}", r.stderr);
    // The object's own words come with it: its conditions and Events.
    assert!(
        r.stderr.contains("Conditions:") && r.stderr.contains("Ready  True") && r.stderr.contains("Events:"),
        "{}",
        r.stderr
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(env.ctl(&["wait", "vm", "web", "--for=ready"]).code, 2, "a malformed --for is a usage error");
}

#[test]
fn errors_name_the_problem_and_exit_codes_follow_the_contract() {
    let env = Env::new();
    let bad = env.file(
        "bad.yaml",
        &format!(
            "{VM}---\n{}",
            VM.replace("name: web", "name: two").replace("memMib: 128", "memMib: 128\n  memory: 5")
        ),
    );
    let r = env.ctl(&["apply", "-f", &s(&bad)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("bad.yaml (document 2): field spec.memory: "), "{}", r.stderr);
    assert!(r.stderr.contains("line 23 column 3") && r.stderr.contains("unknown field `memory`"), "{}", r.stderr);
    assert_eq!(r.stdout, "", "nothing is applied when a file does not parse");
    // A value only the server rejects: its message and hint.
    let odd = env.file("odd.yaml", &VM.replace("vcpu: 1", "vcpu: 3"));
    let r = env.ctl(&["apply", "-f", &s(&odd)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("spec.vcpu: invalid value \"3\"") && r.stderr.contains("hint:"), "{}", r.stderr);
    let r = env.ctl(&["get", "vm", "missing"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("error: NotFound (404): VM \"missing\" not found"), "{}", r.stderr);
    assert!(!r.stderr.contains("Api("), "no debug dumps: {}", r.stderr);
    assert_eq!(env.ctl(&["get"]).code, 2);
    assert_eq!(env.ctl(&["get", "widgets"]).code, 2);
    assert_eq!(env.ctl(&["frobnicate"]).code, 2);
    let down = env.ctl_with(&["get", "vms"], &[("NEXUS_SERVER", "https://127.0.0.1:9")]);
    assert_eq!(down.code, 1);
    assert!(down.stderr.contains("cannot reach the apiserver at https://127.0.0.1:9"), "{}", down.stderr);
}

#[test]
fn the_server_is_checked_against_the_trusted_ca_and_plain_http_to_its_port_gets_a_clear_error() {
    let env = Env::new();
    let url = env.server.url.clone();
    assert!(url.starts_with("https://"), "{url}");
    // A CA that did not sign the server's certificate, and none at all
    // (the system's roots): both refused before any token is sent.
    let other_ca = nexus_e2e::init_pki(&env.dir.path().join("other-pki"));
    let other_ca = other_ca.to_str().unwrap();
    for (what, ca) in [("another cluster's CA", Some(other_ca)), ("the system's roots", None)] {
        let mut vars = vec![("NEXUS_SERVER", url.as_str()), ("NEXUS_TOKEN", env.admin())];
        vars.extend(ca.map(|ca| ("NEXUS_CA_FILE", ca)));
        let r = env.ctl_with(&["get", "vms"], &vars);
        println!("nexusctl trusting {what}: exit {}\n{}", r.code, r.stderr.trim_end());
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.contains(&format!("TLS with the apiserver at {url} failed")), "{}", r.stderr);
        assert!(r.stderr.contains("UnknownIssuer"), "{}", r.stderr);
        assert!(r.stderr.contains("hint: the server's certificate is not signed by the CA you trust"), "{}", r.stderr);
    }
    // Plain HTTP to the TLS port: an answer in the error contract that
    // says what to do, not a hang or a reset.
    let plain = url.replace("https://", "http://");
    let r = env.ctl_with(&["get", "vms"], &[("NEXUS_SERVER", plain.as_str()), ("NEXUS_TOKEN", env.admin())]);
    println!("nexusctl over plain HTTP to the TLS port: exit {}\n{}", r.code, r.stderr.trim_end());
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("BadRequest (400): this port serves HTTPS and the request came as plain HTTP"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("hint: use an https:// URL"), "{}", r.stderr);
    // A CA file that is not one: a usage error that names it.
    let junk = env.file("junk.pem", "not a certificate\n");
    let r = env.ctl_with(&["get", "vms"], &[("NEXUS_SERVER", url.as_str()), ("NEXUS_CA_FILE", junk.to_str().unwrap())]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("junk.pem holds no PEM certificate"), "{}", r.stderr);
    // The right CA: works.
    assert_eq!(env.ctl(&["get", "vms"]).code, 0);
}

#[test]
fn get_describe_power_and_selectors() {
    let env = Env::new();
    for f in ["runner-1.yaml", "runner-2.yaml"] {
        let text = std::fs::read_to_string(repo_root().join("examples/gitops/runners").join(f)).unwrap();
        let p = env.file(f, &text);
        env.ok(&["apply", "-f", &s(&p)]);
    }
    let web = env.file("web.yaml", VM);
    env.ok(&["apply", "-f", &s(&web)]);
    assert_eq!(env.ok(&["get", "vms", "-l", "role=ci-runner", "-o", "name"]), "vm/runner-1\nvm/runner-2\n");
    assert_eq!(env.ok(&["get", "vms", "-o", "jsonpath={.items[*].metadata.name}"]).trim(), "runner-1 runner-2 web");
    assert_eq!(env.ok(&["start", "vm", "-l", "role=ci-runner"]), "vm/runner-1 started\nvm/runner-2 started\n");
    assert_eq!(
        env.ok(&["get", "vms", "--field-selector", "metadata.name=runner-2", "-o", "jsonpath={.items[0].spec.state}"])
            .trim(),
        "Running"
    );
    assert_eq!(env.ok(&["pause", "vm", "web"]), "vm/web paused\n");
    assert_eq!(env.ok(&["pause", "vm", "web"]), "vm/web unchanged\n");
    assert_eq!(env.ok(&["resume", "vm", "web"]), "vm/web resumed\n");
    assert_eq!(env.ok(&["stop", "vm", "runner-1"]), "vm/runner-1 stopped\n");
    let table = env.ok(&["get", "vms"]);
    assert!(table.starts_with("NAME      STATE    PHASE    NODE    VCPU  MEMORY  AGE"), "{table}");
    let all = env.ok(&["get", "vms", "-A"]);
    assert!(all.starts_with("PROJECT  NAME"), "{all}");
    // describe shows the spec, conditions and the object's events.
    let event = env.file("event.yaml", "apiVersion: nexus/v1\nkind: Event\nmetadata:\n  name: web-1\nspec:\n  involvedObject: {kind: VM, name: web, project: default}\n  type: Warning\n  reason: Failed\n  message: firecracker said no\n");
    env.ok(&["apply", "-f", &s(&event)]);
    let d = env.ok(&["describe", "vm", "web"]);
    assert!(d.contains("Name:               web") && d.contains("memMib: 128") && d.contains("Warning  Failed"), "{d}");
    // explain and completion.
    assert!(env.ok(&["explain", "vm.spec.vcpu"]).contains("even number"));
    assert_eq!(env.ctl(&["explain", "vm.spec.cpus"]).code, 1);
    assert!(env.ok(&["completion", "bash"]).contains("nexusctl"));
    assert!(env.ok(&["completion", "zsh"]).contains("#compdef nexusctl"));
    assert!(env.ok(&["completion", "fish"]).contains("complete -c nexusctl"));
    // Several kinds at once, as kubectl lists them: a table each.
    let both = env.ok(&["get", "vms,events"]);
    assert!(
        both.contains("NAME      STATE") && both.contains("\n\n") && both.contains("firecracker said no"),
        "{both}"
    );
    assert_eq!(env.ok(&["get", "vm,event", "-o", "name"]), "vm/runner-1\nvm/runner-2\nvm/web\nevent/web-1\n");
    assert_eq!(env.ctl(&["get", "vms,events", "web"]).code, 2, "names go with one kind");
    // delete by selector, waiting until gone.
    assert_eq!(
        env.ok(&["delete", "vm", "-l", "role=ci-runner", "--wait"]),
        "vm \"runner-1\" deleted\nvm \"runner-2\" deleted\n"
    );
    assert_eq!(env.ctl(&["delete", "vm", "web", "--all"]).code, 2, "--all goes without names");
    assert_eq!(env.ok(&["delete", "vm", "--all", "--wait"]), "vm \"web\" deleted\n");
    let r = env.ctl(&["get", "vms"]);
    assert!(r.stderr.contains("No vms found in project default."), "{r:?}");
}

#[test]
fn contexts_supply_server_and_project_and_flags_override_them() {
    let env = Env::new();
    let url = env.server.url.clone();
    let none: &[(&str, &str)] = &[];
    let r = env.ctl_with(
        &[
            "config",
            "set-context",
            "dev",
            "--server",
            &url,
            "--certificate-authority",
            env.ca(),
            "--project",
            "team-a",
            "--token",
            env.admin(),
        ],
        none,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let config = std::fs::read_to_string(env.dir.path().join("config.yaml")).unwrap();
    assert!(config.contains(&format!("certificateAuthority: {}", env.ca())), "{config}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.dir.path().join("config.yaml")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the config file holds a token");
    assert_eq!(env.ctl_with(&["config", "current-context"], none).stdout, "dev\n");
    let f = env.file("web.yaml", VM);
    assert_eq!(env.ctl_with(&["apply", "-f", &s(&f)], none).stdout, "vm/web created\n");
    assert_eq!(
        env.ctl_with(&["get", "vms", "-A", "-o", "jsonpath={.items[0].metadata.project}"], none).stdout.trim(),
        "team-a"
    );
    assert_eq!(env.ctl_with(&["-p", "team-b", "apply", "-f", &s(&f)], none).stdout, "vm/web created\n");
    assert_eq!(env.ctl_with(&["get", "vms", "-A", "-o", "name"], none).stdout, "vm/web\nvm/web\n");
    assert!(env.ctl_with(&["config", "get-contexts"], none).stdout.contains("*        dev"));
    assert_eq!(env.ctl_with(&["config", "use-context", "prod"], none).code, 2);
    let v = env.ctl_with(&["version"], none);
    assert!(v.stdout.contains("Client Version: ") && v.stdout.contains("Server Version: "), "{v:?}");
}

#[test]
fn get_watch_prints_changes_as_they_happen() {
    use std::io::BufRead;
    let env = Env::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nexusctl"))
        .args(["get", "vms", "-w"])
        .env("NEXUS_SERVER", &env.server.url)
        .env("NEXUS_CA_FILE", env.ca())
        .env("NEXUS_TOKEN", env.admin())
        .env("NEXUS_CONFIG", env.dir.path().join("config.yaml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    // The header is printed once the list is in; the watch starts from the
    // list's version, so nothing written after this line is missed.
    let header = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the list's header");
    assert!(header.starts_with("NAME"), "{header}");
    let f = env.file("web.yaml", VM);
    env.ok(&["apply", "-f", &s(&f)]);
    env.ok(&["pause", "vm", "web"]);
    env.ok(&["delete", "vm", "web"]);
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lines.len() < 3 && std::time::Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            lines.push(l);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with("web") && lines[0].contains("Running"), "{lines:?}");
    assert!(lines[1].contains("Paused"), "{lines:?}");
    assert!(lines[2].ends_with("(deleted)"), "{lines:?}");
}

#[test]
fn scale_and_rollout_commands_edit_a_pool_and_refuse_other_kinds() {
    let env = Env::new();
    let pool = env.file(
        "pool.yaml",
        "apiVersion: nexus/v1\nkind: VMPool\nmetadata:\n  name: web\nspec:\n  replicas: 3\n  selector:\n    app: web\n  \
         template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      template: small\n",
    );
    env.ok(&["apply", "-f", &s(&pool)]);
    assert_eq!(env.ok(&["scale", "vmpool", "web", "--replicas", "7"]), "vmpool/web scaled\n");
    assert_eq!(env.ok(&["get", "vmpool", "web", "-o", "jsonpath={.spec.replicas}"]).trim(), "7");
    assert_eq!(env.ok(&["scale", "pool", "web", "--replicas", "7"]), "vmpool/web unchanged\n");
    assert_eq!(env.ok(&["rollout", "pause", "vmpool", "web"]), "vmpool/web paused\n");
    assert_eq!(env.ok(&["get", "vmpool", "web", "-o", "jsonpath={.spec.paused}"]).trim(), "true");
    assert_eq!(env.ok(&["rollout", "resume", "vmpool", "web"]), "vmpool/web resumed\n");
    // No controller has recorded revisions: nothing to go back to.
    let undo = env.ctl(&["rollout", "undo", "vmpool", "web", "--to-revision", "4"]);
    assert_eq!(undo.code, 1, "{undo:?}");
    assert!(undo.stderr.contains("has no revision 4"), "{}", undo.stderr);
    let wrong = env.ctl(&["scale", "vm", "web", "--replicas", "2"]);
    assert_eq!(wrong.code, 2, "{wrong:?}");
    assert!(wrong.stderr.contains("only VMPools have replicas"), "{}", wrong.stderr);
    // A pool's template is validated like a VM, under its own path.
    let bad = env.file(
        "bad.yaml",
        "apiVersion: nexus/v1\nkind: VMPool\nmetadata:\n  name: bad\nspec:\n  replicas: 3\n  selector:\n    app: other\n  \
         template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      template: small\n      vcpu: 3\n",
    );
    let r = env.ctl(&["apply", "-f", &s(&bad)]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("spec.template.spec.vcpu") && r.stderr.contains("spec.selector"), "{}", r.stderr);
}
