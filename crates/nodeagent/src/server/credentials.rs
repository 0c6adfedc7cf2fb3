//! The agent's two credentials, each its own and rotated without a restart:
//!
//! - its **node token**, which lets it act as `node:<name>` on the apiserver
//!   (write its own Node's status, nothing else). It gets one by joining
//!   with a short-lived join token, keeps it in its state directory, and
//!   rotates it at half its lifetime;
//! - its **agent credential**, which callers of its own API must present.
//!   It makes one itself, gives it to the apiserver (from where only the
//!   controller, and the apiserver where it proxies, can read it), and
//!   rotates it daily; after a rotation the previous one is still accepted
//!   for a while, so calls in flight do not fail.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use nexus_api::auth::{NodeCredential, RotateRequest, split_token};
use nexus_client::Client;

/// How long a replaced credential or token keeps working.
pub const GRACE: Duration = Duration::from_secs(600);

/// File names in the state directory.
const NODE_TOKEN: &str = "node.token";
const AGENT_CREDENTIAL: &str = "agent.credential";

/// Why the agent cannot get its credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "this node has not joined yet: start the agent once with --join-token-file (a join token from `nexusctl token create --subject system:join`)"
    )]
    NotJoined,
    #[error("the apiserver refused: {0}")]
    Refused(#[source] nexus_client::ClientError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn read_secret(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn write_secret(path: &Path, secret: &str) -> Result<(), CredentialError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| CredentialError::Io { what, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
    }
    let tmp = path.with_extension("partial");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("writing"))?;
    f.write_all(secret.as_bytes()).map_err(io("writing"))?;
    f.sync_all().map_err(io("writing"))?;
    std::fs::rename(&tmp, path).map_err(io("writing"))
}

fn random_secret() -> String {
    let mut buf = [0u8; 32];
    // The OS's randomness is always there on Linux; no fallback is safe.
    getrandom::fill(&mut buf).expect("the OS random source");
    hex::encode(buf)
}

/// The credential callers of this agent's API must present.
#[derive(Debug)]
pub struct AgentCredential {
    /// (current, previous still accepted)
    secrets: RwLock<(String, Option<String>)>,
    file: PathBuf,
}

impl AgentCredential {
    /// Loads the credential from `state_dir`, or makes one there.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CredentialError> {
        let file = state_dir.join(AGENT_CREDENTIAL);
        let secret = match read_secret(&file) {
            Some(s) => s,
            None => {
                let s = random_secret();
                write_secret(&file, &s)?;
                s
            }
        };
        Ok(AgentCredential { secrets: RwLock::new((secret, None)), file })
    }

    /// A credential that is only ever `secret` (tests).
    pub fn fixed(secret: &str) -> Self {
        AgentCredential { secrets: RwLock::new((secret.to_string(), None)), file: PathBuf::new() }
    }

    /// Whether `presented` is the current or the previous credential, in
    /// constant time.
    pub fn accepts(&self, presented: &str) -> bool {
        let s = self.secrets.read().unwrap_or_else(|p| p.into_inner());
        let current = constant_time_eq(presented.as_bytes(), s.0.as_bytes());
        let previous = s.1.as_ref().is_some_and(|p| constant_time_eq(presented.as_bytes(), p.as_bytes()));
        current | previous
    }

    /// The credential as the apiserver should hold it.
    pub fn current(&self) -> NodeCredential {
        let s = self.secrets.read().unwrap_or_else(|p| p.into_inner());
        NodeCredential { secret: s.0.clone(), previous: s.1.clone() }
    }

    /// Makes a new credential; the old one stays accepted until the next
    /// rotation or [`AgentCredential::forget_previous`].
    fn rotate(&self) -> Result<NodeCredential, CredentialError> {
        let new = random_secret();
        write_secret(&self.file, &new)?;
        let mut s = self.secrets.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::replace(&mut s.0, new);
        s.1 = Some(old);
        Ok(NodeCredential { secret: s.0.clone(), previous: s.1.clone() })
    }

    /// Stops accepting the previous credential.
    fn forget_previous(&self) {
        self.secrets.write().unwrap_or_else(|p| p.into_inner()).1 = None;
    }
}

/// Compares in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Retries `f` while the apiserver cannot be reached; gives up on an answer
/// that refuses.
async fn patiently<T, F, Fut>(what: &str, mut f: F) -> Result<T, nexus_client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, nexus_client::ClientError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Err(e @ nexus_client::ClientError::Transport { .. }) => {
                tracing::warn!(error = %e, "{what}: the apiserver is not answering; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Gets this node's token (joining with the join token in `join_token_file`
/// when there is none yet) and makes `api` present it.
pub async fn establish_node_token(
    api: &Client,
    node: &str,
    state_dir: &Path,
    join_token_file: Option<&Path>,
) -> Result<(), CredentialError> {
    let file = state_dir.join(NODE_TOKEN);
    if let Some(token) = read_secret(&file) {
        api.set_token(Some(token));
        // Still good? (Revoked or expired: join again, when we can.)
        match patiently("checking the node token", || api.whoami()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.status() == Some(401) && join_token_file.is_some() => {
                tracing::warn!(error = %e, "the node token is no longer accepted; joining again");
            }
            Err(e) => return Err(CredentialError::Refused(e)),
        }
    }
    let join = join_token_file.and_then(read_secret).ok_or(CredentialError::NotJoined)?;
    api.set_token(Some(join));
    let issued = patiently("joining", || api.join(node)).await.map_err(CredentialError::Refused)?;
    write_secret(&file, &issued.token)?;
    api.set_token(Some(issued.token));
    tracing::info!(node, token = %issued.info.id, "joined the cluster");
    Ok(())
}

/// Gives the apiserver this agent's credential.
pub async fn publish(api: &Client, node: &str, cred: &AgentCredential) -> Result<(), CredentialError> {
    let current = cred.current();
    patiently("publishing the agent credential", || api.set_node_credential(node, &current))
        .await
        .map_err(CredentialError::Refused)
}

/// Rotates both credentials every `every`, forever.
pub async fn rotate_forever(
    api: Client,
    node: String,
    state_dir: PathBuf,
    cred: std::sync::Arc<AgentCredential>,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        match rotate_once(&api, &node, &state_dir, &cred).await {
            Ok(()) => {
                // Calls made with the old credential have until then.
                let cred = cred.clone();
                let grace = GRACE.min(every / 2);
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    cred.forget_previous();
                });
            }
            Err(e) => tracing::warn!(error = %e, "rotating the node's credentials failed; trying again next time"),
        }
    }
}

/// One rotation of both credentials.
pub async fn rotate_once(
    api: &Client,
    node: &str,
    state_dir: &Path,
    cred: &AgentCredential,
) -> Result<(), CredentialError> {
    let next = cred.rotate()?;
    patiently("publishing the rotated agent credential", || api.set_node_credential(node, &next))
        .await
        .map_err(CredentialError::Refused)?;
    tracing::info!(node, "rotated the agent credential; the previous one is accepted for a while");
    let token = api.token().unwrap_or_default();
    if let Some((id, _)) = split_token(&token) {
        let req = RotateRequest { grace_seconds: Some(GRACE.as_secs()) };
        let id = id.to_string();
        let issued = patiently("rotating the node token", || api.rotate_token(&id, &req))
            .await
            .map_err(CredentialError::Refused)?;
        write_secret(&state_dir.join(NODE_TOKEN), &issued.token)?;
        api.set_token(Some(issued.token));
        tracing::info!(node, token = %issued.info.id, "rotated the node token");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_credential_is_accepted_with_its_predecessor_until_that_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cred = AgentCredential::load_or_create(dir.path()).unwrap();
        let first = cred.current().secret;
        assert_eq!(AgentCredential::load_or_create(dir.path()).unwrap().current().secret, first, "kept on disk");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(AGENT_CREDENTIAL)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let next = cred.rotate().unwrap();
        assert!(cred.accepts(&first) && cred.accepts(&next.secret));
        cred.forget_previous();
        assert!(!cred.accepts(&first) && cred.accepts(&next.secret));
        assert!(!cred.accepts("") && !cred.accepts("nope"));
    }
}
