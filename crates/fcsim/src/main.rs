//! `firecracker-sim`: answers Firecracker's v1.16 API on its unix socket,
//! with Firecracker's pre-boot/post-boot rules and error bodies, without
//! running a guest. Launched with the same flags as `firecracker`.

mod args;
mod console;
mod http;
mod model;
mod vmm;

#[cfg(test)]
mod rules_tests;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match args::Args::parse(std::env::args().skip(1)) {
        Ok(args::Parsed::Run(a)) => a,
        Ok(args::Parsed::Version) => {
            println!("Firecracker v{}", vmm::EMULATED_VERSION);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("Arguments parsing error: {e}\n\nFor more information try --help");
            return ExitCode::from(153);
        }
    };
    // One thread: a thousand of these must fit on one machine.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(http::serve(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    };
    drop(runtime);
    if let Some(ms) = std::env::var("FIRECRACKER_SIM_REAP_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        linger_then_exit(code, std::time::Duration::from_millis(ms));
    }
    ExitCode::from(code)
}

/// Ends the way a multi-threaded Firecracker does: the main thread is gone
/// (so `/proc/<pid>/stat` shows the process as a zombie) while another
/// thread still tears down for `delay`; only then can the parent reap it.
fn linger_then_exit(code: u8, delay: std::time::Duration) -> ! {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        std::process::exit(i32::from(code));
    });
    // SAFETY: the raw exit system call ends only the calling (main) thread,
    // without unwinding (pthread_exit would unwind through Rust frames);
    // the spawned thread ends the process.
    unsafe {
        libc::syscall(libc::SYS_exit, 0);
    }
    unreachable!("the exit system call returned")
}
