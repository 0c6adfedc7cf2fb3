//! API tokens: issued high-entropy, shown once, stored as Argon2id hashes,
//! checked with a cache so a request pays for a hash only on a token's
//! first use (or after a restart).
//!
//! A token is `nexus_<id>_<secret>`: the public id finds the one stored
//! hash to check. A verified token is trusted from the cache for at most
//! [`RECHECK`]; after that its row is read again (no hash), so a revocation
//! or an expiry is seen within that time by every apiserver, whichever one
//! it was made on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use chrono::{DateTime, Utc};
use nexus_api::auth::{IssuedToken, TOKEN_PREFIX, TokenInfo, split_token};
use nexus_api::rbac::Subject;
use sha2::Digest;

use crate::error::ApiError;
use crate::store::Store;
use crate::store::access::TokenRow;

/// How long a verified token is trusted before its row is read again.
pub const RECHECK: Duration = Duration::from_millis(500);
/// How often `last_used_at` is written for a token in use.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Lifetime of a join token unless asked otherwise.
pub const JOIN_TTL: Duration = Duration::from_secs(3600);
/// How long a rotated token keeps working unless asked otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

/// Why a presented token is not accepted (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed: expected nexus_<16 hex>_<64 hex>")]
    Malformed,
    #[error("the token is not known")]
    Unknown,
    #[error("the token was revoked")]
    Revoked,
    #[error("the token expired")]
    Expired,
    #[error("the token's subject {0:?} is not valid")]
    BadSubject(String),
}

/// A token that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub id: String,
    pub subject: Subject,
}

#[derive(Debug, Clone)]
struct Cached {
    verified: Verified,
    checked: Instant,
    touched: Instant,
}

/// Issues and checks tokens.
#[derive(Debug, Default)]
pub struct Tokens {
    /// By the SHA-256 of the whole token: a hit proves the secret.
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

/// Argon2id with OWASP's minimum settings (19 MiB, 2 passes, 1 lane).
fn params() -> Params {
    Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters")
}

/// The memory one Argon2 computation works in, mapped for that computation
/// alone and unmapped when it ends. Taken from the allocator instead, the
/// 19 MiB of each check would stay with the thread that made it: a burst of
/// first requests with new tokens left the apiserver holding 300-700 MiB.
struct WorkArea {
    blocks: std::ptr::NonNull<Block>,
    count: usize,
}

impl WorkArea {
    fn map(count: usize) -> std::io::Result<Self> {
        let len = count * std::mem::size_of::<Block>();
        // SAFETY: a new private anonymous mapping; it aliases nothing.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let blocks = std::ptr::NonNull::new(at.cast::<Block>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(WorkArea { blocks, count })
    }
}

impl AsMut<[Block]> for WorkArea {
    fn as_mut(&mut self) -> &mut [Block] {
        // SAFETY: the mapping holds `count` blocks, is page-aligned (more
        // than a block's 64 bytes), zero-filled (a valid block is any
        // bits), and borrowed mutably through `self` only.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_ptr(), self.count) }
    }
}

impl Drop for WorkArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, no longer borrowed.
        unsafe { libc::munmap(self.blocks.as_ptr().cast(), self.count * std::mem::size_of::<Block>()) };
    }
}

/// The Argon2id output for `secret` and `salt` under `params`, `len` bytes.
fn argon2id(params: Params, secret: &[u8], salt: Salt<'_>, len: usize) -> Result<Output, String> {
    let mut salt_bytes = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_bytes).map_err(|e| e.to_string())?;
    let hasher = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut memory = WorkArea::map(hasher.params().block_count()).map_err(|e| format!("no memory to hash in: {e}"))?;
    Output::init_with(len, |out| {
        hasher.hash_password_into_with_memory(secret, salt, out, &mut memory).map_err(Into::into)
    })
    .map_err(|e| e.to_string())
}

/// A new token secret's stored form: its Argon2id hash in PHC format.
fn hash_secret(secret: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    let params = params();
    let output = argon2id(params.clone(), secret.as_bytes(), salt.as_salt(), Params::DEFAULT_OUTPUT_LEN)?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| e.to_string())?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// Whether `secret` is the one `stored` (a PHC string from [`hash_secret`])
/// was made from. The comparison takes the same time wherever they differ.
fn secret_matches(secret: &str, stored: &str) -> bool {
    let Ok(hash) = PasswordHash::new(stored) else { return false };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else { return false };
    if hash.algorithm != Algorithm::Argon2id.ident() || hash.version != Some(Version::V0x13.into()) {
        return false;
    }
    let Ok(params) = Params::try_from(&hash) else { return false };
    argon2id(params, secret.as_bytes(), salt, expected.len()).is_ok_and(|got| got == expected)
}

fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    Ok(hex::encode(buf))
}

fn key(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Makes a token for `subject`, valid for `ttl` (forever when `None`).
    pub async fn issue(
        &self,
        store: &Store,
        subject: &Subject,
        description: &str,
        ttl: Option<Duration>,
        created_by: &str,
    ) -> Result<IssuedToken, ApiError> {
        let id = random_hex(8)?;
        let secret = random_hex(32)?;
        let hash = tokio::task::spawn_blocking(move || hash_secret(&secret).map(|h| (h, secret)))
            .await
            .map_err(|e| ApiError::Internal(format!("hashing failed: {e}")))?
            .map_err(|e| ApiError::Internal(format!("hashing failed: {e}")))?;
        let (hash, secret) = hash;
        let now = Utc::now();
        let info = TokenInfo {
            id: id.clone(),
            subject: subject.to_string(),
            description: description.to_string(),
            created_at: now,
            created_by: created_by.to_string(),
            expires_at: ttl.map(|t| now + chrono::Duration::from_std(t).unwrap_or(chrono::Duration::MAX)),
            last_used_at: None,
            revoked_at: None,
            replaced_by: None,
        };
        store.insert_token(&TokenRow { info: info.clone(), hash }).await?;
        Ok(IssuedToken { token: format!("{TOKEN_PREFIX}{id}_{secret}"), info })
    }

    /// Whether `row` may be used at `now`.
    fn usable(row: &TokenRow, now: DateTime<Utc>) -> Result<Subject, TokenError> {
        if row.info.revoked_at.is_some() {
            return Err(TokenError::Revoked);
        }
        if row.info.expires_at.is_some_and(|t| t <= now) {
            return Err(TokenError::Expired);
        }
        Subject::parse(&row.info.subject).map_err(|_| TokenError::BadSubject(row.info.subject.clone()))
    }

    /// Checks a presented token.
    pub async fn verify(&self, store: &Store, token: &str) -> Result<Result<Verified, TokenError>, ApiError> {
        let Some((id, secret)) = split_token(token) else { return Ok(Err(TokenError::Malformed)) };
        let k = key(token);
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&k).cloned();
        if let Some(c) = &cached
            && c.checked.elapsed() < RECHECK
        {
            return Ok(Ok(c.verified.clone()));
        }
        let Some(row) = store.token(id).await? else {
            self.forget(&k);
            return Ok(Err(TokenError::Unknown));
        };
        let now = Utc::now();
        let subject = match Self::usable(&row, now) {
            Ok(s) => s,
            Err(e) => {
                self.forget(&k);
                return Ok(Err(e));
            }
        };
        let touched = match &cached {
            Some(c) => c.touched,
            None => {
                let (secret, hash) = (secret.to_string(), row.hash.clone());
                let ok = tokio::task::spawn_blocking(move || secret_matches(&secret, &hash))
                    .await
                    .map_err(|e| ApiError::Internal(format!("verifying failed: {e}")))?;
                if !ok {
                    return Ok(Err(TokenError::Unknown));
                }
                Instant::now() - TOUCH_EVERY
            }
        };
        let verified = Verified { id: id.to_string(), subject };
        let touch = touched.elapsed() >= TOUCH_EVERY;
        if touch {
            store.touch_token(id, now).await?;
        }
        let entry = Cached {
            verified: verified.clone(),
            checked: Instant::now(),
            touched: if touch { Instant::now() } else { touched },
        };
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(k, entry);
        Ok(Ok(verified))
    }

    fn forget(&self, k: &[u8; 32]) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).remove(k);
    }

    /// Revokes token `id`; it stops working within [`RECHECK`] everywhere.
    pub async fn revoke(&self, store: &Store, id: &str) -> Result<(), ApiError> {
        store.revoke_token(id, Utc::now()).await?;
        // This server forgets it at once.
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, c| c.verified.id != id);
        Ok(())
    }

    /// Issues a successor of `old` for the same subject; `old` keeps working
    /// for `grace`, then expires.
    pub async fn rotate(
        &self,
        store: &Store,
        old: &TokenRow,
        grace: Duration,
        by: &str,
    ) -> Result<IssuedToken, ApiError> {
        let subject = Subject::parse(&old.info.subject).map_err(ApiError::BadRequest)?;
        let now = Utc::now();
        let ttl = old.info.expires_at.map(|t| (t - old.info.created_at).to_std().unwrap_or_default());
        let description = if old.info.description.is_empty() {
            format!("rotated from {}", old.info.id)
        } else {
            old.info.description.clone()
        };
        let new = self.issue(store, &subject, &description, ttl, by).await?;
        let grace_end = now + chrono::Duration::from_std(grace).unwrap_or_default();
        let ends = old.info.expires_at.map_or(grace_end, |t| t.min(grace_end));
        store.retire_token(&old.info.id, &new.info.id, ends).await?;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("nexus.db")).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn an_issued_token_verifies_and_a_wrong_secret_or_shape_does_not() {
        let (_d, store) = store().await;
        let tokens = Tokens::default();
        let alice = Subject::User("alice".into());
        let issued = tokens.issue(&store, &alice, "laptop", None, "user:admin").await.unwrap();
        assert!(issued.token.starts_with("nexus_"));
        let ok = tokens.verify(&store, &issued.token).await.unwrap().unwrap();
        assert_eq!((ok.subject, ok.id.as_str()), (alice, issued.info.id.as_str()));
        let mut wrong = issued.token.clone();
        wrong.replace_range(wrong.len() - 4.., "0000");
        assert_eq!(tokens.verify(&store, &wrong).await.unwrap(), Err(TokenError::Unknown));
        assert_eq!(tokens.verify(&store, "hunter2").await.unwrap(), Err(TokenError::Malformed));
        let stored = store.token(&issued.info.id).await.unwrap().unwrap();
        assert!(stored.hash.starts_with("$argon2id$"), "only a hash is stored");
        assert!(!stored.hash.contains(&issued.token[23..]));
    }

    #[test]
    fn hashes_are_standard_phc_argon2id_both_ways() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let standard = Argon2::new(Algorithm::Argon2id, Version::V0x13, params());
        // A hash stored before the work area was mapped by hand still checks.
        let salt = SaltString::generate(&mut OsRng);
        let old = standard.hash_password(b"s3cret", &salt).unwrap().to_string();
        assert!(secret_matches("s3cret", &old));
        assert!(!secret_matches("s3creT", &old));
        // And a new one is what the standard verifier expects.
        let new = hash_secret("s3cret").unwrap();
        assert!(new.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{new}");
        standard.verify_password(b"s3cret", &PasswordHash::new(&new).unwrap()).unwrap();
        assert!(!secret_matches("s3cret", "$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA"));
        assert!(!secret_matches("s3cret", "not a hash"));
    }

    #[tokio::test]
    async fn revocation_and_rotation_take_effect_and_the_old_token_lives_for_its_grace() {
        let (_d, store) = store().await;
        let tokens = Tokens::default();
        let ci = Subject::ServiceAccount { project: "p".into(), name: "ci".into() };
        let old = tokens.issue(&store, &ci, "", None, "user:admin").await.unwrap();
        tokens.verify(&store, &old.token).await.unwrap().unwrap();
        let row = store.token(&old.info.id).await.unwrap().unwrap();
        let new = tokens.rotate(&store, &row, RECHECK * 3, "user:admin").await.unwrap();
        tokio::time::sleep(RECHECK).await;
        assert!(tokens.verify(&store, &old.token).await.unwrap().is_ok(), "in its grace");
        assert!(tokens.verify(&store, &new.token).await.unwrap().is_ok());
        tokio::time::sleep(RECHECK * 3).await;
        assert_eq!(tokens.verify(&store, &old.token).await.unwrap(), Err(TokenError::Expired));
        tokens.revoke(&store, &new.info.id).await.unwrap();
        assert_eq!(tokens.verify(&store, &new.token).await.unwrap(), Err(TokenError::Revoked));
        let listed = store.token(&old.info.id).await.unwrap().unwrap().info;
        assert_eq!(listed.replaced_by.as_deref(), Some(new.info.id.as_str()));
    }
}
