//! The simulated guest's console: a chatty guest prints a line a second
//! after its boot banner; with `FIRECRACKER_SIM_CONSOLE_SECS=0` it is
//! quiet after the banner, as an idle guest is.

#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Sends one request and returns the status code.
fn call(socket: &Path, method: &str, path: &str, body: &str) -> u16 {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

/// Boots a simulated guest with `env`, lets it run for `run`, and returns
/// its console.
fn console_after(env: &[(&str, &str)], run: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (socket, kernel, console) =
        (dir.path().join("fc.sock"), dir.path().join("vmlinux"), dir.path().join("console"));
    std::fs::write(&kernel, b"kernel").unwrap();
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_firecracker-sim"))
        .args(["--api-sock", &socket.display().to_string(), "--id", "console-test"])
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the simulator's socket did not open");
        std::thread::sleep(Duration::from_millis(10));
    }
    let boot = format!(r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0"}}"#, kernel.display());
    assert_eq!(call(&socket, "PUT", "/boot-source", &boot), 204);
    assert_eq!(call(&socket, "PUT", "/machine-config", r#"{"vcpu_count":1,"mem_size_mib":128}"#), 204);
    assert_eq!(call(&socket, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#), 204);
    std::thread::sleep(run);
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    std::fs::read_to_string(&console).unwrap()
}

#[test]
fn a_chatty_guest_prints_every_second_and_a_quiet_one_only_boots() {
    let run = Duration::from_millis(2500);
    let quiet = std::thread::spawn(move || console_after(&[("FIRECRACKER_SIM_CONSOLE_SECS", "0")], run));
    let chatty = console_after(&[], run);
    let quiet = quiet.join().unwrap();
    let alive = |console: &str| console.lines().filter(|l| l.contains("guest alive")).count();
    assert!(chatty.contains("console-test login: booted"), "{chatty}");
    assert!(alive(&chatty) >= 2, "{chatty}");
    assert!(quiet.contains("console-test login: booted"), "{quiet}");
    assert_eq!(alive(&quiet), 0, "{quiet}");
}
