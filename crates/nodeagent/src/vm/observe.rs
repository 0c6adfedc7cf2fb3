//! Observation: what is on the host for a VM (its VMM and the state it
//! reports, its TAP, address, start and exit records, its readiness probe),
//! as the report the controller turns into the VM's status.

use nexus_api::agent::{EnsureVm, ObservedState, VmReport};

use super::files::{read_ip, read_pid, read_restarts, read_started};
use super::owner::VmOwner;
use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::firecracker::models::InstanceState;
use crate::paths::Uid;

impl VmOwner {
    /// What is on the host for the VM. `reported` is the state its VMM
    /// reported a moment ago in the same command, if the caller has it
    /// (the VMM is not asked again).
    pub async fn observe(&self, reported: Option<InstanceState>) -> Result<VmReport, AgentError> {
        let uid = &self.uid;
        let paths = self.host.paths(uid)?;
        if !paths.dir.exists() {
            return Ok(absent(uid));
        }
        let tap = uid.tap_name();
        let tap_exists = crate::host::net::exists(&tap)?;
        let pid = read_pid(&paths).filter(|pid| self.host.vmms.is_vmm(*pid, uid.as_str()));
        let reported = match (pid, reported) {
            (None, _) => None,
            (Some(_), Some(state)) => Some(state),
            (Some(_), None) => FcClient::new(paths.socket()).describe_instance().await.ok().map(|i| i.state),
        };
        let state = match (pid, reported) {
            (None, _) if paths.kept_down().exists() => ObservedState::Exited,
            (None, _) => ObservedState::Stopped,
            (Some(_), Some(InstanceState::Running)) => ObservedState::Running,
            (Some(_), Some(InstanceState::Paused)) => ObservedState::Paused,
            (Some(_), _) => ObservedState::Stopped,
        };
        let (started_at, boot_millis) = read_started(&paths);
        // A restored guest has its source's MAC, whatever was asked; its
        // TAP is in its VMM's namespace, there while the VMM is.
        let restored = super::snapshots::restored(&paths);
        let config = std::fs::read(paths.config()).ok().and_then(|b| serde_json::from_slice::<EnsureVm>(&b).ok());
        let mac = match &restored {
            Some(r) => Some(r.mac.clone()),
            None => config.as_ref().map(|c| c.mac.clone()),
        };
        let ip = read_ip(&paths);
        let probe = match (config.as_ref().and_then(|c| c.probe.as_ref()), pid) {
            (Some(probe), Some(pid)) if state == ObservedState::Running => {
                let start = std::fs::read_to_string(paths.console_offset())
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0);
                Some(self.probes.run(uid.as_str(), pid, probe, &paths.console(), start, ip).await)
            }
            _ => None,
        };
        let tap_exists = if restored.is_some() { pid.is_some() } else { tap_exists };
        Ok(VmReport {
            uid: uid.to_string(),
            state,
            runtime: nexus_api::vm::VmRuntime {
                pid,
                socket_path: pid.map(|_| paths.socket().display().to_string()),
                tap_name: tap_exists.then_some(tap),
                mac,
                ip: ip.map(|ip| ip.to_string()),
                log_path: Some(paths.log().display().to_string()),
                console_path: Some(paths.console().display().to_string()),
                started_at: if pid.is_some() { started_at } else { None },
                boot_millis: if pid.is_some() { boot_millis } else { None },
                restarts: read_restarts(&paths),
                exit: std::fs::read(paths.last_exit()).ok().and_then(|b| serde_json::from_slice(&b).ok()),
                drives: pid
                    .and_then(|_| std::fs::read(paths.started_drives()).ok())
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default(),
                limits: pid
                    .and_then(|_| std::fs::read(paths.limits()).ok())
                    .and_then(|b| serde_json::from_slice(&b).ok()),
                restart_pending: pid.and(config.as_ref()).and_then(|c| super::drives::restart_pending(&paths, c)),
                mmds: pid.and_then(|_| super::mmds::recorded(&paths)),
            },
            probe,
        })
    }
}

/// The report of a VM nothing of which is on the host.
pub fn absent(uid: &Uid) -> VmReport {
    VmReport { uid: uid.to_string(), state: ObservedState::Absent, runtime: Default::default(), probe: None }
}
