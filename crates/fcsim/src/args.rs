//! Firecracker's command-line flags, as far as a stand-in needs them.

use std::path::PathBuf;

/// Default socket path of Firecracker when `--api-sock` is not given.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// Flags that take a value and are accepted (most are ignored).
const VALUE_FLAGS: &[&str] = &[
    "--api-sock",
    "--id",
    "--level",
    "--log-path",
    "--module",
    "--config-file",
    "--metadata",
    "--seccomp-filter",
    "--start-time-us",
    "--start-time-cpu-us",
    "--parent-cpu-time-us",
    "--http-api-max-payload-size",
    "--mmds-size-limit",
    "--metrics-path",
];
/// Flags without a value.
const BOOL_FLAGS: &[&str] =
    &["--no-api", "--no-seccomp", "--boot-timer", "--show-level", "--show-log-origin", "--enable-pci"];

#[derive(Debug)]
pub struct Args {
    pub api_sock: PathBuf,
    pub id: String,
}

#[derive(Debug)]
pub enum Parsed {
    Run(Args),
    Version,
}

impl Args {
    /// Parses the flags as Firecracker does: `--flag value` pairs, unknown
    /// flags rejected.
    pub fn parse(mut argv: impl Iterator<Item = String>) -> Result<Parsed, String> {
        let mut args = Args { api_sock: PathBuf::from(DEFAULT_API_SOCK), id: "anonymous-instance".into() };
        while let Some(flag) = argv.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (flag.clone(), None),
            };
            if name == "--version" {
                return Ok(Parsed::Version);
            }
            if BOOL_FLAGS.contains(&name.as_str()) {
                continue;
            }
            if !VALUE_FLAGS.contains(&name.as_str()) {
                return Err(format!("Found argument '{flag}' which wasn't expected, or isn't valid in this context."));
            }
            let value = match inline {
                Some(v) => v,
                None => argv
                    .next()
                    .ok_or_else(|| format!("The argument '{name}' requires a value but none was supplied"))?,
            };
            match name.as_str() {
                "--api-sock" => args.api_sock = PathBuf::from(value),
                "--id" => {
                    if value.is_empty()
                        || value.len() > 64
                        || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    {
                        return Err(format!("Invalid instance ID: {value}"));
                    }
                    args.id = value;
                }
                _ => {}
            }
        }
        Ok(Parsed::Run(args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Parsed, String> {
        Args::parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn api_sock_and_id_are_taken_and_unknown_flags_refused() {
        match parse(&["--api-sock", "/tmp/x.sock", "--id", "vm-1", "--no-seccomp"]).unwrap() {
            Parsed::Run(a) => {
                assert_eq!(a.api_sock, PathBuf::from("/tmp/x.sock"));
                assert_eq!(a.id, "vm-1");
            }
            Parsed::Version => panic!("not --version"),
        }
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--id", "bad/id"]).is_err());
    }
}
