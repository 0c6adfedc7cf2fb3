//! What may change on a booted VM: its machine (refused), its drives and
//! network interfaces (rate limiters, backing files).

use super::*;

impl Vmm {
    pub(super) fn post_boot(&self) -> Result<(), Reply> {
        if self.state == InstanceState::NotStarted { Err(Reply::fault(400, NOT_SUPPORTED_BEFORE_BOOT)) } else { Ok(()) }
    }

    pub(super) fn patch_machine_config(&mut self, body: &[u8]) -> Reply {
        let patch: MachineConfigPatch = attempt!(parse(body));
        attempt!(self.pre_boot());
        let mut next = self.machine.clone();
        if let Some(v) = patch.vcpu_count {
            next.vcpu_count = v;
        }
        if let Some(m) = patch.mem_size_mib {
            next.mem_size_mib = m;
        }
        if let Some(smt) = patch.smt {
            next.smt = smt;
        }
        if let Some(t) = patch.track_dirty_pages {
            next.track_dirty_pages = t;
        }
        if let Some(h) = patch.huge_pages {
            next.huge_pages = h;
        }
        let body = serde_json::to_vec(&next).unwrap_or_default();
        self.put_machine_config(&body)
    }

    pub(super) fn patch_drive(&mut self, id: &str, body: &[u8]) -> Reply {
        let patch: PartialDrive = attempt!(parse(body));
        attempt!(same_id(&patch.drive_id, id));
        attempt!(self.post_boot());
        let Some(drive) = self.drives.iter_mut().find(|d| d.drive_id == id) else {
            return Reply::fault(
                400,
                "Drive config error: Unable to patch the block device: Failed perform action on device: Device not found Please verify the request arguments.",
            );
        };
        // Neither a path nor a limiter: an update for a vhost-user drive,
        // which a file-backed drive refuses.
        if patch.path_on_host.is_none() && patch.rate_limiter.is_none() && drive.socket.is_none() {
            return Reply::fault(
                400,
                "Drive config error: Unable to patch the block device: Block: Running method expected different backend. Please verify the request arguments.",
            );
        }
        if let Some(path) = &patch.path_on_host {
            let read_only = drive.is_read_only.unwrap_or(false);
            if let Err(e) = OpenOptions::new().read(true).write(!read_only).open(path) {
                return Reply::fault(
                    400,
                    format!(
                        "Drive config error: Unable to patch the block device: Block: Virtio backend error: Error manipulating the backing file: {e} {path} Please verify the request arguments."
                    ),
                );
            }
            drive.path_on_host = Some(path.clone());
        }
        if let Some(update) = &patch.rate_limiter {
            drive.rate_limiter = RateLimiter::updated(drive.rate_limiter.take(), update);
        }
        Reply::no_content()
    }

    pub(super) fn patch_net(&mut self, id: &str, body: &[u8]) -> Reply {
        let patch: PartialNetworkInterface = attempt!(parse(body));
        attempt!(same_iface(&patch.iface_id, id));
        attempt!(self.post_boot());
        let Some(net) = self.nets.get_mut(id) else {
            return Reply::fault(
                400,
                "Network config error: Unable to update the net device: Failed perform action on device: Device not found",
            );
        };
        if let Some(update) = &patch.rx_rate_limiter {
            net.rx_rate_limiter = RateLimiter::updated(net.rx_rate_limiter.take(), update);
        }
        if let Some(update) = &patch.tx_rate_limiter {
            net.tx_rate_limiter = RateLimiter::updated(net.tx_rate_limiter.take(), update);
        }
        Reply::no_content()
    }
}
