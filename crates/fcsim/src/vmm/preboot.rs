//! Pre-boot configuration: the machine, boot source, drives, network
//! interfaces, logger and metrics, as Firecracker accepts and refuses them
//! before InstanceStart.

use super::*;

impl Vmm {
    pub(super) fn put_machine_config(&mut self, body: &[u8]) -> Reply {
        let cfg: MachineConfig = attempt!(parse(body));
        attempt!(self.pre_boot());
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

    pub(super) fn put_boot_source(&mut self, body: &[u8]) -> Reply {
        let boot: BootSource = attempt!(parse(body));
        attempt!(self.pre_boot());
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

    pub(super) fn put_drive(&mut self, id: &str, body: &[u8]) -> Reply {
        let drive: Drive = attempt!(parse(body));
        attempt!(self.pre_boot());
        attempt!(same_id(&drive.drive_id, id));
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

    pub(super) fn put_net(&mut self, id: &str, body: &[u8]) -> Reply {
        let net: NetworkInterface = attempt!(parse(body));
        attempt!(self.pre_boot());
        attempt!(same_id(&net.iface_id, id));
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

    pub(super) fn put_logger(&mut self, body: &[u8]) -> Reply {
        let logger: Logger = attempt!(parse(body));
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

    pub(super) fn put_metrics(&mut self, body: &[u8]) -> Reply {
        let metrics: Metrics = attempt!(parse(body));
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
}
