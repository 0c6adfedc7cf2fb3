//! Ensure: bringing a VM to the state its request asks for (started,
//! paused, resumed or stopped), applying its restart policy when its VMM
//! ended on its own, and reporting what is there. Every step is idempotent:
//! a retry after a timeout or an agent crash is always safe.

use std::time::Duration;

use nexus_api::PowerState;
use nexus_api::agent::{EnsureVm, VmReport};

use super::files::{read_pid, read_restarts, remove_if_exists};
use super::owner::VmOwner;
use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::firecracker::models::{InstanceState, VmState};
use crate::host::process;
use crate::paths::VmPaths;

/// How long a running VMM gets to answer before it counts as not answering.
const STALL: Duration = Duration::from_secs(2);

impl VmOwner {
    /// Brings the VM to `req.state` and reports what is there.
    pub async fn ensure(&self, req: &EnsureVm) -> Result<VmReport, AgentError> {
        super::request::validate(req)?;
        let uid = &self.uid;
        let paths = self.host.paths(uid)?;
        let vmms = &self.host.vmms;
        let mut source = None;
        if let Some(from) = &req.restore
            && req.state != PowerState::Stopped
            && !read_pid(&paths).is_some_and(|pid| vmms.is_vmm(pid, uid.as_str()))
        {
            // A VMM is about to start from it: refuse before making anything.
            source = Some(self.host.snapshot_source(from).await?);
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&paths.dir)
                .map_err(AgentError::io(format!("creating {}", paths.dir.display())))?;
        }
        let config = serde_json::to_vec_pretty(req).unwrap_or_default();
        // Rewritten only when it changed: most calls are rechecks.
        if std::fs::read(paths.config()).ok().as_deref() != Some(config.as_slice()) {
            std::fs::write(paths.config(), config).map_err(AgentError::io("writing vm.json"))?;
            self.host.config_written();
        }
        if req.state == PowerState::Stopped {
            self.stop_vmm(&paths).await;
            self.host.net.delete_link(&uid.tap_name()).await?;
            // A stop ends a kept-down exit: the next start is a fresh one.
            remove_if_exists(&paths.kept_down())?;
            self.host.config_written();
            return self.observe(None).await;
        }
        if paths.kept_down().exists() {
            return self.observe(None).await;
        }
        let client = FcClient::new(paths.socket());
        let mut info = None;
        let recorded = read_pid(&paths);
        match recorded.filter(|pid| vmms.is_vmm(*pid, uid.as_str())) {
            // A VMM answers in milliseconds; one that does not within 2 s is
            // stopped or stuck, and its VM's owner must not wait long on it.
            Some(pid) => match FcClient::new(paths.socket()).with_request_timeout(STALL).describe_instance().await {
                Ok(i) if i.state != InstanceState::NotStarted => info = Some(i),
                // A booted VMM that does not answer may be on its way out (a
                // guest powering off) or stuck: killing it would hide an
                // exit the restart policy must see. Report; the caller
                // comes back, and by then it answers or it has ended.
                Err(source) if paths.started().exists() => {
                    return Err(AgentError::Firecracker { step: "describe the running VMM", source });
                }
                // Configured halfway (the agent died mid-create): start over.
                _ => self.host.stop_vmm(pid, uid.as_str(), Duration::ZERO).await,
            },
            // It booted, and its process ended without being asked to.
            None if recorded.is_some() && paths.started().exists() => {
                let pid = recorded.unwrap_or_default();
                if !self.ended_on_its_own(&paths, pid, req.restart_policy).await? {
                    return self.observe(None).await;
                }
            }
            None => {}
        }
        let info = match info {
            Some(i) => {
                // A VMM that runs on: its I/O limits and its guest's
                // document follow the request.
                self.apply_limits(&paths, req, &client).await?;
                self.apply_mmds(&paths, req, &client).await?;
                i
            }
            None => self.start(&paths, req, source, &client).await?,
        };
        let change = match (req.state, info.state) {
            (PowerState::Paused, InstanceState::Running) => Some((VmState::Paused, "pause", InstanceState::Paused)),
            (PowerState::Running, InstanceState::Paused) => Some((VmState::Resumed, "resume", InstanceState::Running)),
            _ => None,
        };
        let state = match change {
            Some((to, step, after)) => {
                client.set_vm_state(to).await.map_err(|source| AgentError::Firecracker { step, source })?;
                after
            }
            None => info.state,
        };
        // The VMM has just said what state it is in: not asked again.
        self.observe(Some(state)).await
    }

    /// Records how VMM `pid` ended on its own and applies `policy`: returns
    /// whether to start it again. When not, the VM is kept down (its TAP
    /// and socket go; its directory, disk and logs stay) until a stop is
    /// asked for.
    async fn ended_on_its_own(
        &self,
        paths: &VmPaths,
        pid: u32,
        policy: nexus_api::vm::RestartPolicy,
    ) -> Result<bool, AgentError> {
        let exit = process::reaped(&paths.reaped(), pid, Duration::from_millis(500)).await;
        let recorded = exit.clone().unwrap_or(nexus_api::vm::VmExit { code: None, signal: None, at: None });
        std::fs::write(paths.last_exit(), serde_json::to_vec(&recorded).unwrap_or_default())
            .map_err(AgentError::io("recording the VMM's exit"))?;
        let again = policy.restarts(exit.as_ref());
        tracing::info!(uid = %self.uid, pid, exit = %recorded, ?policy, restart = again, "VMM ended on its own");
        if again {
            let restarts = read_restarts(paths) + 1;
            std::fs::write(paths.restarts(), restarts.to_string()).map_err(AgentError::io("counting restarts"))?;
            return Ok(true);
        }
        std::fs::write(paths.kept_down(), b"").map_err(AgentError::io("marking the VM kept down"))?;
        self.host.config_written();
        remove_if_exists(&paths.pid())?;
        remove_if_exists(&paths.socket())?;
        self.host.net.delete_link(&self.uid.tap_name()).await?;
        Ok(false)
    }
}
