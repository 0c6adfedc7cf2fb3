//! The simulated microVM: configuration, the pre-boot/post-boot state
//! machine and Firecracker's error texts. No I/O beyond what Firecracker
//! itself does for a request (opening the kernel, drives, TAP, log files).
//! Each group of endpoints is a module: [`preboot`] configuration,
//! [`actions`], [`postboot`] changes, [`snapshot`]s, and what the VMM
//! writes about itself ([`observe`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::model::*;

mod actions;
mod mmds;
mod observe;
mod postboot;
mod preboot;
mod snapshot;

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

/// The value of a step that answers `Result<T, Reply>`, or that reply
/// returned from the handler at once.
macro_rules! attempt {
    ($step:expr) => {
        match $step {
            Ok(value) => value,
            Err(reply) => return reply,
        }
    };
}
use attempt;

const NOT_SUPPORTED_AFTER_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const NOT_SUPPORTED_BEFORE_BOOT: &str = "The requested operation is not supported before starting the microVM.";

/// A Firecracker instance's configuration and state.
#[derive(Debug)]
pub struct Vmm {
    pub id: String,
    pub state: InstanceState,
    machine: MachineConfig,
    boot: Option<BootSource>,
    /// In Firecracker's order: the root drive first, the others in the
    /// order they were added (an update keeps a drive's place).
    drives: Vec<Drive>,
    nets: BTreeMap<String, NetworkInterface>,
    /// Open TAP queues, held for the life of the process as Firecracker does.
    taps: BTreeMap<String, File>,
    logger: Option<(Logger, File)>,
    metrics: Option<File>,
    started: Instant,
    requests: u64,
    /// A boot-specific resource was configured (rules out snapshot/load).
    boot_configured: bool,
    /// The metadata service: its configuration and store.
    mmds: mmds::Mmds,
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
            drives: Vec::new(),
            nets: BTreeMap::new(),
            taps: BTreeMap::new(),
            logger: None,
            metrics: None,
            started: Instant::now(),
            requests: 0,
            boot_configured: false,
            mmds: mmds::Mmds::default(),
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
            ("PUT", ["mmds", "config"]) => self.put_mmds_config(body),
            ("PUT", ["mmds"]) => self.put_mmds(body),
            ("PUT", ["mmds", other]) => Reply::fault(400, format!("Unrecognized PUT request path `{other}`.")),
            ("PATCH", ["mmds"]) => self.patch_mmds(body),
            ("GET", ["mmds"]) => self.get_mmds(),
            ("PUT", ["snapshot", "create"]) => self.snapshot_create(body),
            ("PUT", ["snapshot", "load"]) => return self.snapshot_load(body),
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

    /// `GET /vm/config`. Before boot Firecracker lists the devices as
    /// configured (the root drive first, then in the order added); after
    /// boot it lists what its device manager holds, from a hash map, so
    /// in no particular order (and a different one in each process). The
    /// logger and metrics are never listed.
    fn vm_config(&self) -> Value {
        let (drives, nets): (Vec<&Drive>, Vec<&NetworkInterface>) = if self.state == InstanceState::NotStarted {
            (self.drives.iter().collect(), self.nets.values().collect())
        } else {
            let drives: std::collections::HashMap<&str, &Drive> =
                self.drives.iter().map(|d| (d.drive_id.as_str(), d)).collect();
            let nets: std::collections::HashMap<&str, &NetworkInterface> =
                self.nets.values().map(|n| (n.iface_id.as_str(), n)).collect();
            (drives.into_values().collect(), nets.into_values().collect())
        };
        json!({
            "balloon": null,
            "drives": drives,
            "boot-source": self.boot,
            "cpu-config": null,
            "logger": null,
            "machine-config": self.machine,
            "metrics": null,
            "mmds-config": self.mmds.config,
            "network-interfaces": nets,
            "vsock": null,
            "entropy": null,
        })
    }

    fn pre_boot(&self) -> Result<(), Reply> {
        if self.state == InstanceState::NotStarted { Ok(()) } else { Err(Reply::fault(400, NOT_SUPPORTED_AFTER_BOOT)) }
    }

    /// A `PUT` of a drive or network interface after boot asks Firecracker
    /// to hot-plug it, which needs PCI (`--enable-pci`); without it, this.
    fn pre_boot_or_hotplug(&self) -> Result<(), Reply> {
        if self.state == InstanceState::NotStarted { Ok(()) } else { Err(Reply::fault(400, "PCI is not enabled")) }
    }
}

fn title(method: &str) -> String {
    let lower = method.to_lowercase();
    let mut chars = lower.chars();
    chars.next().map(|c| c.to_uppercase().collect::<String>() + chars.as_str()).unwrap_or_default()
}

/// Refuses a body whose id is not the one in the path, as Firecracker does.
/// A drive's id in the body against the one in the path, checked while
/// parsing (before the VM's state is looked at).
fn same_id(in_body: &str, in_path: &str) -> Result<(), Reply> {
    if in_body == in_path {
        Ok(())
    } else {
        Err(Reply::fault(400, "The id from the path does not match the id from the body!"))
    }
}

/// The same for a network interface, whose refusal names both ids.
fn same_iface(in_body: &str, in_path: &str) -> Result<(), Reply> {
    if in_body == in_path {
        Ok(())
    } else {
        Err(Reply::fault(
            400,
            format!("The id from the path [{in_path}] does not match the id from the body [{in_body}]!"),
        ))
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    if body.is_empty() {
        return Err(Reply::fault(400, "The request body is empty; it must carry a JSON object."));
    }
    serde_json::from_slice(body).map_err(|e| {
        Reply::fault(400, format!("An error occurred when deserializing the json body of a request: {e}."))
    })
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
