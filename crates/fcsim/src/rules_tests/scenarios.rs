//! The simulator's state across requests: snapshots written and loaded,
//! processes that end or serve on, rate limiters patched bucket by bucket,
//! drives kept in Firecracker's order.

use super::Fixture;
use crate::vmm::Vmm;

#[test]
fn snapshot_create_writes_a_sparse_memory_file_of_guest_size_and_load_restores_paused_or_resumed() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::new();
    let mut src = fx.vmm_in("fresh");
    let put = |vmm: &mut Vmm, m: &str, p: &str, b: &str| vmm.handle(m, p, fx.subst(b).as_bytes()).0.status;
    assert_eq!(put(&mut src, "PUT", "/machine-config", r#"{"vcpu_count":2,"mem_size_mib":512}"#), 204);
    assert_eq!(put(&mut src, "PUT", "/boot-source", r#"{"kernel_image_path":"$DIR/vmlinux"}"#), 204);
    assert_eq!(put(&mut src, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#), 204);
    assert_eq!(put(&mut src, "PATCH", "/vm", r#"{"state":"Paused"}"#), 204);
    assert_eq!(
        put(&mut src, "PUT", "/snapshot/create", r#"{"snapshot_path":"$DIR/snap","mem_file_path":"$DIR/mem"}"#),
        204
    );
    let mem = std::fs::metadata(fx.dir.join("mem")).unwrap();
    assert_eq!(mem.len(), 512 << 20, "memory file has the guest's size");
    assert!(mem.blocks() * 512 < 1 << 20, "and is sparse");

    // Logger and metrics may be set before a load (snapshot-support.md:397).
    let mut restored = fx.vmm_in("fresh");
    assert_eq!(put(&mut restored, "PUT", "/logger", r#"{"log_path":"$DIR/log"}"#), 204);
    let load = r#"{"snapshot_path":"$DIR/snap","mem_backend":{"backend_type":"File","backend_path":"$DIR/mem"}}"#;
    assert_eq!(put(&mut restored, "PUT", "/snapshot/load", load), 204);
    let info = restored.handle("GET", "/", b"").0.body.unwrap();
    assert_eq!(info["state"], "Paused", "snapshot-support.md:470: a loaded VM is Paused");
    let config = restored.handle("GET", "/vm/config", b"").0.body.unwrap();
    assert_eq!(config["machine-config"]["mem_size_mib"], 512);

    let mut resumed = fx.vmm_in("fresh");
    let load = r#"{"snapshot_path":"$DIR/snap","mem_file_path":"$DIR/mem","resume_vm":true}"#;
    assert_eq!(put(&mut resumed, "PUT", "/snapshot/load", load), 204);
    assert_eq!(resumed.handle("GET", "/", b"").0.body.unwrap()["state"], "Running");
}

#[test]
fn a_failed_snapshot_load_ends_the_process_and_ctrl_alt_del_powers_off_only_a_willing_guest() {
    use crate::vmm::After;
    let fx = Fixture::new();
    let mut vmm = fx.vmm_in("fresh");
    let load = fx.subst(r#"{"snapshot_path":"$DIR/absent","mem_file_path":"$DIR/absent"}"#);
    let (reply, after) = vmm.handle("PUT", "/snapshot/load", load.as_bytes());
    assert_eq!(reply.status, 400);
    assert_eq!(after, After::Fail, "Firecracker v1.16.1 exits (status 1) after a failed load");
    let mut running = fx.vmm_in("running");
    let (reply, after) = running.handle("PUT", "/actions", br#"{"action_type":"SendCtrlAltDel"}"#);
    assert_eq!((reply.status, after), (204, After::Shutdown), "a guest that honours it powers off");
}

#[test]
fn a_rate_limiter_patch_changes_the_buckets_it_names_and_a_bucket_of_size_0_goes() {
    let fx = Fixture::new();
    let mut vmm = fx.vmm_in("running");
    let patch = |vmm: &mut Vmm, body: &str| vmm.handle("PATCH", "/drives/rootfs", body.as_bytes()).0.status;
    let limiter = |vmm: &mut Vmm| {
        let config = vmm.handle("GET", "/vm/config", b"").0.body.unwrap();
        config["drives"][0]["rate_limiter"].clone()
    };
    let bw = r#"{"drive_id":"rootfs","rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#;
    assert_eq!(patch(&mut vmm, bw), 204);
    assert_eq!(limiter(&mut vmm)["bandwidth"]["size"], 1000);
    // vmm_config/mod.rs: an absent bucket is no update.
    let ops = r#"{"drive_id":"rootfs","rate_limiter":{"ops":{"size":10,"refill_time":1000}}}"#;
    assert_eq!(patch(&mut vmm, ops), 204);
    let both = limiter(&mut vmm);
    assert_eq!((both["bandwidth"]["size"].as_u64(), both["ops"]["size"].as_u64()), (Some(1000), Some(10)));
    // A bucket of size 0 disables it (BucketUpdate::Disabled).
    let off = r#"{"drive_id":"rootfs","rate_limiter":{"bandwidth":{"size":0,"refill_time":0}}}"#;
    assert_eq!(patch(&mut vmm, off), 204);
    let left = limiter(&mut vmm);
    assert!(left["bandwidth"].is_null() && left["ops"]["size"] == 10, "{left}");
}

#[test]
fn a_snapshot_load_refused_before_loading_leaves_the_vmm_serving() {
    use crate::vmm::After;
    let fx = Fixture::new();
    let mut running = fx.vmm_in("running");
    let load = fx.subst(r#"{"snapshot_path":"$DIR/s","mem_file_path":"$DIR/m"}"#);
    let (reply, after) = running.handle("PUT", "/snapshot/load", load.as_bytes());
    assert_eq!(reply.status, 400);
    assert_eq!(after, After::Nothing, "a load sent to a booted VM is refused and the process serves on");
    assert_eq!(running.handle("GET", "/", b"").0.status, 200);
    let mut configured = fx.vmm_in("configured");
    let (reply, after) = configured.handle("PUT", "/snapshot/load", load.as_bytes());
    assert_eq!((reply.status, after), (400, After::Nothing), "so is one after boot-specific configuration");
}

#[test]
fn drives_keep_firecrackers_order_root_first_then_as_added() {
    // vmm_config/drive.rs, BlockBuilder::insert: a root drive goes to the
    // front, others to the back, an update keeps its place.
    let fx = Fixture::new();
    let mut vmm = fx.vmm_in("fresh");
    for (id, root) in [("b", false), ("rootfs", true), ("a", false), ("b", false)] {
        let body = fx.subst(&format!(
            r#"{{"drive_id":"{id}","path_on_host":"$DIR/rootfs","is_root_device":{root},"is_read_only":true}}"#
        ));
        assert_eq!(vmm.handle("PUT", &format!("/drives/{id}"), body.as_bytes()).0.status, 204);
    }
    let config = vmm.handle("GET", "/vm/config", b"").0.body.unwrap();
    let ids: Vec<&str> = config["drives"].as_array().unwrap().iter().map(|d| d["drive_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["rootfs", "b", "a"]);
    let second = fx.subst(r#"{"drive_id":"a","path_on_host":"$DIR/rootfs","is_root_device":true,"is_read_only":true}"#);
    let (reply, _) = vmm.handle("PUT", "/drives/a", second.as_bytes());
    assert_eq!(reply.status, 400, "a second root drive is refused");
}
