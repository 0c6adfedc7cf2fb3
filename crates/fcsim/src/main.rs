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
    match runtime.block_on(http::serve(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
