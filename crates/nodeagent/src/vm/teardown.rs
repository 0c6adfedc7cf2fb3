//! Teardown: stopping a VM's VMM (the guest asked first, as a power
//! button would, then signals after the grace period) and removing all of
//! the VM from the host.

use std::time::Duration;

use nexus_api::agent::VmReport;

use super::files::{read_pid, remove_dir_all_settled};
use super::owner::VmOwner;
use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::host::process;
use crate::paths::VmPaths;

impl VmOwner {
    /// Stops the VM's VMM and removes its scope or cgroup, its TAP (or
    /// clone veth) and its run directory.
    pub async fn remove(&self) -> Result<VmReport, AgentError> {
        let uid = &self.uid;
        let host = &self.host;
        let paths = host.paths(uid)?;
        self.stop_vmm(&paths).await;
        if let Some(scopes) = &host.cfg.scopes
            && let Err(e) = scopes.stop(uid).await
        {
            tracing::warn!(uid = %uid, error = %e, "stopping the VM's scope failed");
        }
        if let Some(cg) = &host.cfg.cgroups
            && let Err(e) = cg.remove(uid)
        {
            tracing::warn!(uid = %uid, error = %e, "removing the VM's cgroup failed");
        }
        host.net.delete_link(&uid.tap_name()).await?;
        host.net.delete_link(&crate::host::clonenet::veth_name(uid)).await?;
        host.users.release(&paths);
        remove_dir_all_settled(&paths.dir).await?;
        self.probes.forget(uid.as_str());
        Ok(super::observe::absent(uid))
    }

    /// Stops every VMM of this VM: the one in the pid file and any a crash
    /// left unrecorded.
    pub(super) async fn stop_vmm(&self, paths: &VmPaths) {
        let uid = &self.uid;
        let vmms = &self.host.vmms;
        // Only a launch cut short leaves a VMM its pid file does not name:
        // the host's processes are searched then, not on every start.
        let mut pids: Vec<u32> = if paths.launching().exists() {
            vmms.find().into_iter().filter(|(_, id)| id == uid.as_str()).map(|(pid, _)| pid).collect()
        } else {
            Vec::new()
        };
        if let Some(pid) = read_pid(paths) {
            pids.push(pid);
        }
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            if !vmms.is_vmm(pid, uid.as_str()) {
                continue;
            }
            let ours = process::is_our_child(pid);
            self.host.exits.expect(pid);
            if !paths.started().exists() || process::stopped(pid) {
                // It never booted (a start cut short), or it is stopped and
                // answers nothing: no guest to ask.
                vmms.stop(pid, uid.as_str(), Duration::ZERO).await;
            } else {
                // Ask the guest first, as a power button would; then signals.
                let _ = FcClient::new(paths.socket())
                    .with_request_timeout(Duration::from_millis(500))
                    .send_ctrl_alt_del()
                    .await;
                if !process::wait_gone(pid, self.host.cfg.stop_grace).await {
                    vmms.stop(pid, uid.as_str(), Duration::from_millis(500)).await;
                }
            }
            // Gone means a zombie at least; our reaper still has to collect
            // it and write its record into the VM directory. Wait for that,
            // so nothing writes there once the caller moves on (a removal
            // racing the record fails with "Directory not empty").
            if ours && process::reaped(&paths.reaped(), pid, Duration::from_secs(2)).await.is_none() {
                tracing::warn!(uid = %uid, pid, "the VMM's exit was not recorded within 2 s");
            }
        }
        let _ = std::fs::remove_file(paths.socket());
        let _ = std::fs::remove_file(paths.pid());
        let _ = std::fs::remove_file(paths.launching());
    }
}
