//! A VMM stopped with SIGSTOP.

use std::path::Path;
use std::time::{Duration, Instant};

use nexus_e2e::{Cluster, in_private_netns, wait_until};

use super::{ready, vm_yaml};

#[test]
fn a_stopped_vmm_is_reported_as_not_answering_and_a_delete_still_ends_it() {
    in_private_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(dir.path(), "n1").await;
        cluster.apply(&vm_yaml("frozen", "/var/lib/nexus/images/rootfs.ext4"));
        cluster.apply(&vm_yaml("neighbour", "/var/lib/nexus/images/rootfs.ext4"));
        let frozen = cluster.wait_running("frozen").await;
        cluster.wait_running("neighbour").await;
        let pid = frozen.status_or_default().runtime.unwrap().pid.unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGSTOP).unwrap();
        let began = Instant::now();
        wait_until(Duration::from_secs(40), "the VM reported as not answering", || async {
            ready(&cluster.vm("frozen").await).is_some_and(|(_, reason, _)| reason == "VmmNotAnswering")
        })
        .await;
        let (status, reason, message) = ready(&cluster.vm("frozen").await).unwrap();
        println!("SIGSTOP on pid {pid}: {} ms later Ready {status} {reason}: {message}", began.elapsed().as_millis());
        assert_eq!(status, "False");
        // The agent is not blocked by it: its neighbour answers.
        let neighbour = cluster.vm("neighbour").await;
        let uid = neighbour.uid().to_string();
        let asked = Instant::now();
        let (code, body) = cluster.agent_call("GET", &format!("/v1/vms/{uid}/proxy/"), None).await;
        println!("the neighbour's VMM answered through the agent in {} ms", asked.elapsed().as_millis());
        assert_eq!(code, 200, "{body}");
        let deleting = Instant::now();
        let (ok, out, err) = cluster.nexusctl(&["delete", "vm", "frozen", "--wait", "--timeout", "60"]);
        assert!(ok, "{out}{err}");
        println!("delete of the stopped VM took {} ms", deleting.elapsed().as_millis());
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the stopped VMM is gone");
        cluster.stop();
    });
}
