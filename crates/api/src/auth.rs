//! Wire types of identity and audit: tokens, node joins and credentials,
//! audit records.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Prefix of every API token: `nexus_<16 hex id>_<64 hex secret>`.
pub const TOKEN_PREFIX: &str = "nexus_";

/// Splits a presented token into its public id and its secret; `None`
/// when it does not have the token's shape.
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// Body of `POST /v1/tokens`: a new token for a subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// Who the token stands for: `user:NAME`, `sa:PROJECT:NAME`,
    /// `system:controller` or `system:join` (a node join token). Default:
    /// the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// What it is for, for people reading `token list`.
    #[serde(default)]
    pub description: String,
    /// Lifetime in seconds; none: until revoked (join tokens: 1 hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// The public part, also the first part of the token itself.
    pub id: String,
    pub subject: String,
    #[serde(default)]
    pub description: String,
    pub created_at: DateTime<Utc>,
    /// The subject that created it.
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// The token that replaced this one in a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
}

/// A token just made: the secret is shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedToken {
    /// Present it as `Authorization: Bearer <token>`.
    pub token: String,
    pub info: TokenInfo,
}

/// Body of `POST /v1/tokens/{id}/rotate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old token keeps working (default 300 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<u64>,
}

/// The tokens of a subject, or all the caller may see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
}

/// A node agent's API credential: callers of that agent present it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeCredential {
    /// The current credential.
    pub secret: String,
    /// The one it replaced, still accepted for a while after a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// Who the caller is and what it holds (`GET /v1/whoami`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    pub subject: String,
    /// Roles by project.
    #[serde(default)]
    pub projects: std::collections::BTreeMap<String, Vec<crate::rbac::Role>>,
    /// Roles in every project.
    #[serde(default)]
    pub cluster: Vec<crate::rbac::Role>,
}

/// What became of an audited request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditResult {
    /// Done (or answered without a change, as a dry run).
    Allowed,
    /// Refused by authentication or authorization.
    Denied,
    /// Authorized, then refused or failed (invalid, conflict, ...).
    Failed,
}

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The id the server gave the request (echoed as `X-Request-Id`).
    pub request_id: String,
    /// The client's own `X-Request-Id`, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The subject (`user:alice`), or `anonymous`.
    pub actor: String,
    /// The token used, by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    pub verb: String,
    pub kind: String,
    #[serde(default)]
    pub project: String,
    #[serde(default)]
    pub name: String,
    /// The object's version after the change (0 when nothing changed).
    #[serde(default)]
    pub resource_version: i64,
    pub result: AuditResult,
    /// The HTTP status answered.
    pub status_code: u16,
    /// What changed, field by field (`spec.state: Running -> Stopped`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// Why it was refused or failed; for a change made by a lease holder
    /// (the controller), the term it was made in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A page of audit records, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditList {
    pub items: Vec<AuditRecord>,
    /// Pass as `continue` for the next page.
    #[serde(default, rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_into_id_and_secret_only_when_well_formed() {
        let t = format!("nexus_{}_{}", "0123456789abcdef", "a".repeat(64));
        assert_eq!(split_token(&t), Some(("0123456789abcdef", "a".repeat(64).as_str())));
        for bad in ["", "nexus_", "nexus_0123456789abcdef", "Bearer x", &t.replace("nexus_", "nexus-")] {
            assert_eq!(split_token(bad), None, "{bad}");
        }
        assert_eq!(split_token(&t.to_uppercase()), None);
    }
}
