//! The Firecracker configuration of a VM: its machine, boot source, drives
//! and network interface, sent before InstanceStart, naming the VM's files
//! as the jailed VMM sees them. (Its log and metrics are given on the
//! command line: see [`crate::host::process::launch`].)

use nexus_api::agent::EnsureVm;

use crate::error::AgentError;
use crate::firecracker::FcClient;
use crate::firecracker::models;

/// Sends the full pre-boot configuration, then InstanceStart, naming the
/// VM's files as the jailed VMM sees them. The log and metrics go first;
/// the other pre-boot requests do not depend on one another, so they are
/// then all sent at once, each on its own connection; Firecracker answers
/// them in turn. The configuration requests are logged at debug when they
/// succeed (the agent's "VMM booted" line sums them up); InstanceStart,
/// as every change to a running VMM, at info.
pub async fn configure(
    client: &FcClient,
    req: &EnsureVm,
    tap: &str,
    drives: &[super::drives::Planned],
    mmds: Option<&serde_json::Value>,
) -> Result<(), AgentError> {
    use crate::host::jail::inside;
    let fc = |step: &'static str| move |source| AgentError::Firecracker { step, source };
    let machine = models::MachineConfiguration {
        vcpu_count: req.vcpu,
        mem_size_mib: req.mem_mib,
        smt: None,
        track_dirty_pages: None,
    };
    let boot = models::BootSource {
        kernel_image_path: inside::KERNEL.into(),
        boot_args: Some(req.boot_args.clone()),
        initrd_path: req.initrd_path.as_ref().map(|_| inside::INITRD.to_string()),
    };
    let drive = models::Drive {
        drive_id: nexus_api::storage::ROOT_DRIVE.into(),
        path_on_host: inside::ROOTFS.into(),
        is_root_device: true,
        is_read_only: false,
        rate_limiter: req.rootfs_rate_limiter.as_ref().map(super::drives::limiter),
    };
    let limits = req.network_limits.clone().unwrap_or_default();
    let nic = models::NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: tap.to_string(),
        guest_mac: Some(req.mac.clone()),
        rx_rate_limiter: limits.rx.as_ref().map(super::drives::limiter),
        tx_rate_limiter: limits.tx.as_ref().map(super::drives::limiter),
    };
    // Extra drives after the root drive, in order (the guest numbers them
    // in the order they were added).
    let extra: Vec<models::Drive> = drives
        .iter()
        .map(|d| models::Drive {
            drive_id: d.name.as_str().to_string(),
            path_on_host: d.inside(),
            is_root_device: false,
            is_read_only: d.read_only,
            rate_limiter: d.rate_limiter.as_ref().map(super::drives::limiter),
        })
        .collect();
    let preboot = client.clone().quiet();
    tokio::try_join!(
        async { preboot.put_machine_config(&machine).await.map_err(fc("machine-config")) },
        async { preboot.put_boot_source(&boot).await.map_err(fc("boot-source")) },
        async {
            preboot.put_drive(&drive).await.map_err(fc("drives"))?;
            for d in &extra {
                preboot.put_drive(d).await.map_err(fc("drives"))?;
            }
            Ok(())
        },
        async {
            preboot.put_network_interface(&nic).await.map_err(fc("network-interfaces"))?;
            // The metadata service, on the interface just made.
            if let Some(contents) = mmds {
                preboot.put_mmds_config(&super::mmds::config()).await.map_err(fc("mmds/config"))?;
                preboot.put_mmds(contents).await.map_err(fc("mmds"))?;
            }
            Ok(())
        },
    )?;
    client.instance_start().await.map_err(fc("InstanceStart"))
}
