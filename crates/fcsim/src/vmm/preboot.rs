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
                "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.",
            );
        }
        // A multiple of the page size: 4 KiB always, 2 MiB with huge pages.
        if cfg.mem_size_mib == 0 || (cfg.huge_pages == HugePages::TwoMiB && cfg.mem_size_mib % 2 == 1) {
            return Reply::fault(
                400,
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.",
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
            return Reply::fault(400, format!("Boot source error: The kernel file cannot be opened: {e}"));
        }
        if let Some(initrd) = &boot.initrd_path
            && let Err(e) = File::open(initrd)
        {
            return Reply::fault(
                400,
                format!(
                    "Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. {e}"
                ),
            );
        }
        self.boot = Some(boot);
        self.boot_configured = true;
        Reply::no_content()
    }

    pub(super) fn put_drive(&mut self, id: &str, body: &[u8]) -> Reply {
        let mut drive: Drive = attempt!(parse(body));
        attempt!(same_id(&drive.drive_id, id));
        attempt!(self.pre_boot_or_hotplug());
        match (&drive.path_on_host, &drive.socket) {
            (Some(path), None) => {
                let read_only = drive.is_read_only.unwrap_or(false);
                if let Err(e) = OpenOptions::new().read(true).write(!read_only).open(path) {
                    return Reply::fault(
                        400,
                        format!(
                            "Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: {e} {path}"
                        ),
                    );
                }
            }
            (None, Some(_)) => {}
            _ => {
                return Reply::fault(
                    400,
                    "Drive config error: Unable to create the virtio block device: Invalid block config.",
                );
            }
        }
        let at = self.drives.iter().position(|d| d.drive_id == id);
        let has_root = self.drives.first().is_some_and(|d| d.is_root_device);
        if drive.is_root_device && has_root && at != Some(0) {
            return Reply::fault(400, "Drive config error: A root block device already exists!");
        }
        drive.rate_limiter = drive.rate_limiter.and_then(RateLimiter::live);
        // What Firecracker reports for a drive given none.
        drive.cache_type.get_or_insert_with(|| "Unsafe".into());
        drive.io_engine.get_or_insert_with(|| "Sync".into());
        drive.is_read_only.get_or_insert(false);
        // Firecracker keeps its block devices in a list: a new root drive
        // goes first, any other last; an update takes the old one's place,
        // and a drive updated into the root moves to the front.
        match at {
            None if drive.is_root_device => self.drives.insert(0, drive),
            None => self.drives.push(drive),
            Some(i) => {
                let root = drive.is_root_device;
                self.drives[i] = drive;
                if root && i != 0 {
                    self.drives.swap(0, i);
                }
            }
        }
        self.boot_configured = true;
        Reply::no_content()
    }

    pub(super) fn put_net(&mut self, id: &str, body: &[u8]) -> Reply {
        let mut net: NetworkInterface = attempt!(parse(body));
        attempt!(same_iface(&net.iface_id, id));
        attempt!(self.pre_boot_or_hotplug());
        if let Some(mtu) = net.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Reply::fault(
                400,
                format!(
                    "Network config error: Could not create the network device: MTU {mtu} is out of range [68, 65535]"
                ),
            );
        }
        if let Some(mac) = &net.guest_mac
            && self.nets.values().any(|n| n.guest_mac.as_ref() == Some(mac) && n.iface_id != id)
        {
            return Reply::fault(400, format!("Network config error: The MAC address is already in use: {}", mac.0));
        }
        // An update replaces the interface: its TAP is closed first. A TAP
        // another interface holds is busy: opening it again fails (EBUSY).
        self.taps.remove(id);
        match open_tap(&net.host_dev_name) {
            Ok(file) => {
                self.taps.insert(id.to_string(), file);
            }
            Err(e) => {
                return Reply::fault(
                    400,
                    format!(
                        "Network config error: Could not create the network device: Open tap device failed: Error while creating ifreq structure: {e}. Invalid TUN/TAP Backend provided by {}. Check our documentation on setting up the network devices.",
                        net.host_dev_name
                    ),
                );
            }
        }
        net.rx_rate_limiter = net.rx_rate_limiter.and_then(RateLimiter::live);
        net.tx_rate_limiter = net.tx_rate_limiter.and_then(RateLimiter::live);
        self.nets.insert(id.to_string(), net);
        self.boot_configured = true;
        Reply::no_content()
    }

    pub(super) fn put_logger(&mut self, body: &[u8]) -> Reply {
        let logger: Logger = attempt!(parse(body));
        match self.use_logger(logger) {
            Ok(()) => Reply::no_content(),
            Err(e) => Reply::fault(400, format!("Logger error: Failed to open target file: {e}")),
        }
    }

    /// Logs to `logger`'s file (from `PUT /logger` or the command line).
    pub fn use_logger(&mut self, logger: Logger) -> std::io::Result<()> {
        let Some(path) = &logger.log_path else {
            return Ok(());
        };
        // Firecracker opens an existing file or FIFO; it does not create one.
        let file = OpenOptions::new().append(true).open(path)?;
        self.logger = Some((logger, file));
        self.log("main", "INFO", &format!("Running Firecracker v{EMULATED_VERSION}"));
        Ok(())
    }

    pub(super) fn put_metrics(&mut self, body: &[u8]) -> Reply {
        let metrics: Metrics = attempt!(parse(body));
        if self.metrics.is_some() {
            return Reply::fault(
                400,
                "Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.",
            );
        }
        match self.use_metrics(&metrics.metrics_path) {
            Ok(()) => Reply::no_content(),
            Err(e) => Reply::fault(
                400,
                format!("Metrics error: Cannot initialize the metrics system due to bad user input: {e}"),
            ),
        }
    }

    /// Writes metrics to the existing file `path` (from `PUT /metrics` or
    /// the command line).
    pub fn use_metrics(&mut self, path: &str) -> std::io::Result<()> {
        self.metrics = Some(OpenOptions::new().append(true).open(path)?);
        Ok(())
    }
}
