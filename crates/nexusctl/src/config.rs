//! Contexts: named (server, CA, token, project) entries in
//! `~/.config/nexus/config.yaml` (or `$NEXUS_CONFIG`), one of them current.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Server used when nothing else names one.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7443";

/// The config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// One named context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Path of the CA certificate (PEM) the server's certificate is checked
    /// against; without one, the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// Where the config file lives.
pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("NEXUS_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("nexus").join("config.yaml")
}

impl Config {
    /// Loads the config file; a missing file is an empty config.
    pub fn load() -> Result<Config, String> {
        let p = path();
        match std::fs::read_to_string(&p) {
            Ok(text) => serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(format!("reading {}: {e}", p.display())),
        }
    }

    /// Writes the config file (mode 0600: it may hold tokens).
    pub fn save(&self) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = path();
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let text = serde_saphyr::to_string(self).map_err(|e| e.to_string())?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| format!("writing {}: {e}", p.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| format!("writing {}: {e}", p.display()))
    }

    /// The context named `name`, or the current one.
    pub fn context(&self, name: Option<&str>) -> Result<Option<&Context>, String> {
        match name.or(self.current_context.as_deref()) {
            None => Ok(None),
            Some(n) => self.contexts.iter().find(|c| c.name == n).map(Some).ok_or_else(|| {
                let known: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
                format!(
                    "no context named {n:?} in {}; known: {}",
                    path().display(),
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                )
            }),
        }
    }
}
