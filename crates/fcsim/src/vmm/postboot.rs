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
        attempt!(self.post_boot());
        attempt!(same_id(&patch.drive_id, id));
        let Some(drive) = self.drives.get_mut(id) else {
            return Reply::fault(400, format!("Unable to patch the block device: Invalid block device ID: {id}"));
        };
        if let Some(path) = &patch.path_on_host {
            let read_only = drive.is_read_only.unwrap_or(false);
            if let Err(e) = OpenOptions::new().read(true).write(!read_only).open(path) {
                return Reply::fault(
                    400,
                    format!("Unable to patch the block device: Error manipulating the backing file: {e} {path}"),
                );
            }
            drive.path_on_host = Some(path.clone());
        }
        if patch.rate_limiter.is_some() {
            drive.rate_limiter = patch.rate_limiter;
        }
        Reply::no_content()
    }

    pub(super) fn patch_net(&mut self, id: &str, body: &[u8]) -> Reply {
        let patch: PartialNetworkInterface = attempt!(parse(body));
        attempt!(self.post_boot());
        attempt!(same_id(&patch.iface_id, id));
        let Some(net) = self.nets.get_mut(id) else {
            return Reply::fault(
                400,
                format!("Failed to update network interface: Invalid interface ID - not found: {id}"),
            );
        };
        if patch.rx_rate_limiter.is_some() {
            net.rx_rate_limiter = patch.rx_rate_limiter;
        }
        if patch.tx_rate_limiter.is_some() {
            net.tx_rate_limiter = patch.tx_rate_limiter;
        }
        Reply::no_content()
    }
}
