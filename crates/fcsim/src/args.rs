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
    /// `--log-path` and the flags shaping the log, as `PUT /logger` takes them.
    pub logger: crate::model::Logger,
    /// `--metrics-path`.
    pub metrics_path: Option<String>,
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
        let mut args = Args {
            api_sock: PathBuf::from(DEFAULT_API_SOCK),
            id: "anonymous-instance".into(),
            logger: crate::model::Logger {
                log_path: None,
                level: None,
                show_level: None,
                show_log_origin: None,
                module: None,
            },
            metrics_path: None,
        };
        while let Some(flag) = argv.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (flag.clone(), None),
            };
            if name == "--version" {
                return Ok(Parsed::Version);
            }
            if BOOL_FLAGS.contains(&name.as_str()) {
                match name.as_str() {
                    "--show-level" => args.logger.show_level = Some(true),
                    "--show-log-origin" => args.logger.show_log_origin = Some(true),
                    _ => {}
                }
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
                "--log-path" => args.logger.log_path = Some(value),
                "--level" => {
                    let level = serde_json::from_value(serde_json::Value::String(value.clone()))
                        .map_err(|_| format!("Invalid value for logger level: {value}"))?;
                    args.logger.level = Some(level);
                }
                "--module" => args.logger.module = Some(value),
                "--metrics-path" => args.metrics_path = Some(value),
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
    fn the_log_and_metrics_flags_are_taken() {
        let argv = ["--log-path", "/vm/fc.log", "--level", "Info", "--show-level", "--metrics-path", "/vm/m.json"];
        match parse(&argv).unwrap() {
            Parsed::Run(a) => {
                assert_eq!(a.logger.log_path.as_deref(), Some("/vm/fc.log"));
                assert_eq!(a.logger.show_level, Some(true));
                assert!(a.logger.level.is_some());
                assert_eq!(a.metrics_path.as_deref(), Some("/vm/m.json"));
            }
            Parsed::Version => panic!("not --version"),
        }
        assert!(parse(&["--level", "loud"]).unwrap_err().contains("logger level"));
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
