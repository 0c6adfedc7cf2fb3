//! Table-driven tests of the simulator's state machine and error bodies.
//! Each case names the line of Firecracker's v1.16.1 OpenAPI spec
//! (`firecracker-v1.16.1-api.yaml`) or doc it follows.

use std::path::PathBuf;

use serde_json::Value;

use crate::vmm::Vmm;

const SPEC: &str = "firecracker-v1.16.1-api.yaml";

/// One request and what Firecracker answers to it.
struct Case {
    /// Where the rule comes from.
    source: &'static str,
    /// The instance's history before the request: `fresh`, `configured`,
    /// `running` or `paused`.
    before: &'static str,
    method: &'static str,
    path: &'static str,
    body: &'static str,
    status: u16,
    /// Part of `fault_message` the answer must contain (for errors).
    fault: &'static str,
}

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("fcsim-rules-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vmlinux", "rootfs", "log", "metrics"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        Fixture { dir }
    }

    fn subst(&self, text: &str) -> String {
        text.replace("$DIR", &self.dir.display().to_string())
    }

    fn vmm_in(&self, before: &str) -> Vmm {
        let mut vmm = Vmm::new("rules".into());
        let mut ok = |method: &str, path: &str, body: &str| {
            let (reply, _) = vmm.handle(method, path, self.subst(body).as_bytes());
            assert!(reply.status < 300, "setup {method} {path} failed: {:?}", reply.body);
        };
        if before != "fresh" {
            ok("PUT", "/boot-source", r#"{"kernel_image_path":"$DIR/vmlinux"}"#);
            ok(
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id":"rootfs","path_on_host":"$DIR/rootfs","is_root_device":true,"is_read_only":false}"#,
            );
        }
        if before == "running" || before == "paused" {
            ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
        }
        if before == "paused" {
            ok("PATCH", "/vm", r#"{"state":"Paused"}"#);
        }
        vmm
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cases() -> Vec<Case> {
    let c =
        |source, before, method, path, body, status, fault| Case { source, before, method, path, body, status, fault };
    vec![
        c("api.yaml:27 GET / describeInstance", "fresh", "GET", "/", "", 200, ""),
        c("api.yaml:818 GET /version", "fresh", "GET", "/version", "", 200, ""),
        c(
            "api.yaml:445 PUT /machine-config",
            "fresh",
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":256}"#,
            204,
            "",
        ),
        c(
            "api.yaml:1407 MachineConfiguration requires vcpu_count",
            "fresh",
            "PUT",
            "/machine-config",
            r#"{"mem_size_mib":256}"#,
            400,
            "missing field `vcpu_count`",
        ),
        c(
            "api.yaml:1438 vcpu_count minimum 1",
            "fresh",
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":0,"mem_size_mib":256}"#,
            400,
            "Machine config error: The number of vCPUs must be greater than 0",
        ),
        c(
            "api.yaml:1439 vcpu_count maximum 32",
            "fresh",
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":34,"mem_size_mib":256}"#,
            400,
            "Machine config error: The number of vCPUs must be greater than 0",
        ),
        c(
            "STYLE: deny_unknown_fields, machine_config.rs",
            "fresh",
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":256,"memory":1}"#,
            400,
            "unknown field `memory`",
        ),
        c(
            "api.yaml:445 PUT /machine-config is pre-boot only",
            "running",
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":256}"#,
            400,
            "not supported after starting",
        ),
        c(
            "api.yaml:476 PATCH /machine-config is pre-boot only",
            "running",
            "PATCH",
            "/machine-config",
            r#"{"mem_size_mib":512}"#,
            400,
            "not supported after starting",
        ),
        c(
            "api.yaml:231 PUT /boot-source",
            "fresh",
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"$DIR/vmlinux","boot_args":"console=ttyS0"}"#,
            204,
            "",
        ),
        c(
            "api.yaml:1061 BootSource requires kernel_image_path",
            "fresh",
            "PUT",
            "/boot-source",
            r#"{"boot_args":"x"}"#,
            400,
            "missing field `kernel_image_path`",
        ),
        c(
            "api.yaml:231 the kernel must be readable",
            "fresh",
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"$DIR/missing"}"#,
            400,
            "kernel file cannot be opened",
        ),
        c(
            "api.yaml:231 PUT /boot-source is pre-boot only",
            "running",
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"$DIR/vmlinux"}"#,
            400,
            "not supported after starting",
        ),
        c(
            "api.yaml:283 PUT /drives/{id}",
            "fresh",
            "PUT",
            "/drives/data",
            r#"{"drive_id":"data","path_on_host":"$DIR/rootfs","is_root_device":false,"is_read_only":true}"#,
            204,
            "",
        ),
        c(
            "api.yaml:1212 Drive requires is_root_device",
            "fresh",
            "PUT",
            "/drives/data",
            r#"{"drive_id":"data","path_on_host":"$DIR/rootfs"}"#,
            400,
            "missing field `is_root_device`",
        ),
        c(
            "api.yaml:283 the path id must match the body id",
            "fresh",
            "PUT",
            "/drives/a",
            r#"{"drive_id":"b","path_on_host":"$DIR/rootfs","is_root_device":false}"#,
            400,
            "does not match",
        ),
        c(
            "api.yaml:283 PUT /drives is pre-boot only; v1.16.1 takes a later one as a hot-plug, which needs PCI",
            "running",
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"$DIR/rootfs","is_root_device":true}"#,
            400,
            "PCI is not enabled",
        ),
        c(
            "api.yaml:313 PATCH /drives is post-boot only",
            "configured",
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"$DIR/rootfs"}"#,
            400,
            "not supported before starting",
        ),
        c(
            "api.yaml:313 PATCH /drives after boot",
            "running",
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#,
            204,
            "",
        ),
        c(
            "api.yaml:313 PATCH /drives needs an existing drive (vmm_config/drive.rs DriveError::DeviceUpdate, device_manager FindDeviceError::DeviceNotFound)",
            "running",
            "PATCH",
            "/drives/nope",
            r#"{"drive_id":"nope"}"#,
            400,
            "Unable to patch the block device: Failed perform action on device: Device not found",
        ),
        c(
            "api.yaml:313 PATCH /drives checks the path id against the body",
            "running",
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id":"other"}"#,
            400,
            "The id from the path does not match the id from the body",
        ),
        c(
            "api.yaml:1700 a bucket of size 0 is accepted and limits nothing (vmm_config/mod.rs get_bucket_update)",
            "fresh",
            "PUT",
            "/drives/data",
            r#"{"drive_id":"data","path_on_host":"$DIR/rootfs","is_root_device":false,"rate_limiter":{"bandwidth":{"size":0,"refill_time":100}}}"#,
            204,
            "",
        ),
        c(
            "api.yaml:1715 TokenBucket requires size",
            "running",
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","rate_limiter":{"bandwidth":{"refill_time":100}}}"#,
            400,
            "missing field `size`",
        ),
        c(
            "api.yaml:709 PUT /network-interfaces is pre-boot only; v1.16.1 takes a later one as a hot-plug, which needs PCI",
            "running",
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#,
            400,
            "PCI is not enabled",
        ),
        c(
            "api.yaml:1522 NetworkInterface requires host_dev_name",
            "fresh",
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0"}"#,
            400,
            "missing field `host_dev_name`",
        ),
        c(
            "api.yaml:1543 mtu minimum 68",
            "fresh",
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":10}"#,
            400,
            "MTU 10 is out of range [68, 65535]",
        ),
        c(
            "api.yaml:737 PATCH /network-interfaces is post-boot only",
            "configured",
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0"}"#,
            400,
            "not supported before starting",
        ),
        c(
            "api.yaml:737 PATCH /network-interfaces needs an existing interface (vmm_config/net.rs NetworkInterfaceError::DeviceUpdate)",
            "running",
            "PATCH",
            "/network-interfaces/eth9",
            r#"{"iface_id":"eth9"}"#,
            400,
            "Unable to update the net device: Failed perform action on device: Device not found",
        ),
        c(
            "api.yaml:403 PUT /logger",
            "fresh",
            "PUT",
            "/logger",
            r#"{"log_path":"$DIR/log","level":"Debug","show_level":true}"#,
            204,
            "",
        ),
        c(
            "logger.md:10 the log file must exist",
            "fresh",
            "PUT",
            "/logger",
            r#"{"log_path":"$DIR/nolog"}"#,
            400,
            "Logger error: Failed to open target file",
        ),
        c("api.yaml:499 PUT /metrics", "fresh", "PUT", "/metrics", r#"{"metrics_path":"$DIR/metrics"}"#, 204, ""),
        c(
            "api.yaml:514 FlushMetrics needs an initialized metrics system",
            "running",
            "PUT",
            "/actions",
            r#"{"action_type":"FlushMetrics"}"#,
            400,
            "not initialized",
        ),
        c(
            "api.yaml:1337 InstanceActionInfo requires action_type",
            "configured",
            "PUT",
            "/actions",
            r#"{}"#,
            400,
            "missing field `action_type`",
        ),
        c(
            "api.yaml:1350 action_type enum",
            "configured",
            "PUT",
            "/actions",
            r#"{"action_type":"Reboot"}"#,
            400,
            "unknown variant `Reboot`",
        ),
        c(
            "actions.md:11 InstanceStart boots a configured VM",
            "configured",
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
            204,
            "",
        ),
        c(
            "actions.md:11 InstanceStart needs a kernel",
            "fresh",
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
            400,
            "without kernel configuration",
        ),
        c(
            "actions.md:11 InstanceStart only once",
            "running",
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
            400,
            "not supported after starting",
        ),
        c(
            "actions.md:34 SendCtrlAltDel needs a running guest",
            "configured",
            "PUT",
            "/actions",
            r#"{"action_type":"SendCtrlAltDel"}"#,
            400,
            "not supported before starting",
        ),
        c(
            "snapshot-support.md:178 pause only after boot",
            "configured",
            "PATCH",
            "/vm",
            r#"{"state":"Paused"}"#,
            400,
            "not supported before starting",
        ),
        c("snapshot-support.md:196 pause a running VM", "running", "PATCH", "/vm", r#"{"state":"Paused"}"#, 204, ""),
        c(
            "snapshot-support.md:196 pausing twice keeps it Paused",
            "paused",
            "PATCH",
            "/vm",
            r#"{"state":"Paused"}"#,
            204,
            "",
        ),
        c(
            "api.yaml:1756 Vm.state enum",
            "running",
            "PATCH",
            "/vm",
            r#"{"state":"Stopped"}"#,
            400,
            "unknown variant `Stopped`",
        ),
        c(
            "api.yaml:767 snapshot/create is post-boot only",
            "configured",
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"$DIR/s","mem_file_path":"$DIR/m"}"#,
            400,
            "not supported before starting",
        ),
        c(
            "snapshot-support.md:267 snapshot/create needs a Paused VM",
            "running",
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"$DIR/s","mem_file_path":"$DIR/m"}"#,
            400,
            "not paused",
        ),
        c(
            "snapshot-support.md:267 snapshot/create on a Paused VM",
            "paused",
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"$DIR/s","mem_file_path":"$DIR/m"}"#,
            204,
            "",
        ),
        c(
            "api.yaml:1607 SnapshotCreateParams requires mem_file_path",
            "paused",
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"$DIR/s"}"#,
            400,
            "missing field `mem_file_path`",
        ),
        c(
            "api.yaml:1622 snapshot_type enum",
            "paused",
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"$DIR/s","mem_file_path":"$DIR/m","snapshot_type":"Half"}"#,
            400,
            "unknown variant `Half`",
        ),
        c(
            "Firecracker v1.16.1, checked by hand: a Diff snapshot without dirty-page tracking is taken",
            "paused",
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"$DIR/s","mem_file_path":"$DIR/m","snapshot_type":"Diff"}"#,
            204,
            "",
        ),
        c(
            "api.yaml:793 snapshot/load is pre-boot only",
            "running",
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"$DIR/s","mem_backend":{"backend_type":"File","backend_path":"$DIR/m"}}"#,
            400,
            "not supported after starting",
        ),
        c(
            "snapshot-support.md:397 no load after boot-specific configuration",
            "configured",
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"$DIR/s","mem_backend":{"backend_type":"File","backend_path":"$DIR/m"}}"#,
            400,
            "not allowed after configuring boot-specific resources",
        ),
        c(
            "api.yaml:1661 exactly one of the mem_* fields",
            "fresh",
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"$DIR/s"}"#,
            400,
            "either `mem_backend` or `mem_file_path`",
        ),
        c("api.yaml:522 GET /mmds before any PUT", "fresh", "GET", "/mmds", "", 200, ""),
        c(
            "api.yaml:522 PATCH /mmds needs a store (v1.16.1, checked by hand)",
            "running",
            "PATCH",
            "/mmds",
            r#"{"a":1}"#,
            400,
            "The MMDS data store is not initialized.",
        ),
        c("api.yaml:522 PUT /mmds after boot", "running", "PUT", "/mmds", r#"{"latest":{}}"#, 204, ""),
        c(
            "api.yaml:581 PUT /mmds/config names existing interfaces",
            "fresh",
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces":["eth0"]}"#,
            400,
            "does not correspond to any existing network interface",
        ),
        c(
            "api.yaml:583 PUT /mmds/config is pre-boot only",
            "running",
            "PUT",
            "/mmds/config",
            r#"{"version":"V2","network_interfaces":["eth0"]}"#,
            400,
            "not supported after starting",
        ),
        c(
            "api.yaml:1290 unknown paths get a fault_message",
            "fresh",
            "PUT",
            "/nowhere",
            "{}",
            400,
            "Invalid request method and/or path",
        ),
    ]
}

#[test]
fn each_request_gets_the_status_and_fault_message_firecracker_gives() {
    let fx = Fixture::new();
    let mut failures = Vec::new();
    for case in cases() {
        let mut vmm = fx.vmm_in(case.before);
        let (reply, _) = vmm.handle(case.method, case.path, fx.subst(case.body).as_bytes());
        let fault = reply.body.as_ref().and_then(|b| b.get("fault_message")).and_then(Value::as_str).unwrap_or("");
        let ok = reply.status == case.status
            && (case.status < 300 || fault.contains(case.fault))
            && (case.status >= 300 || reply.body.as_ref().is_none_or(|b| b.get("fault_message").is_none()));
        if !ok {
            failures.push(format!(
                "[{SPEC} / docs: {}] {} {} when {}: got {} {:?}, want {} containing {:?}",
                case.source, case.method, case.path, case.before, reply.status, fault, case.status, case.fault
            ));
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

mod scenarios;
