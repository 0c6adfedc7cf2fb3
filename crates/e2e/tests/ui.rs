//! The web console in a real headless Chromium, driven over WebDriver,
//! against real apiserver, controller and agent processes: sign in, a VM
//! applied with nexusctl showing up live, a VM from a template in three
//! clicks, stop, start, the console log, delete, a refused action; and the
//! page's weight and first render with 1,000 VMs.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nexus_api::{Vm, VmSpec};
use nexus_e2e::webdriver::{Driver, chromium};
use nexus_e2e::{ApiServer, Backend, Cluster, in_private_netns, issue_token, repo_root};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

fn browsers() -> (PathBuf, PathBuf) {
    chromium().expect("the console tests need Debian's chromium and chromium-driver (hack/test.sh installs them)")
}

/// Where screenshots go: `docs/ui/` with `NEXUS_UPDATE_SCREENSHOTS=1`,
/// else a temporary directory (printed).
fn shots() -> PathBuf {
    if std::env::var_os("NEXUS_UPDATE_SCREENSHOTS").is_some() {
        let d = repo_root().join("docs").join("ui");
        std::fs::create_dir_all(&d).unwrap();
        return d;
    }
    let d = std::env::temp_dir().join(format!("nexus-ui-shots-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vm_yaml(name: &str, team: &str) -> String {
    format!(
        "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: {name}\n  labels:\n    team: {team}\nspec:\n  template: small\n  state: Running\n"
    )
}

#[test]
fn the_console_shows_the_fleet_live_and_starts_stops_follows_and_deletes_a_vm() {
    let (chromium, chromedriver) = browsers();
    in_private_netns(|| async move {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path(), "node-a").await;
        let client = cluster.client();
        let ctl = |args: &[&str]| {
            let (ok, out, err) = cluster.nexusctl(args);
            assert!(ok, "nexusctl {args:?}: {out}{err}");
            out
        };
        let file = dir.path().join("objects.yaml");
        let apply = |yaml: &str| {
            std::fs::write(&file, yaml).unwrap();
            ctl(&["apply", "-f", &file.display().to_string()])
        };
        apply(
            "apiVersion: nexus/v1\nkind: Template\nmetadata:\n  name: small\nspec:\n  vcpu: 1\n  memMib: 128\n  \
             kernel: /var/lib/nexus/images/vmlinux\n  rootfs: /var/lib/nexus/images/rootfs.ext4\n---\n\
             apiVersion: nexus/v1\nkind: RoleBinding\nmetadata:\n  name: val-views\nspec:\n  role: viewer\n  subjects: [\"user:val\"]\n",
        );
        let fleet: Vec<String> = ["build-1", "build-2", "web-1"]
            .iter()
            .map(|n| vm_yaml(n, if n.starts_with("web") { "web" } else { "ci" }))
            .collect();
        apply(&fleet.join("---\n"));
        let viewer = issue_token(&client, "user:val").await;
        // Their TAPs made before the browser starts (see `Browser::open`).
        nexus_e2e::wait_until(30 * SECOND, "the first VMs to run", || async {
            let vms =
                client.list::<VmSpec>(Some("default"), &Default::default()).await.map(|l| l.items).unwrap_or_default();
            vms.iter().filter(|v| v.status_or_default().phase == nexus_api::VmPhase::Running).count() == 3
        })
        .await;

        let driver = Driver::start(&chromedriver, &dir.path().join("chromedriver.log")).await;
        let browser = driver.session(&chromium, 1280, 800).await;
        let ui = format!("{}/ui/", cluster.server);

        // Sign in.
        browser.open(&ui).await;
        browser.wait_for("#signin:not([hidden])", 10 * SECOND).await;
        browser.type_into("#token", &cluster.admin_token).await;
        browser.click("#signin-button").await;
        browser.wait_for("tr[data-name='web-1']", 10 * SECOND).await;
        browser.wait_text("#subject", "user:", 5 * SECOND).await;
        let form =
            browser.script("return getComputedStyle(document.getElementById('signin')).display;", json!([])).await;
        assert_eq!(form, json!("none"), "the sign-in form is gone once signed in");
        let projects = browser.text("#project").await;
        println!("signed in as {}; projects offered: {projects:?}", browser.text("#subject").await);
        assert!(projects.contains("default"));

        // A VM applied with nexusctl shows up without a reload.
        browser.script("window.nexusMarker = 42;", json!([])).await;
        apply(&vm_yaml("from-cli", "ci"));
        let applied = Instant::now();
        browser.wait_for("tr[data-name='from-cli']", 3 * SECOND).await;
        let shown = applied.elapsed();
        println!("a VM applied with nexusctl appeared in the list {} ms later, without a reload", shown.as_millis());
        assert!(shown < SECOND, "within 1 s, not {shown:?}");
        assert_eq!(
            browser.script("return window.nexusMarker;", json!([])).await,
            json!(42),
            "the page was not reloaded"
        );

        // Filtering by label and sorting.
        browser.type_into("#filter", "team=web").await;
        browser.wait_text("#count", "1 of", 2 * SECOND).await;
        assert_eq!(browser.find_all("#vms tbody tr").await.len(), 1);
        browser.type_into("#filter", "").await;
        browser.wait_text("#count", "4 of 4", 2 * SECOND).await;
        browser.click("#vms th:nth-child(2) button").await;
        println!(
            "filter team=web: 1 row; name sorted descending, first row: {:?}",
            browser.text("#vms tbody").await.lines().next()
        );

        // Wait for the fleet to run, for the screenshot.
        browser.wait_text("#vms tbody", "Running", 20 * SECOND).await;
        tokio::time::sleep(2 * SECOND).await;
        let shots = shots();
        browser.screenshot(&shots.join("fleet.png")).await;

        // The overview: its numbers are the API's.
        browser.click("nav a[href='#/overview']").await;
        let vms = client.list::<VmSpec>(Some("default"), &Default::default()).await.unwrap().items;
        let running = vms.iter().filter(|v| v.status_or_default().phase == nexus_api::VmPhase::Running).count();
        browser.wait_text("#phase-Running", &running.to_string(), 10 * SECOND).await;
        let node = client.list::<nexus_api::NodeSpec>(None, &Default::default()).await.unwrap().items.remove(0);
        let (used, cap) = (node.status_or_default().allocated, node.status_or_default().capacity);
        let want = format!("{} / {}", used.vms, cap.max_vms);
        browser.wait_text(&format!("#node-{}-vms", node.name()), &want, 10 * SECOND).await;
        browser.wait_text("#overview-rate-text", "created", 10 * SECOND).await;
        println!(
            "overview: {running} Running of {} (API: the same), node {} VMs {want}; {}",
            vms.len(),
            node.name(),
            browser.text("#overview-rate-text").await
        );
        browser.screenshot(&shots.join("overview.png")).await;

        // A VM from a template in three clicks.
        let clicked = Instant::now();
        browser.click("nav a[href='#/templates']").await;
        browser.click("button[data-template='small']").await;
        browser.click("#create-vm").await;
        browser.wait_text("#vm-phase", "Running", 30 * SECOND).await;
        let hash = browser.script("return location.hash;", json!([])).await;
        let name = hash.as_str().unwrap().trim_start_matches("#/vm/").to_string();
        println!(
            "three clicks (Templates, Start VM from small, Create and start): {name} Running {} ms after the first",
            clicked.elapsed().as_millis()
        );
        let vm: Vm = client.get::<VmSpec>("default", &name).await.unwrap();
        assert_eq!(vm.spec.template.as_deref(), Some("small"));
        // Its template, its drives and their limits are on its page.
        browser.wait_text("#vm-made", "Template small at revision", 10 * SECOND).await;
        browser.wait_text("#vm-drives", "root filesystem", 10 * SECOND).await;
        println!("template: {:?}; drives: {:?}", browser.text("#vm-made").await, browser.text("#vm-drives").await);

        // Its own events, not those of an earlier VM of its name.
        let earlier = nexus_api::Event::new(
            "ev-earlier-vm",
            None,
            nexus_api::EventSpec {
                involved_object: nexus_api::event::ObjectReference {
                    kind: "VM".into(),
                    name: name.clone(),
                    project: Some("default".into()),
                    uid: Some("an-earlier-vm".into()),
                },
                type_: nexus_api::event::EventType::Warning,
                reason: "EarlierVm".into(),
                message: "about a VM deleted before this one was made".into(),
                count: 1,
                first_timestamp: Some(chrono::Utc::now()),
                last_timestamp: Some(chrono::Utc::now()),
                reporting_component: "test".into(),
            },
        );
        client.record_events(vec![earlier]).await.unwrap();
        browser.wait_text("#vm-events", "Started", 10 * SECOND).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let shown = browser.text("#vm-events").await;
        println!("its events: {shown:?}");
        assert!(!shown.contains("EarlierVm"), "an earlier VM's event is not this one's: {shown}");

        // Its console, followed live.
        browser.wait_text("#console", "login: booted", 15 * SECOND).await;
        browser.wait_text("#console", "guest alive", 15 * SECOND).await;
        println!("console followed: {:?}", browser.text("#console").await.lines().last());

        // Stop and start.
        browser.click("#vm-stop").await;
        browser.wait_text("#vm-phase", "Stopped", 20 * SECOND).await;
        browser.click("#vm-start").await;
        browser.wait_text("#vm-phase", "Running", 20 * SECOND).await;
        browser.click("#vm-pause").await;
        browser.wait_text("#vm-phase", "Paused", 20 * SECOND).await;
        browser.click("#vm-resume").await;
        browser.wait_text("#vm-phase", "Running", 20 * SECOND).await;
        browser.click("#vm-snapshot").await;
        let snapped = Instant::now();
        let snapshot = loop {
            let snaps =
                client.list::<nexus_api::SnapshotSpec>(Some("default"), &Default::default()).await.unwrap().items;
            if let Some(s) = snaps.into_iter().find(|s| s.spec.vm_name == name) {
                break s;
            }
            assert!(snapped.elapsed() < 5 * SECOND, "no Snapshot of {name}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!("stopped, started, paused, resumed and snapshotted ({}) from its page", snapshot.name());
        // Every form field has a label a screen reader can read.
        let unlabelled = browser
            .script(
                "return [...document.querySelectorAll('input, select, textarea')]\
                 .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).length;",
                json!([]),
            )
            .await;
        assert_eq!(unlabelled, json!(0), "every field is labelled");
        browser.wait_text("#charts", "CPU", 15 * SECOND).await;
        browser.screenshot(&shots.join("vm.png")).await;

        // Delete, after a confirmation.
        browser.click("#vm-delete").await;
        browser.click("#confirm-yes").await;
        let deleted = Instant::now();
        loop {
            match client.get::<VmSpec>("default", &name).await {
                Err(e) if e.is_not_found() => break,
                _ => {
                    assert!(deleted.elapsed() < 30 * SECOND, "VM {name} still there");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        browser.wait_for("table#vms", 5 * SECOND).await;
        println!("deleted from its page; gone {} ms after the confirmation", deleted.elapsed().as_millis());

        // Create from YAML: an error is shown at its line, nothing is stored.
        browser.goto(&format!("{ui}#/create")).await;
        browser
            .type_into(
                "#yaml",
                "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: bad-yaml\nspec:\n  template: small\n  vcpu: 3\n",
            )
            .await;
        browser.click("#yaml-validate").await;
        browser.wait_text("#yaml-errors", "line 7", 5 * SECOND).await;
        println!("invalid YAML: {:?}", browser.text("#yaml-errors").await);
        assert!(client.get::<VmSpec>("default", "bad-yaml").await.unwrap_err().is_not_found());

        // A refused action shows the API's message and suggestion.
        browser.click("#signout").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        browser.open(&ui).await;
        browser.wait_for("#signin:not([hidden])", 10 * SECOND).await;
        browser.type_into("#token", &viewer).await;
        browser.click("#signin-button").await;
        browser.wait_for("tr[data-name='from-cli']", 10 * SECOND).await;
        browser.goto(&format!("{ui}#/vm/from-cli")).await;
        browser.wait_text("#vm-phase", "Running", 10 * SECOND).await;
        browser.click("#vm-stop").await;
        browser.wait_text("#vm-error", "may not update", 5 * SECOND).await;
        println!("a viewer's Stop was refused: {:?}", browser.text("#vm-error").await);
        let still = client.get::<VmSpec>("default", "from-cli").await.unwrap();
        assert_eq!(still.spec.state, nexus_api::PowerState::Running, "nothing changed");

        // A narrow window still works.
        let narrow = driver.session(&chromium, 420, 800).await;
        narrow.open(&ui).await;
        narrow.wait_for("#signin:not([hidden])", 10 * SECOND).await;
        narrow.type_into("#token", &cluster.admin_token).await;
        narrow.click("#signin-button").await;
        narrow.wait_for("tr[data-name='from-cli']", 10 * SECOND).await;
        let overflow = narrow.script("return document.documentElement.scrollWidth;", json!([])).await;
        println!("at 420 px wide the page is {overflow} px wide");
        assert!(overflow.as_u64().unwrap() <= 440, "no sideways scrolling: {overflow}");
        narrow.quit().await;
        browser.quit().await;
        println!("screenshots in {}", shots.display());
    });
}

#[test]
fn the_console_weighs_little_and_lists_a_thousand_vms_quickly() {
    let (chromium, chromedriver) = browsers();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let server = ApiServer::start(&Backend::Sqlite(dir.path().join("data")), dir.path(), &[]).await;
        let client = server.client();
        // The page's own bytes, as served.
        let http = nexus_e2e::https_client(server.ca.as_ref().unwrap());
        let mut weight = 0;
        let modules = [
            "/ui/js/api.js",
            "/ui/js/dom.js",
            "/ui/js/list.js",
            "/ui/js/live.js",
            "/ui/js/views/events.js",
            "/ui/js/views/images.js",
            "/ui/js/views/nodes.js",
            "/ui/js/views/overview.js",
            "/ui/js/views/pools.js",
            "/ui/js/views/snapshots.js",
            "/ui/js/views/templates.js",
            "/ui/js/views/vm.js",
            "/ui/js/views/vm-storage.js",
            "/ui/js/views/vms.js",
            "/ui/js/views/yaml.js",
        ];
        for path in ["/ui/", "/ui/app.js", "/ui/app.css"].into_iter().chain(modules) {
            let resp = http.get(format!("{}{path}", server.url)).send().await.unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            let csp = resp.headers().get("content-security-policy").map(|v| v.to_str().unwrap().to_string());
            assert!(csp.unwrap_or_default().contains("default-src 'self'"), "{path} forbids anything from elsewhere");
            let n = resp.bytes().await.unwrap().len();
            println!("{path}: {n} bytes");
            weight += n;
        }
        println!(
            "page weight (HTML + JS modules + CSS): {weight} bytes ({:.1} KiB), nothing else is fetched",
            weight as f64 / 1024.0
        );
        assert!(weight < 100_000);

        // 1,000 VMs (no controller runs: they stay Pending, as stored).
        let started = Instant::now();
        futures::stream::iter(0..1000)
            .map(|i| {
                let client = client.clone();
                async move {
                    let spec = VmSpec { template: Some("small".into()), ..Default::default() };
                    client.create(&Vm::new(&format!("vm-{i:04}"), Some("default"), spec)).await.unwrap();
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        println!("1,000 VMs stored in {} ms", started.elapsed().as_millis());

        let driver = Driver::start(&chromedriver, &dir.path().join("chromedriver.log")).await;
        let browser = driver.session(&chromium, 1280, 800).await;
        browser.open(&format!("{}/ui/", server.url)).await;
        browser.wait_for("#signin:not([hidden])", 10 * SECOND).await;
        browser.type_into("#token", server.admin_token.as_deref().unwrap()).await;
        let t0 = Instant::now();
        browser.click("#signin-button").await;
        browser.wait_text("#count", "1000 of 1000", 20 * SECOND).await;
        let first = t0.elapsed();
        let rows = browser.find_all("#vms tbody tr").await.len();
        println!("sign-in to 1,000 VMs listed: {} ms ({rows} rows)", first.as_millis());
        assert_eq!(rows, 1000);
        // Reloading the page (token kept for the tab) to a full list.
        let t1 = Instant::now();
        browser.script("location.reload();", json!([])).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        browser.wait_text("#count", "1000 of 1000", 20 * SECOND).await;
        println!("reload to 1,000 VMs listed: {} ms", t1.elapsed().as_millis());
        browser.quit().await;
    });
}
