//! A token's life on two apiservers of one PostgreSQL, node credentials
//! rotated without a restart, and a burst of first token checks.

use super::*;

#[test]
fn a_token_is_used_rotated_and_revoked_on_two_apiservers_of_one_postgres() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let backend = Backend::Postgres(pg.fresh_database());
        let a = ApiServer::start(&backend, dir.path(), &[]).await;
        let b = ApiServer::start(&backend, dir.path(), &[]).await;
        let admin_token = a.admin_token.clone().unwrap();
        let admin = a.client();
        let bind = json!({"apiVersion": "nexus/v1", "kind": "RoleBinding", "metadata": {"name": "alice"},
                          "spec": {"role": "viewer", "subjects": ["user:alice"]}});
        assert_eq!(
            As::at(&a, Some(&admin_token)).call("POST", "/v1/projects/p/rolebindings", Some(&bind)).await.0,
            201
        );
        let issued = admin
            .create_token(&TokenRequest {
                subject: Some("user:alice".into()),
                description: "laptop".into(),
                ttl_seconds: None,
            })
            .await
            .unwrap();
        // a and b share a CA (one test directory): one client trusts both.
        let http = a.http();
        let works = |url: &str, token: &str| {
            let c = As::new(http.clone(), url, Some(token));
            async move { c.call("GET", "/v1/projects/p/vms", None).await.0 }
        };
        assert_eq!((works(&a.url, &issued.token).await, works(&b.url, &issued.token).await), (200, 200));
        let listed = admin.list_tokens(Some("user:alice")).await.unwrap().items;
        assert!(listed[0].last_used_at.is_some(), "last use is recorded");
        assert!(serde_json::to_string(&listed).unwrap().find(&issued.token[23..]).is_none(), "never the secret");

        // Rotation: both work during the grace, only the new one after.
        let alice = b.client_with(&issued.token);
        let rotated = alice.rotate_token(&issued.info.id, &RotateRequest { grace_seconds: Some(2) }).await.unwrap();
        for url in [&a.url, &b.url] {
            assert_eq!(works(url, &issued.token).await, 200, "old token in its grace on {url}");
            assert_eq!(works(url, &rotated.token).await, 200, "new token on {url}");
        }
        tokio::time::sleep(Duration::from_millis(2600)).await;
        for url in [&a.url, &b.url] {
            assert_eq!(works(url, &issued.token).await, 401, "old token after its grace on {url}");
            assert_eq!(works(url, &rotated.token).await, 200);
        }
        println!("rotation: both tokens worked on both apiservers for the 2 s grace, then only the new one");

        // Revocation through A: both refuse it within a second.
        admin.revoke_token(&rotated.info.id).await.unwrap();
        let revoked = Instant::now();
        let mut took = BTreeMap::new();
        while took.len() < 2 {
            for (name, url) in [("A", &a.url), ("B", &b.url)] {
                if !took.contains_key(name) && works(url, &rotated.token).await == 401 {
                    took.insert(name, revoked.elapsed());
                }
            }
            assert!(revoked.elapsed() < Duration::from_secs(5), "{took:?}");
        }
        println!("revoked on A: refused by A after {:?}, by B after {:?}", took["A"], took["B"]);
        assert!(took.values().all(|d| *d <= Duration::from_secs(1)), "{took:?}");
    });
}

#[test]
fn node_credentials_rotate_without_a_restart_and_calls_keep_working() {
    nexus_e2e::in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster =
            nexus_e2e::Cluster::start_with(dir.path(), "node-a", &["--credential-rotation-secs", "2"]).await;
        let client = cluster.client();
        let (ok, _, err) =
            cluster.nexusctl(&["apply", "-f", &nexus_e2e::repo_root().join("examples/vm.yaml").display().to_string()]);
        assert!(ok, "{err}");
        nexus_e2e::wait_until(Duration::from_secs(30), "hello Running", || async {
            vm_status(&client, "hello").await.phase == nexus_api::VmPhase::Running
        })
        .await;
        let agent_pid = cluster.agent.pid();
        let log = dir.path().join("agent.log");
        nexus_e2e::wait_until(Duration::from_secs(20), "two rotations", || async {
            std::fs::read_to_string(&log).unwrap_or_default().matches("rotated the node token").count() >= 2
        })
        .await;
        // The controller's cached credential is stale now: it reads it again.
        for (state, phase) in [
            (nexus_api::PowerState::Paused, nexus_api::VmPhase::Paused),
            (nexus_api::PowerState::Running, nexus_api::VmPhase::Running),
        ] {
            let mut vm = client.get::<nexus_api::VmSpec>("default", "hello").await.unwrap();
            vm.spec.state = state;
            client.replace(&vm).await.unwrap();
            nexus_e2e::wait_until(Duration::from_secs(20), "the power change", || async {
                vm_status(&client, "hello").await.phase == phase
            })
            .await;
        }
        assert_eq!(cluster.agent.pid(), agent_pid, "the same agent process");
        let node = client.get::<nexus_api::NodeSpec>("", "node-a").await.unwrap().status_or_default();
        assert!(node.is_ready(chrono::Utc::now(), chrono::Duration::seconds(4)), "still heartbeating");
        let tokens = client.list_tokens(Some("node:node-a")).await.unwrap().items;
        let rotated = tokens.iter().filter(|t| t.replaced_by.is_some()).count();
        println!(
            "node-a's tokens: {} issued, {rotated} rotated away; the VM paused and resumed across rotations",
            tokens.len()
        );
        assert!(rotated >= 2);
        let (ok, _, err) = cluster.nexusctl(&["delete", "vm", "hello", "--wait"]);
        assert!(ok, "{err}");
        cluster.stop();
    });
}

/// Each first use of a token costs the apiserver a 19 MiB Argon2 block on a
/// thread of its own. A burst of them (new tokens, each used by several
/// requests at once) must not leave that memory with the process.
#[test]
fn a_burst_of_first_token_checks_leaves_the_apiserver_small() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let server = ApiServer::start(&Backend::Sqlite(dir.path().join("data")), dir.path(), &[]).await;
        let admin = server.client();
        let mut tokens = Vec::new();
        for i in 0..12 {
            tokens.push(issue(&admin, &format!("user:burst-{i}")).await);
        }
        let callers: Vec<As> = tokens.iter().flat_map(|t| (0..4).map(|_| As::at(&server, Some(t)))).collect();
        let answers = futures::future::join_all(
            callers.iter().map(|who| async move { who.call("GET", "/v1/whoami", None).await.0 }),
        )
        .await;
        assert!(answers.iter().all(|code| *code == 200), "{answers:?}");
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.proc.pid())).unwrap();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        // 60 checks of 19 MiB: about 1.1 GiB if the blocks stayed.
        assert!(rss_kib < 150 * 1024, "the apiserver holds {rss_kib} KiB after the checks");
    });
}
