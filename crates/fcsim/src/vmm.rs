//! The simulated microVM: configuration, the pre-boot/post-boot state
//! machine and Firecracker's error texts. No I/O beyond what Firecracker
//! itself does for a request (opening the kernel, drives, TAP, log files).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::model::*;

/// The Firecracker release whose API this simulator answers.
pub const EMULATED_VERSION: &str = "1.16.1";

/// `state` of `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    NotStarted,
    Running,
    Paused,
}

impl InstanceState {
    fn as_str(self) -> &'static str {
        match self {
            InstanceState::NotStarted => "Not started",
            InstanceState::Running => "Running",
            InstanceState::Paused => "Paused",
        }
    }
}

/// What the HTTP layer sends back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
}

impl Reply {
    fn no_content() -> Self {
        Reply { status: 204, body: None }
    }
    fn ok(body: Value) -> Self {
        Reply { status: 200, body: Some(body) }
    }
    /// Firecracker's error shape: `{"fault_message": ...}`.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        Reply { status, body: Some(json!({ "fault_message": message.into() })) }
    }
}

/// Side effects the HTTP layer carries out after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// The guest booted: start the console.
    Booted,
    /// The guest asked to shut down: exit shortly.
    Shutdown,
    /// A snapshot load failed: Firecracker exits with status 1.
    Fail,
}

const NOT_SUPPORTED_AFTER_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const NOT_SUPPORTED_BEFORE_BOOT: &str = "The requested operation is not supported before starting the microVM.";

/// A Firecracker instance's configuration and state.
#[derive(Debug)]
pub struct Vmm {
    pub id: String,
    pub state: InstanceState,
    machine: MachineConfig,
    boot: Option<BootSource>,
    drives: BTreeMap<String, Drive>,
    nets: BTreeMap<String, NetworkInterface>,
    /// Open TAP queues, held for the life of the process as Firecracker does.
    taps: BTreeMap<String, File>,
    logger: Option<(Logger, File)>,
    metrics: Option<File>,
    started: Instant,
    requests: u64,
    /// A boot-specific resource was configured (rules out snapshot/load).
    boot_configured: bool,
    /// The guest console was started (on the first transition to Running).
    console_started: bool,
    /// When metrics were last flushed: each flush holds the counts since.
    last_flush: Instant,
}

impl Vmm {
    pub fn new(id: String) -> Self {
        Self {
            id,
            state: InstanceState::NotStarted,
            machine: MachineConfig::default(),
            boot: None,
            drives: BTreeMap::new(),
            nets: BTreeMap::new(),
            taps: BTreeMap::new(),
            logger: None,
            metrics: None,
            started: Instant::now(),
            requests: 0,
            boot_configured: false,
            console_started: false,
            last_flush: Instant::now(),
        }
    }

    /// Handles one API request.
    pub fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> (Reply, After) {
        self.requests += 1;
        self.log("fc_api", "INFO", &format!("The API server received a {} request on \"{path}\".", title(method)));
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let reply = match (method, segments.as_slice()) {
            ("GET", [""]) => Reply::ok(self.instance_info()),
            ("GET", ["version"]) => Reply::ok(json!({ "firecracker_version": EMULATED_VERSION })),
            ("GET", ["machine-config"]) => Reply::ok(json!(self.machine)),
            ("GET", ["vm", "config"]) => Reply::ok(self.vm_config()),
            ("PUT", ["machine-config"]) => self.put_machine_config(body),
            ("PUT", ["boot-source"]) => self.put_boot_source(body),
            ("PUT", ["drives", id]) => self.put_drive(id, body),
            ("PUT", ["network-interfaces", id]) => self.put_net(id, body),
            ("PUT", ["logger"]) => self.put_logger(body),
            ("PUT", ["metrics"]) => self.put_metrics(body),
            ("PATCH", ["machine-config"]) => self.patch_machine_config(body),
            ("PATCH", ["drives", id]) => self.patch_drive(id, body),
            ("PATCH", ["network-interfaces", id]) => self.patch_net(id, body),
            ("PUT", ["snapshot", "create"]) => self.snapshot_create(body),
            ("PUT", ["snapshot", "load"]) => {
                let reply = self.snapshot_load(body);
                // Firecracker cannot go on from a failed load: it exits.
                if reply.status >= 300 {
                    return (reply, After::Fail);
                }
                return (reply, self.after_running());
            }
            ("PUT", ["actions"]) => return self.put_action(body),
            ("PATCH", ["vm"]) => {
                let reply = self.patch_vm(body);
                return (reply, self.after_running());
            }
            _ => Reply::fault(400, format!("Invalid request method and/or path: {method} {path}.")),
        };
        (reply, After::Nothing)
    }

    fn instance_info(&self) -> Value {
        json!({
            "app_name": "Firecracker",
            "id": self.id,
            "state": self.state.as_str(),
            "vmm_version": EMULATED_VERSION,
        })
    }

    fn vm_config(&self) -> Value {
        json!({
            "balloon": null,
            "drives": self.drives.values().collect::<Vec<_>>(),
            "boot-source": self.boot,
            "cpu-config": null,
            "logger": self.logger.as_ref().map(|(l, _)| l),
            "machine-config": self.machine,
            "metrics": null,
            "mmds-config": null,
            "network-interfaces": self.nets.values().collect::<Vec<_>>(),
            "vsock": null,
            "entropy": null,
        })
    }

    fn pre_boot(&self) -> Result<(), Reply> {
        if self.state == InstanceState::NotStarted { Ok(()) } else { Err(Reply::fault(400, NOT_SUPPORTED_AFTER_BOOT)) }
    }

    fn put_machine_config(&mut self, body: &[u8]) -> Reply {
        let cfg: MachineConfig = match parse(body) {
            Ok(c) => c,
            Err(r) => return r,
        };
        if let Err(r) = self.pre_boot() {
            return r;
        }
        if cfg.vcpu_count == 0 || cfg.vcpu_count > 32 || (cfg.vcpu_count > 1 && cfg.vcpu_count % 2 == 1 && cfg.smt) {
            return Reply::fault(
                400,
                "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.",
            );
        }
        if cfg.mem_size_mib == 0 {
            return Reply::fault(400, "The memory size (MiB) is invalid.");
        }
        if cfg.huge_pages != "None" && cfg.huge_pages != "2M" {
            return Reply::fault(
                400,
                format!(
                    "An error occurred when deserializing the json body of a request: unknown variant `{}`, expected `None` or `2M`.",
                    cfg.huge_pages
                ),
            );
        }
        self.machine = cfg;
        self.boot_configured = true;
        Reply::no_content()
    }

    fn put_boot_source(&mut self, body: &[u8]) -> Reply {
        let boot: BootSource = match parse(body) {
            Ok(b) => b,
            Err(r) => return r,
        };
        if let Err(r) = self.pre_boot() {
            return r;
        }
        if let Err(e) = File::open(&boot.kernel_image_path) {
            return Reply::fault(400, format!("The kernel file cannot be opened: {e}"));
        }
        if let Some(initrd) = &boot.initrd_path
            && let Err(e) = File::open(initrd)
        {
            return Reply::fault(
                400,
                format!("The initrd file cannot be opened due to invalid path or invalid permissions. {e}"),
            );
        }
        self.boot = Some(boot);
        self.boot_configured = true;
        Reply::no_content()
    }

    fn put_drive(&mut self, id: &str, body: &[u8]) -> Reply {
        let drive: Drive = match parse(body) {
            Ok(d) => d,
            Err(r) => return r,
        };
        if let Err(r) = self.pre_boot() {
            return r;
        }
        if drive.drive_id != id {
            return Reply::fault(400, "The id from the path does not match the id from the body!");
        }
        match (&drive.path_on_host, &drive.socket) {
            (Some(path), None) => {
                let read_only = drive.is_read_only.unwrap_or(false);
                if let Err(e) = OpenOptions::new().read(true).write(!read_only).open(path) {
                    return Reply::fault(
                        400,
                        format!(
                            "Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: {e} {path}"
                        ),
                    );
                }
            }
            (None, Some(_)) => {}
            _ => {
                return Reply::fault(
                    400,
                    "An error occurred when deserializing the json body of a request: exactly one of path_on_host and socket must be given.",
                );
            }
        }
        if drive.is_root_device && self.drives.values().any(|d| d.is_root_device && d.drive_id != id) {
            return Reply::fault(400, "A root block device already exists!");
        }
        self.drives.insert(id.to_string(), drive);
        self.boot_configured = true;
        Reply::no_content()
    }

    fn put_net(&mut self, id: &str, body: &[u8]) -> Reply {
        let net: NetworkInterface = match parse(body) {
            Ok(n) => n,
            Err(r) => return r,
        };
        if let Err(r) = self.pre_boot() {
            return r;
        }
        if net.iface_id != id {
            return Reply::fault(400, "The id from the path does not match the id from the body!");
        }
        if let Some(mac) = &net.guest_mac
            && !valid_mac(mac)
        {
            return Reply::fault(
                400,
                format!("An error occurred when deserializing the json body of a request: invalid MAC address {mac}."),
            );
        }
        if let Some(mtu) = net.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Reply::fault(
                400,
                format!("An error occurred when deserializing the json body of a request: invalid MTU {mtu}."),
            );
        }
        if self.nets.values().any(|n| n.host_dev_name == net.host_dev_name && n.iface_id != id) {
            return Reply::fault(
                400,
                format!(
                    "Could not create the network device: The host device name {} is already in use.",
                    net.host_dev_name
                ),
            );
        }
        match open_tap(&net.host_dev_name) {
            Ok(file) => {
                self.taps.insert(id.to_string(), file);
            }
            Err(e) => {
                return Reply::fault(
                    400,
                    format!(
                        "Could not create the network device: Open tap device failed: Error while creating ifreq structure: {e}. Invalid TUN/TAP Backend provided by {}. Check our documentation on setting up the network devices.",
                        net.host_dev_name
                    ),
                );
            }
        }
        self.nets.insert(id.to_string(), net);
        self.boot_configured = true;
        Reply::no_content()
    }

    fn put_logger(&mut self, body: &[u8]) -> Reply {
        let logger: Logger = match parse(body) {
            Ok(l) => l,
            Err(r) => return r,
        };
        if let Some(level) = &logger.level
            && !["error", "warning", "info", "debug", "trace", "off"].contains(&level.to_lowercase().as_str())
        {
            return Reply::fault(
                400,
                format!(
                    "An error occurred when deserializing the json body of a request: unknown variant `{level}`, expected one of `Error`, `Warning`, `Info`, `Debug`, `Trace`, `Off`."
                ),
            );
        }
        let Some(path) = &logger.log_path else {
            return Reply::no_content();
        };
        // Firecracker opens an existing file or FIFO; it does not create one.
        match OpenOptions::new().append(true).open(path) {
            Ok(file) => {
                self.logger = Some((logger, file));
                self.log("main", "INFO", &format!("Running Firecracker v{EMULATED_VERSION}"));
                Reply::no_content()
            }
            Err(e) => Reply::fault(400, format!("Cannot initialize logging system: Failed to open target file: {e}")),
        }
    }

    fn put_metrics(&mut self, body: &[u8]) -> Reply {
        let metrics: Metrics = match parse(body) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if self.metrics.is_some() {
            return Reply::fault(400, "Reinitialization of metrics not allowed.");
        }
        match OpenOptions::new().append(true).open(&metrics.metrics_path) {
            Ok(file) => {
                self.metrics = Some(file);
                Reply::no_content()
            }
            Err(e) => Reply::fault(400, format!("Cannot initialize the metrics system: {e}")),
        }
    }

    fn put_action(&mut self, body: &[u8]) -> (Reply, After) {
        let action: InstanceAction = match parse(body) {
            Ok(a) => a,
            Err(r) => return (r, After::Nothing),
        };
        match action.action_type.as_str() {
            "InstanceStart" => {
                if self.state != InstanceState::NotStarted {
                    return (Reply::fault(400, NOT_SUPPORTED_AFTER_BOOT), After::Nothing);
                }
                if self.boot.is_none() {
                    return (Reply::fault(400, "Cannot start microvm without kernel configuration."), After::Nothing);
                }
                self.state = InstanceState::Running;
                self.log("main", "INFO", "Successfully started microvm that was configured from one single json");
                (Reply::no_content(), self.after_running())
            }
            "FlushMetrics" => {
                if self.metrics.is_none() {
                    return (Reply::fault(400, "The metrics system is not initialized."), After::Nothing);
                }
                self.flush_metrics();
                (Reply::no_content(), After::Nothing)
            }
            "SendCtrlAltDel" => {
                if self.state == InstanceState::NotStarted {
                    return (Reply::fault(400, NOT_SUPPORTED_BEFORE_BOOT), After::Nothing);
                }
                self.log("main", "INFO", "Sending CTRL+ALT+DEL to the guest");
                // Firecracker only injects the keys: powering off is the
                // guest's business, and some guests ignore them.
                if std::env::var_os("FIRECRACKER_SIM_GUEST_IGNORES_CTRL_ALT_DEL").is_some() {
                    return (Reply::no_content(), After::Nothing);
                }
                (Reply::no_content(), After::Shutdown)
            }
            other => (
                Reply::fault(
                    400,
                    format!(
                        "An error occurred when deserializing the json body of a request: unknown variant `{other}`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`."
                    ),
                ),
                After::Nothing,
            ),
        }
    }

    /// `Booted` the first time the guest is seen running, so the console starts once.
    fn after_running(&mut self) -> After {
        if self.state == InstanceState::Running && !self.console_started {
            self.console_started = true;
            After::Booted
        } else {
            After::Nothing
        }
    }

    fn post_boot(&self) -> Result<(), Reply> {
        if self.state == InstanceState::NotStarted { Err(Reply::fault(400, NOT_SUPPORTED_BEFORE_BOOT)) } else { Ok(()) }
    }

    fn patch_machine_config(&mut self, body: &[u8]) -> Reply {
        let patch: MachineConfigPatch = match parse(body) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Err(r) = self.pre_boot() {
            return r;
        }
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

    fn patch_drive(&mut self, id: &str, body: &[u8]) -> Reply {
        let patch: PartialDrive = match parse(body) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Err(r) = self.post_boot() {
            return r;
        }
        if patch.drive_id != id {
            return Reply::fault(400, "The id from the path does not match the id from the body!");
        }
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

    fn patch_net(&mut self, id: &str, body: &[u8]) -> Reply {
        let patch: PartialNetworkInterface = match parse(body) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Err(r) = self.post_boot() {
            return r;
        }
        if patch.iface_id != id {
            return Reply::fault(400, "The id from the path does not match the id from the body!");
        }
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

    fn snapshot_create(&mut self, body: &[u8]) -> Reply {
        let params: SnapshotCreate = match parse(body) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Err(r) = self.post_boot() {
            return r;
        }
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
            drives: self.drives.values().cloned().collect(),
            nets: self.nets.values().cloned().collect(),
        };
        // Both files are created or truncated, as Firecracker does.
        let mem_bytes = (self.machine.mem_size_mib as u64) << 20;
        let written = std::fs::write(&params.snapshot_path, serde_json::to_vec(&state).unwrap_or_default())
            .and_then(|()| File::create(&params.mem_file_path))
            .and_then(|mem| mem.set_len(mem_bytes));
        match written {
            Ok(()) => {
                self.log("main", "INFO", &format!("Snapshot created at {}", params.snapshot_path));
                Reply::no_content()
            }
            Err(e) => Reply::fault(400, format!("Cannot create the snapshot: {e}")),
        }
    }

    fn snapshot_load(&mut self, body: &[u8]) -> Reply {
        let params: SnapshotLoad = match parse(body) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if self.state != InstanceState::NotStarted {
            return Reply::fault(400, NOT_SUPPORTED_AFTER_BOOT);
        }
        if self.boot_configured {
            return Reply::fault(
                400,
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            );
        }
        let mem_path = match (&params.mem_file_path, &params.mem_backend) {
            (Some(p), None) => p.clone(),
            (None, Some(b)) if b.backend_type == "File" => b.backend_path.clone(),
            (None, Some(b)) if b.backend_type == "Uffd" => {
                return Reply::fault(400, "Uffd memory backends are not supported by firecracker-sim.");
            }
            (None, Some(b)) => {
                return Reply::fault(
                    400,
                    format!(
                        "An error occurred when deserializing the json body of a request: unknown variant `{}`, expected `File` or `Uffd`.",
                        b.backend_type
                    ),
                );
            }
            _ => {
                return Reply::fault(
                    400,
                    "An error occurred when deserializing the json body of a request: missing field: either `mem_backend` or `mem_file_path` is required.",
                );
            }
        };
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
        match std::fs::metadata(&mem_path) {
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
        self.drives = state.drives.into_iter().map(|d| (d.drive_id.clone(), d)).collect();
        self.nets = nets.into_iter().map(|n| (n.iface_id.clone(), n)).collect();
        self.taps = taps;
        self.state = if params.resume_vm.unwrap_or(false) { InstanceState::Running } else { InstanceState::Paused };
        self.log("main", "INFO", &format!("Snapshot loaded from {}", params.snapshot_path));
        Reply::no_content()
    }

    fn patch_vm(&mut self, body: &[u8]) -> Reply {
        let vm: VmState = match parse(body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if self.state == InstanceState::NotStarted {
            return Reply::fault(400, NOT_SUPPORTED_BEFORE_BOOT);
        }
        match vm.state.as_str() {
            "Paused" => self.state = InstanceState::Paused,
            "Resumed" => self.state = InstanceState::Running,
            other => {
                return Reply::fault(
                    400,
                    format!(
                        "An error occurred when deserializing the json body of a request: unknown variant `{other}`, expected `Paused` or `Resumed`."
                    ),
                );
            }
        }
        Reply::no_content()
    }

    /// Writes one metrics JSON object, as Firecracker does on FlushMetrics
    /// and every 60 seconds.
    pub fn flush_metrics(&mut self) {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let line = json!({
            "utc_timestamp_ms": now_ms,
            "api_server": {
                "process_startup_time_us": 0,
                "process_startup_time_cpu_us": 0,
                "sync_response_fails": 0,
                "sync_vmm_send_timeout_count": 0,
            },
            "vmm": { "panic_count": 0 },
            "uptime_seconds": self.started.elapsed().as_secs(),
            "api_requests": self.requests,
        });
        // As Firecracker's devices count: per flush, what happened since
        // the one before. A running guest does a little of everything
        // (a tick of I/O per millisecond), a paused or unborn one nothing.
        let ms = self.last_flush.elapsed().as_millis() as u64;
        self.last_flush = Instant::now();
        let n = if self.is_running() { ms } else { 0 };
        let mut line = line;
        line["vcpu"] = json!({"exit_io_in": n, "exit_io_out": n * 2, "exit_mmio_read": n / 2, "exit_mmio_write": n / 4,
            "failures": 0});
        line["block"] = json!({"read_bytes": n * 4096, "write_bytes": n * 512, "read_count": n, "write_count": n / 8,
            "rate_limiter_throttled_events": 0});
        line["net"] = json!({"rx_bytes_count": n * 100, "tx_bytes_count": n * 60, "rx_packets_count": n,
            "tx_packets_count": n, "rx_rate_limiter_throttled": 0, "tx_rate_limiter_throttled": 0});
        if let Some(f) = &mut self.metrics {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Appends one line to the configured log in Firecracker's format.
    pub fn log(&mut self, thread: &str, level: &str, message: &str) {
        let id = self.id.clone();
        if let Some((cfg, file)) = &mut self.logger {
            let ts = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.9f");
            let lvl = if cfg.show_level.unwrap_or(false) { format!(":{level}") } else { String::new() };
            let _ = writeln!(file, "{ts} [{id}:{thread}{lvl}] {message}");
        }
    }

    /// Whether the guest is running (for the console).
    pub fn is_running(&self) -> bool {
        self.state == InstanceState::Running
    }

    pub fn boot_args(&self) -> String {
        self.boot.as_ref().and_then(|b| b.boot_args.clone()).unwrap_or_default()
    }

    /// The kernel's path, as the boot source names it.
    pub fn kernel_path(&self) -> Option<String> {
        self.boot.as_ref().map(|b| b.kernel_image_path.clone())
    }

    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }
}

fn title(method: &str) -> String {
    let lower = method.to_lowercase();
    let mut chars = lower.chars();
    chars.next().map(|c| c.to_uppercase().collect::<String>() + chars.as_str()).unwrap_or_default()
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    if body.is_empty() {
        return Err(Reply::fault(400, "The request body is empty; it must carry a JSON object."));
    }
    serde_json::from_slice(body).map_err(|e| {
        Reply::fault(400, format!("An error occurred when deserializing the json body of a request: {e}."))
    })
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

nix::ioctl_write_int!(tunsetiff, b'T', 202);

/// Opens a queue on TAP `name` as Firecracker does (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
fn open_tap(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "invalid interface name"));
    }
    let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the fd is a valid /dev/net/tun handle and `req` a valid ifreq
    // that lives across the call.
    unsafe { tunsetiff(file.as_raw_fd(), &req as *const libc::ifreq as libc::c_ulong) }
        .map_err(std::io::Error::from)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_is_refused_after_instance_start() {
        let dir = std::env::temp_dir().join(format!("fcsim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let mut vmm = Vmm::new("t".into());
        let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
        assert_eq!(vmm.handle("PUT", "/boot-source", boot.as_bytes()).0.status, 204);
        assert_eq!(vmm.handle("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#).0.status, 204);
        let (reply, _) = vmm.handle("PUT", "/machine-config", br#"{"vcpu_count":1,"mem_size_mib":64}"#);
        assert_eq!(reply.status, 400);
        assert_eq!(reply.body.unwrap()["fault_message"], NOT_SUPPORTED_AFTER_BOOT);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_fields_are_refused_with_a_fault_message() {
        let mut vmm = Vmm::new("t".into());
        let (reply, _) = vmm.handle("PUT", "/machine-config", br#"{"vcpu_count":1,"mem_size_mib":64,"x":1}"#);
        assert_eq!(reply.status, 400);
        assert!(reply.body.unwrap()["fault_message"].as_str().unwrap().contains("unknown field `x`"));
    }

    #[test]
    fn pause_before_boot_is_refused() {
        let mut vmm = Vmm::new("t".into());
        let (reply, _) = vmm.handle("PATCH", "/vm", br#"{"state":"Paused"}"#);
        assert_eq!(reply.body.unwrap()["fault_message"], NOT_SUPPORTED_BEFORE_BOOT);
    }
}
