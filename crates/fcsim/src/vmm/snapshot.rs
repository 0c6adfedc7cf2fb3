//! Snapshots: writing the state and memory files of a paused VM, and
//! loading them into a fresh VMM.

use super::*;

impl Vmm {
    pub(super) fn snapshot_create(&mut self, body: &[u8]) -> Reply {
        let params: SnapshotCreate = attempt!(parse(body));
        attempt!(self.post_boot());
        if self.state != InstanceState::Paused {
            return Reply::fault(
                400,
                "Cannot create a snapshot: the microVM is not paused. Pause it first with PATCH /vm {\"state\": \"Paused\"}.",
            );
        }
        match params.snapshot_type.as_deref() {
            // Firecracker v1.16 takes a Diff snapshot without dirty-page
            // tracking too (all of memory is then written).
            None | Some("Full") | Some("Diff") => {}
            Some(other) => {
                return Reply::fault(
                    400,
                    format!(
                        "An error occurred when deserializing the json body of a request: unknown variant `{other}`, expected `Full` or `Diff`."
                    ),
                );
            }
        }
        let state = SnapshotState {
            magic: SNAPSHOT_MAGIC.into(),
            firecracker_version: EMULATED_VERSION.into(),
            machine: self.machine.clone(),
            boot: self.boot.clone(),
            drives: self.drives.clone(),
            nets: self.nets.values().cloned().collect(),
            mmds_config: self.mmds.config.clone(),
        };
        // Both files are created or truncated, as Firecracker does. Its
        // memory file holds every byte of guest memory; the simulator's is
        // sparse unless FIRECRACKER_SIM_DENSE_MEMORY is set, so that a
        // full disk shows as it would with Firecracker.
        let mem_bytes = (self.machine.mem_size_mib as u64) << 20;
        if let Err(e) = std::fs::write(&params.snapshot_path, serde_json::to_vec(&state).unwrap_or_default()) {
            return Reply::fault(
                400,
                format!("Create snapshot error: Cannot perform write on the snapshot backing file: {e}"),
            );
        }
        let dense = std::env::var_os("FIRECRACKER_SIM_DENSE_MEMORY").is_some();
        let memory = File::create(&params.mem_file_path)
            .and_then(|mut mem| if dense { write_zeros(&mut mem, mem_bytes) } else { mem.set_len(mem_bytes) });
        match memory {
            Ok(()) => {
                self.log("main", "INFO", &format!("Snapshot created at {}", params.snapshot_path));
                Reply::no_content()
            }
            Err(e) => Reply::fault(
                400,
                format!("Create snapshot error: Cannot write memory file: Cannot dump memory: Guest memory error: {e}"),
            ),
        }
    }

    /// `PUT /snapshot/load`. A load refused before it starts (a bad body,
    /// a VM already booted or configured) is answered and the VMM serves
    /// on; one that fails while loading (missing or bad files) ends the
    /// VMM after the answer, as Firecracker's does.
    pub(super) fn snapshot_load(&mut self, body: &[u8]) -> (Reply, After) {
        let refused = |reply| (reply, After::Nothing);
        let params: SnapshotLoad = match parse(body) {
            Ok(p) => p,
            Err(reply) => return refused(reply),
        };
        if self.state != InstanceState::NotStarted {
            return refused(Reply::fault(400, NOT_SUPPORTED_AFTER_BOOT));
        }
        if self.boot_configured {
            return refused(Reply::fault(
                400,
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ));
        }
        let mem_path = match (&params.mem_file_path, &params.mem_backend) {
            (Some(p), None) => p.clone(),
            (None, Some(b)) if b.backend_type == "File" => b.backend_path.clone(),
            (None, Some(b)) if b.backend_type == "Uffd" => {
                return refused(Reply::fault(400, "Uffd memory backends are not supported by firecracker-sim."));
            }
            (None, Some(b)) => {
                return refused(Reply::fault(
                    400,
                    format!(
                        "An error occurred when deserializing the json body of a request: unknown variant `{}`, expected `File` or `Uffd`.",
                        b.backend_type
                    ),
                ));
            }
            _ => {
                return refused(Reply::fault(
                    400,
                    "An error occurred when deserializing the json body of a request: missing field: either `mem_backend` or `mem_file_path` is required.",
                ));
            }
        };
        let reply = self.load(&params, &mem_path);
        // Firecracker cannot go on from a load that failed part-way: it exits.
        if reply.status >= 300 {
            return (reply, After::Fail);
        }
        (reply, self.after_running())
    }

    /// Loads the snapshot's files: the part of a load that, failing,
    /// leaves the VMM unusable.
    fn load(&mut self, params: &SnapshotLoad, mem_path: &str) -> Reply {
        let state: SnapshotState = match std::fs::read(&params.snapshot_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<SnapshotState>(&b).map_err(|e| e.to_string()))
        {
            Ok(s) if s.magic == SNAPSHOT_MAGIC => s,
            Ok(_) => {
                return Reply::fault(
                    400,
                    "Load snapshot error: Failed to restore from snapshot: invalid snapshot state file.",
                );
            }
            Err(e) => return Reply::fault(400, format!("Load snapshot error: Failed to restore from snapshot: {e}")),
        };
        let expected = (state.machine.mem_size_mib as u64) << 20;
        match std::fs::metadata(mem_path) {
            Ok(m) if m.len() == expected => {}
            Ok(m) => {
                return Reply::fault(
                    400,
                    format!(
                        "Load snapshot error: the memory file {mem_path} holds {} bytes, the snapshot needs {expected}.",
                        m.len()
                    ),
                );
            }
            Err(e) => {
                return Reply::fault(
                    400,
                    format!(
                        "Load snapshot error: Failed to restore from snapshot: cannot open memory file {mem_path}: {e}"
                    ),
                );
            }
        }
        let mut nets = state.nets.clone();
        for o in &params.network_overrides {
            match nets.iter_mut().find(|n| n.iface_id == o.iface_id) {
                Some(n) => n.host_dev_name = o.host_dev_name.clone(),
                None => {
                    return Reply::fault(
                        400,
                        format!(
                            "Load snapshot error: Invalid network configuration: no interface {} in the snapshot.",
                            o.iface_id
                        ),
                    );
                }
            }
        }
        for d in &state.drives {
            if let Some(path) = &d.path_on_host
                && let Err(e) = OpenOptions::new().read(true).write(!d.is_read_only.unwrap_or(false)).open(path)
            {
                return Reply::fault(
                    400,
                    format!(
                        "Load snapshot error: Failed to restore from snapshot: block device {}: {e} {path}",
                        d.drive_id
                    ),
                );
            }
        }
        let mut taps = BTreeMap::new();
        for n in &nets {
            match open_tap(&n.host_dev_name) {
                Ok(f) => {
                    taps.insert(n.iface_id.clone(), f);
                }
                Err(e) => {
                    return Reply::fault(
                        400,
                        format!(
                            "Load snapshot error: Failed to restore from snapshot: Open tap device failed: {e}. Invalid TUN/TAP Backend provided by {}.",
                            n.host_dev_name
                        ),
                    );
                }
            }
        }
        self.machine = state.machine;
        self.boot = state.boot;
        self.drives = state.drives;
        self.nets = nets.into_iter().map(|n| (n.iface_id.clone(), n)).collect();
        self.taps = taps;
        // The service's configuration comes back; its store starts empty.
        self.mmds = super::mmds::Mmds { config: state.mmds_config, store: None };
        self.state = if params.resume_vm.unwrap_or(false) { InstanceState::Running } else { InstanceState::Paused };
        self.log("main", "INFO", &format!("Snapshot loaded from {}", params.snapshot_path));
        Reply::no_content()
    }
}

/// Writes `len` zero bytes to `file`, as a dump of untouched guest memory.
fn write_zeros(file: &mut File, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}
