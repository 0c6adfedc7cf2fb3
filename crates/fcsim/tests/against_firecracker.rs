//! The simulator beside a real Firecracker: the same requests, in the same
//! order, sent to both; every answer (status, `fault_message`, and what
//! `GET /vm/config` lists) must be the same.
//!
//! No registry ships Firecracker, so this is a check by hand, not part of
//! the suite. Build Firecracker v1.16.1 (`../shared/firecracker/README.md`)
//! and a kernel it boots, then, as root:
//!
//! ```sh
//! FIRECRACKER_BIN=/path/to/firecracker FIRECRACKER_KERNEL=/path/to/vmlinux \
//!     cargo test -p firecracker-sim --test against_firecracker -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)] // a check by hand: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// What one request got: its status, and the fault message or the
/// devices `GET /vm/config` listed.
type Answer = (u16, String);

fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut text = vec![0; length];
    reader.read_exact(&mut text).unwrap();
    let parsed: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
    let detail = if path == "/vm/config" && status == 200 {
        // A booted Firecracker lists its devices in no set order.
        let sorted = |key: &str, id: &str| {
            let mut items = parsed[key].as_array().cloned().unwrap_or_default();
            items.sort_by_key(|d| d[id].as_str().unwrap_or_default().to_string());
            items
        };
        json!({"drives": sorted("drives", "drive_id"), "nets": sorted("network-interfaces", "iface_id"),
               "machine": parsed["machine-config"], "logger": parsed["logger"], "mmds": parsed["mmds-config"]})
        .to_string()
    } else if path == "/mmds" && method == "GET" {
        String::from_utf8_lossy(&text).into_owned()
    } else {
        parsed["fault_message"].as_str().unwrap_or_default().to_string()
    };
    (status, detail)
}

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(binary: &Path, dir: &Path, name: &str) -> (Vmm, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(binary)
        .args(["--api-sock", socket.to_str().unwrap(), "--id", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let since = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{} did not listen on {}",
            binary.display(),
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (Vmm(child), socket)
}

/// A request: method, path and body (`null`: none).
type Request = (&'static str, String, Value);

/// The scenarios, titled: each runs in a fresh process of each VMM.
fn scenarios(dir: &Path, kernel: &str) -> Vec<(&'static str, Vec<Request>)> {
    let d = dir.display().to_string();
    let (root, data) = (format!("{d}/root.img"), format!("{d}/data.img"));
    let req = |m: &'static str, p: &str, b: Value| (m, p.to_string(), b);
    let drive = |id: &str, path: &str, root: bool, ro: bool| json!({"drive_id": id, "path_on_host": path, "is_root_device": root, "is_read_only": ro});
    let boot = json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"});
    let bucket = |size: i64, refill: i64| json!({"size": size, "refill_time": refill});
    vec![
        (
            "drives and their limits, before and after boot",
            vec![
                req("PATCH", "/drives/root", json!({"drive_id": "root", "rate_limiter": {"bandwidth": bucket(1, 1)}})),
                req("PATCH", "/drives/a", json!({"drive_id": "b"})),
                req("PUT", "/drives/root", {
                    let mut d = drive("root", &root, true, false);
                    d["rate_limiter"] = json!({"bandwidth": bucket(0, 100)});
                    d
                }),
                req("PUT", "/drives/data", {
                    let mut d = drive("data", &data, false, true);
                    d["rate_limiter"] = json!({"ops": bucket(10, 0)});
                    d
                }),
                req(
                    "PUT",
                    "/drives/bad",
                    json!({"drive_id": "bad", "path_on_host": data, "is_root_device": false,
                                                 "rate_limiter": {"bandwidth": bucket(-1, 1)}}),
                ),
                req(
                    "PUT",
                    "/drives/bad",
                    json!({"drive_id": "bad", "path_on_host": data, "is_root_device": false,
                                                 "rate_limiter": {"bandwidth": {"refill_time": 1}}}),
                ),
                req("PUT", "/drives/second", drive("second", &data, true, true)),
                req("PUT", "/drives/gone", drive("gone", &format!("{d}/nope"), false, true)),
                req(
                    "PUT",
                    "/drives/both",
                    json!({"drive_id": "both", "path_on_host": data, "socket": "/s",
                                                  "is_root_device": false}),
                ),
                req("PUT", "/drives/neither", json!({"drive_id": "neither", "is_root_device": false})),
                req("PUT", "/drives/x", json!({"drive_id": "y", "path_on_host": data, "is_root_device": false})),
                req("PUT", "/boot-source", boot.clone()),
                req("PUT", "/machine-config", json!({"vcpu_count": 1, "mem_size_mib": 64})),
                req("GET", "/vm/config", Value::Null),
                req("PUT", "/actions", json!({"action_type": "InstanceStart"})),
                req(
                    "PATCH",
                    "/drives/root",
                    json!({"drive_id": "root", "rate_limiter": {"bandwidth": bucket(1000, 100)}}),
                ),
                req("PATCH", "/drives/data", json!({"drive_id": "data", "rate_limiter": {"ops": bucket(0, 0)}})),
                req("PATCH", "/drives/nosuch", json!({"drive_id": "nosuch", "rate_limiter": {"ops": bucket(5, 10)}})),
                req("PATCH", "/drives/root", json!({"drive_id": "other"})),
                req("PATCH", "/drives/root", json!({"drive_id": "root"})),
                req("PATCH", "/drives/root", json!({"drive_id": "root", "path_on_host": format!("{d}/nope")})),
                req("PATCH", "/drives/root", json!({"drive_id": "root", "rate_limiter": {"bandwidth": {"size": 1}}})),
                req(
                    "PATCH",
                    "/drives/root",
                    json!({"drive_id": "root",
                    "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100, "one_time_burst": 5000}}}),
                ),
                req(
                    "PATCH",
                    "/network-interfaces/eth0",
                    json!({"iface_id": "eth0", "rx_rate_limiter": {"ops": bucket(1, 1)}}),
                ),
                req("PUT", "/drives/late", drive("late", &data, false, true)),
                req("PUT", "/drives/late", drive("other", &data, false, true)),
                req("GET", "/vm/config", Value::Null),
                req(
                    "PUT",
                    "/snapshot/load",
                    json!({"snapshot_path": format!("{d}/s"),
                    "mem_backend": {"backend_type": "File", "backend_path": format!("{d}/m")}}),
                ),
                req("GET", "/", Value::Null),
            ],
        ),
        (
            "the metadata service",
            vec![
                req("GET", "/mmds", Value::Null),
                req("PATCH", "/mmds", json!({"a": 1})),
                req("PUT", "/mmds/config", json!({"network_interfaces": []})),
                req("PUT", "/mmds/config", json!({"network_interfaces": ["eth0"]})),
                req("PUT", "/network-interfaces/eth0", json!({"iface_id": "eth0", "host_dev_name": "simcmp0"})),
                req("PUT", "/mmds/config", json!({"version": "V3", "network_interfaces": ["eth0"]})),
                req("PUT", "/mmds/config", json!({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"})),
                req("PUT", "/mmds/config", json!({"network_interfaces": ["eth0"], "ipv4_address": "not-an-address"})),
                req("PUT", "/mmds/config", json!({"network_interfaces": ["eth0"], "color": "blue"})),
                req("PUT", "/mmds/config", json!({"version": "V2", "network_interfaces": ["eth0"]})),
                req("GET", "/vm/config", Value::Null),
                req("PUT", "/mmds/other", json!({})),
                req("PUT", "/mmds", json!({"latest": {"meta-data": {"a": "b"}}, "list": [1, 2], "n": 3})),
                req("GET", "/mmds", Value::Null),
                req("PATCH", "/mmds", json!({"latest": {"meta-data": {"a": null, "c": "d"}}, "n": null})),
                req("GET", "/mmds", Value::Null),
                req("PUT", "/mmds", json!("just a string")),
                req("GET", "/mmds", Value::Null),
                req("PUT", "/mmds", json!({"big": "x".repeat(50_000)})),
                req("PATCH", "/mmds", json!({"more": "y".repeat(2_000)})),
                req("PUT", "/mmds", json!({"latest": {"user-data": "#!/bin/sh\n"}})),
                req("PUT", "/drives/root", drive("root", &root, true, false)),
                req("PUT", "/boot-source", boot.clone()),
                req("PUT", "/actions", json!({"action_type": "InstanceStart"})),
                req("PUT", "/mmds/config", json!({"version": "V2", "network_interfaces": ["eth0"]})),
                req("PUT", "/mmds", json!({"latest": {"user-data": "after boot"}})),
                req("PATCH", "/mmds", json!({"nexus": {"labels": {"role": "edited"}}})),
                req("GET", "/mmds", Value::Null),
                req("GET", "/vm/config", Value::Null),
            ],
        ),
        (
            "machine and boot source",
            vec![
                req("PUT", "/machine-config", json!({"vcpu_count": 0, "mem_size_mib": 64})),
                req("PUT", "/machine-config", json!({"vcpu_count": 3, "mem_size_mib": 64, "smt": true})),
                req("PUT", "/machine-config", json!({"vcpu_count": 1, "mem_size_mib": 0})),
                req("PUT", "/machine-config", json!({"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "1G"})),
                req("PATCH", "/machine-config", json!({"vcpu_count": 2})),
                req("PUT", "/boot-source", json!({"kernel_image_path": format!("{d}/nope")})),
                req("PUT", "/boot-source", json!({"kernel_image_path": kernel, "initrd_path": format!("{d}/nope")})),
            ],
        ),
        (
            "network interfaces, logger and metrics",
            vec![
                req(
                    "PUT",
                    "/network-interfaces/eth0",
                    json!({"iface_id": "eth0", "host_dev_name": "simcmp0", "guest_mac": "zz:00"}),
                ),
                req(
                    "PUT",
                    "/network-interfaces/eth0",
                    json!({"iface_id": "eth0", "host_dev_name": "simcmp0", "mtu": 10}),
                ),
                req("PUT", "/network-interfaces/eth0", json!({"iface_id": "eth0", "host_dev_name": "simcmpnone"})),
                req(
                    "PUT",
                    "/network-interfaces/eth0",
                    json!({"iface_id": "eth0", "host_dev_name": "simcmp0",
                    "guest_mac": "06:00:00:00:00:01", "rx_rate_limiter": {"bandwidth": bucket(0, 5)}}),
                ),
                req(
                    "PUT",
                    "/network-interfaces/eth0",
                    json!({"iface_id": "eth0", "host_dev_name": "simcmp0",
                    "guest_mac": "06:00:00:00:00:01", "tx_rate_limiter": {"ops": bucket(7, 7)}}),
                ),
                req("PUT", "/network-interfaces/eth1", json!({"iface_id": "eth1", "host_dev_name": "simcmp0"})),
                req(
                    "PUT",
                    "/network-interfaces/eth1",
                    json!({"iface_id": "eth1", "host_dev_name": "simcmp1",
                    "guest_mac": "06:00:00:00:00:01"}),
                ),
                req("PUT", "/network-interfaces/eth1", json!({"iface_id": "eth0", "host_dev_name": "simcmp1"})),
                req("PATCH", "/network-interfaces/a", json!({"iface_id": "b"})),
                req("PUT", "/logger", json!({"log_path": format!("{d}/log.txt"), "level": "Loud"})),
                req("PUT", "/logger", json!({"log_path": format!("{d}/nodir/log.txt")})),
                req("PUT", "/metrics", json!({"metrics_path": format!("{d}/nodir/m.json")})),
                req("PUT", "/metrics", json!({"metrics_path": format!("{d}/metrics.json")})),
                req("PUT", "/metrics", json!({"metrics_path": format!("{d}/metrics.json")})),
                req("PUT", "/drives/root", {
                    let mut d = drive("root", &root, true, false);
                    d["cache_type"] = json!("Writeback");
                    d["io_engine"] = json!("Async");
                    d
                }),
                req("PUT", "/boot-source", boot),
                req("GET", "/vm/config", Value::Null),
                req("PUT", "/actions", json!({"action_type": "InstanceStart"})),
                req("PUT", "/network-interfaces/eth2", json!({"iface_id": "eth2", "host_dev_name": "simcmp1"})),
                req("PUT", "/network-interfaces/eth2", json!({"iface_id": "eth3", "host_dev_name": "simcmp1"})),
                req(
                    "PATCH",
                    "/network-interfaces/eth0",
                    json!({"iface_id": "eth0", "tx_rate_limiter": {"ops": bucket(3, 3)}}),
                ),
                req(
                    "PATCH",
                    "/network-interfaces/eth9",
                    json!({"iface_id": "eth9", "tx_rate_limiter": {"ops": bucket(3, 3)}}),
                ),
                req("PATCH", "/network-interfaces/eth0", json!({"iface_id": "eth0"})),
                req("PUT", "/machine-config", json!({"vcpu_count": 1, "mem_size_mib": 64})),
                req("GET", "/vm/config", Value::Null),
            ],
        ),
    ]
}

#[test]
#[ignore = "needs a real Firecracker: FIRECRACKER_BIN=... FIRECRACKER_KERNEL=... (see the file's header)"]
fn the_simulator_answers_every_request_as_firecracker_does() {
    let real = PathBuf::from(std::env::var("FIRECRACKER_BIN").expect("FIRECRACKER_BIN: a Firecracker v1.16.1 binary"));
    let kernel = std::env::var("FIRECRACKER_KERNEL").expect("FIRECRACKER_KERNEL: a kernel that Firecracker boots");
    let sim = PathBuf::from(env!("CARGO_BIN_EXE_firecracker-sim"));
    assert!(nix::unistd::geteuid().is_root(), "run as root: the VMMs open TAP devices");
    let failures = std::thread::spawn(move || {
        // The TAPs live in a network namespace of this thread's own.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        for tap in ["simcmp0", "simcmp1"] {
            let ok = Command::new("ip").args(["tuntap", "add", tap, "mode", "tap"]).status().unwrap().success();
            assert!(ok, "ip tuntap add {tap}");
        }
        let dir = std::env::temp_dir().join(format!("sim-vs-firecracker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["root.img", "data.img"] {
            std::fs::File::create(dir.join(f)).unwrap().set_len(16 << 20).unwrap();
        }
        let mut failures = Vec::new();
        let (mut total, mut same) = (0, 0);
        for (title, requests) in scenarios(&dir, &kernel) {
            let mut answers: Vec<Vec<Answer>> = Vec::new();
            for (name, binary) in [("real", &real), ("sim", &sim)] {
                for f in ["log.txt", "metrics.json"] {
                    std::fs::write(dir.join(f), b"").unwrap();
                }
                let (_vmm, socket) = start(binary, &dir, name);
                let body = |b: &Value| (!b.is_null()).then_some(b.clone());
                answers.push(requests.iter().map(|(m, p, b)| call(&socket, m, p, body(b).as_ref())).collect());
            }
            println!("== {title}");
            for (((method, path, body), r), s) in requests.iter().zip(&answers[0]).zip(&answers[1]) {
                total += 1;
                if r == s {
                    same += 1;
                    println!("  same {method} {path} -> {} {}", r.0, r.1);
                } else {
                    println!("  DIFF {method} {path} {body}\n    firecracker: {r:?}\n    simulator:   {s:?}");
                    failures.push(format!("{method} {path} {body}: firecracker {r:?}, simulator {s:?}"));
                }
            }
        }
        println!("{same} of {total} answers identical");
        let _ = std::fs::remove_dir_all(&dir);
        failures
    })
    .join()
    .unwrap();
    assert!(failures.is_empty(), "the simulator answered differently:\n{}", failures.join("\n"));
}
