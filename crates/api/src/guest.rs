//! What a guest is told about itself: its identity, labels, user data, SSH
//! keys and the user's own metadata, served to it by Firecracker's metadata
//! service (MMDS, version 2) at `169.254.169.254`. Types, their validation,
//! how a template's and a VM's values merge, and the document the guest
//! reads; no I/O.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::validation::FieldErrors;

/// Largest `userData`, in bytes. Firecracker's metadata store holds at
/// most 51,200 bytes (its default limit), the whole document included.
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Largest `metadata`, as JSON, in bytes.
pub const MAX_METADATA: usize = 16 * 1024;
/// Most SSH keys a VM may carry.
pub const MAX_SSH_KEYS: usize = 32;
/// Longest SSH key line, in bytes (a 16,384-bit RSA key fits).
pub const MAX_SSH_KEY: usize = 4096;
/// The address the guest reaches its metadata at.
pub const MMDS_ADDRESS: &str = "169.254.169.254";

/// The OpenSSH public key types a key line may start with.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// The guest-facing fields of a VM's (or a template's) spec, resolved: the
/// template's merged with the VM's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Value>,
}

impl GuestConfig {
    /// A template's values with a VM's over them: the VM's `userData`
    /// replaces the template's; keys are the template's followed by the
    /// VM's (each once); `metadata` is merged key by key, the VM's winning.
    pub fn merge(template: &GuestConfig, vm: &GuestConfig) -> GuestConfig {
        let mut keys = template.ssh_authorized_keys.clone();
        for k in &vm.ssh_authorized_keys {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        let mut metadata = template.metadata.clone();
        metadata.extend(vm.metadata.clone());
        GuestConfig {
            user_data: vm.user_data.clone().or_else(|| template.user_data.clone()),
            ssh_authorized_keys: keys,
            metadata,
        }
    }
}

/// Checks a spec's guest fields, naming each field as the user wrote it
/// (`spec.userData`, `spec.sshAuthorizedKeys[1]`, `spec.metadata`).
pub fn validate(errors: &mut FieldErrors, at: &str, guest: &GuestConfig) {
    if let Some(data) = &guest.user_data
        && data.len() > MAX_USER_DATA
    {
        errors.add(
            &format!("{at}.userData"),
            format!("{} bytes", data.len()),
            &format!(
                "at most {MAX_USER_DATA} bytes (the guest's metadata store is small); put larger payloads in an \
                 Image or a Volume and have the user data fetch or mount them"
            ),
        );
    }
    if guest.ssh_authorized_keys.len() > MAX_SSH_KEYS {
        errors.add(
            &format!("{at}.sshAuthorizedKeys"),
            format!("{} keys", guest.ssh_authorized_keys.len()),
            &format!("at most {MAX_SSH_KEYS} keys"),
        );
    }
    for (i, key) in guest.ssh_authorized_keys.iter().enumerate() {
        if let Err(why) = check_ssh_key(key) {
            errors.add(&format!("{at}.sshAuthorizedKeys[{i}]"), key, &why);
        }
    }
    let size = serde_json::to_vec(&guest.metadata).map(|v| v.len()).unwrap_or(0);
    if size > MAX_METADATA {
        errors.add(
            &format!("{at}.metadata"),
            format!("{size} bytes of JSON"),
            &format!("at most {MAX_METADATA} bytes"),
        );
    }
}

/// Whether `key` is one OpenSSH public key line: `TYPE BASE64 [COMMENT]`.
fn check_ssh_key(key: &str) -> Result<(), String> {
    let expected = "an OpenSSH public key on one line, `TYPE BASE64 [COMMENT]` (the contents of id_ed25519.pub, say)";
    if key.len() > MAX_SSH_KEY {
        return Err(format!("at most {MAX_SSH_KEY} bytes: {expected}"));
    }
    if key.contains(['\n', '\r', '\0']) {
        return Err(format!("one line: {expected}"));
    }
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(body)) = (parts.next(), parts.next()) else {
        return Err(expected.to_string());
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!("a key type OpenSSH knows ({}): {expected}", SSH_KEY_TYPES.join(", ")));
    }
    let base64 = body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    if !base64 || body.len() < 16 {
        return Err(format!("the key itself in base64 after the type: {expected}"));
    }
    Ok(())
}

/// Who a VM is, as its guest is told: the fields the controller knows.
/// The node's agent adds the uid and the address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestIdentity {
    pub name: String,
    pub project: String,
    /// The node the VM is placed on.
    pub node: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, flatten)]
    pub config: GuestConfig,
}

/// The document a guest reads from its metadata service (what
/// `GET /mmds` returns on the VMM's API), in two trees:
///
/// - `latest/`: EC2's layout, which cloud-init's EC2 source and most
///   tools read: `meta-data/instance-id`, `meta-data/local-hostname`,
///   `meta-data/hostname`, `meta-data/local-ipv4`,
///   `meta-data/public-keys/N/openssh-key`, and `user-data`;
/// - `nexus/`: everything nexus knows, as typed JSON: `name`, `uid`,
///   `project`, `node`, `hostname`, `address`, `labels`, `metadata`,
///   `sshAuthorizedKeys`.
pub fn document(id: &GuestIdentity, uid: &str, address: Option<&str>) -> Value {
    let cfg = &id.config;
    let hostname = id.name.clone();
    let keys: serde_json::Map<String, Value> =
        cfg.ssh_authorized_keys.iter().enumerate().map(|(i, k)| (i.to_string(), json!({"openssh-key": k}))).collect();
    let mut meta = json!({
        "instance-id": uid,
        "local-hostname": hostname,
        "hostname": hostname,
        "public-keys": keys,
    });
    if let Some(a) = address {
        meta["local-ipv4"] = json!(a);
    }
    let mut latest = json!({"meta-data": meta});
    if let Some(data) = &cfg.user_data {
        latest["user-data"] = json!(data);
    }
    json!({
        "latest": latest,
        "nexus": {
            "name": id.name,
            "uid": uid,
            "project": id.project,
            "node": id.node,
            "hostname": hostname,
            "address": address,
            "labels": id.labels,
            "metadata": cfg.metadata,
            "sshAuthorizedKeys": cfg.ssh_authorized_keys,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3k0Zq0o0example0key0material0000000000 ci@example";

    #[test]
    fn a_vms_values_go_over_its_templates() {
        let template = GuestConfig {
            user_data: Some("#!/bin/sh\necho template\n".into()),
            ssh_authorized_keys: vec![KEY.into()],
            metadata: BTreeMap::from([("team".into(), json!("ci")), ("tier".into(), json!(1))]),
        };
        let vm = GuestConfig {
            user_data: Some("#!/bin/sh\necho vm\n".into()),
            ssh_authorized_keys: vec![KEY.into(), format!("{KEY}2")],
            metadata: BTreeMap::from([("tier".into(), json!(2))]),
        };
        let merged = GuestConfig::merge(&template, &vm);
        assert_eq!(merged.user_data.as_deref(), Some("#!/bin/sh\necho vm\n"));
        assert_eq!(merged.ssh_authorized_keys, vec![KEY.to_string(), format!("{KEY}2")]);
        assert_eq!(merged.metadata["team"], "ci");
        assert_eq!(merged.metadata["tier"], 2);
        let inherited = GuestConfig::merge(&template, &GuestConfig::default());
        assert_eq!(inherited, template);
    }

    #[test]
    fn bad_values_are_refused_with_the_field() {
        let guest = GuestConfig {
            user_data: Some("x".repeat(MAX_USER_DATA + 1)),
            ssh_authorized_keys: vec![KEY.into(), "not a key".into(), "ssh-ed25519 AAAA\nssh-rsa AAAA".into()],
            metadata: BTreeMap::from([("big".into(), json!("y".repeat(MAX_METADATA)))]),
        };
        let mut errors = FieldErrors::default();
        validate(&mut errors, "spec", &guest);
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.userData", "spec.sshAuthorizedKeys[1]", "spec.sshAuthorizedKeys[2]", "spec.metadata"]
        );
        assert!(errors.0[0].expected.contains("16384 bytes"), "{}", errors.0[0].expected);
    }

    #[test]
    fn the_document_has_ec2s_layout_and_nexus_own() {
        let id = GuestIdentity {
            name: "runner-1".into(),
            project: "ci".into(),
            node: "node-a".into(),
            labels: BTreeMap::from([("role".into(), "runner".into())]),
            config: GuestConfig {
                user_data: Some("#!/bin/sh\n".into()),
                ssh_authorized_keys: vec![KEY.into()],
                metadata: BTreeMap::from([("job".into(), json!({"id": 7}))]),
            },
        };
        let doc = document(&id, "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11", Some("172.30.0.5"));
        assert_eq!(doc["latest"]["meta-data"]["instance-id"], "7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11");
        assert_eq!(doc["latest"]["meta-data"]["local-hostname"], "runner-1");
        assert_eq!(doc["latest"]["meta-data"]["local-ipv4"], "172.30.0.5");
        assert_eq!(doc["latest"]["meta-data"]["public-keys"]["0"]["openssh-key"], KEY);
        assert_eq!(doc["latest"]["user-data"], "#!/bin/sh\n");
        assert_eq!(doc["nexus"]["labels"]["role"], "runner");
        assert_eq!(doc["nexus"]["metadata"]["job"]["id"], 7);
        assert_eq!(doc["nexus"]["node"], "node-a");
        let bare = document(&GuestIdentity { name: "a".into(), ..Default::default() }, "u", None);
        assert!(bare["latest"].get("user-data").is_none() && bare["latest"]["meta-data"].get("local-ipv4").is_none());
    }
}
