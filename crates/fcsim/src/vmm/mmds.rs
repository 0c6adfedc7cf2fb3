//! The metadata service's API side, as Firecracker v1.16.1 has it: its
//! configuration (`PUT /mmds/config`, before boot, on interfaces that
//! exist, at a link-local address) and its store (`PUT`, `PATCH` and `GET
//! /mmds`, at any time, at most 51,200 bytes of JSON). No guest reads it:
//! the simulator runs none.

use std::net::Ipv4Addr;

use super::*;

/// The store's limit: Firecracker's default (`--mmds-size-limit`, which
/// defaults to the API's largest payload).
const STORE_LIMIT: usize = 51_200;
/// Firecracker's address for the service when none is configured.
const DEFAULT_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The service's state: its configuration, and the store (`None` until
/// first put: a `PATCH` needs something to patch).
#[derive(Debug, Default)]
pub(super) struct Mmds {
    pub config: Option<MmdsConfig>,
    pub store: Option<Value>,
}

impl Vmm {
    pub(super) fn put_mmds_config(&mut self, body: &[u8]) -> Reply {
        let mut config: MmdsConfig = attempt!(parse(body));
        attempt!(self.pre_boot());
        let error = |why: &str| Reply::fault(400, format!("MMMDS config error: {why}"));
        match config.ipv4_address {
            Some(a) if !a.is_link_local() => return error("The MMDS IPv4 address is not link local."),
            None => config.ipv4_address = Some(DEFAULT_ADDRESS),
            Some(_) => {}
        }
        if config.network_interfaces.is_empty() {
            return error("The list of network interface IDs that allow forwarding MMDS requests is empty.");
        }
        if !config.network_interfaces.iter().all(|id| self.nets.contains_key(id)) {
            return error(
                "The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.",
            );
        }
        self.mmds.config = Some(config);
        self.boot_configured = true;
        Reply::no_content()
    }

    pub(super) fn put_mmds(&mut self, body: &[u8]) -> Reply {
        let contents: Value = attempt!(parse(body));
        attempt!(fits(&contents));
        self.mmds.store = Some(contents);
        Reply::no_content()
    }

    pub(super) fn patch_mmds(&mut self, body: &[u8]) -> Reply {
        let patch: Value = attempt!(parse(body));
        let Some(store) = &self.mmds.store else {
            return Reply::fault(400, "MMDS error: The MMDS data store is not initialized.");
        };
        let mut next = store.clone();
        merge_patch(&mut next, &patch);
        attempt!(fits(&next));
        self.mmds.store = Some(next);
        Reply::no_content()
    }

    /// `GET /mmds`: the store, `{}` while nothing was put.
    pub(super) fn get_mmds(&self) -> Reply {
        Reply::ok(match &self.mmds.store {
            None | Some(Value::Null) => json!({}),
            Some(v) => v.clone(),
        })
    }
}

/// Refuses contents above the store's limit (413, as Firecracker does).
fn fits(contents: &Value) -> Result<(), Reply> {
    if serde_json::to_vec(contents).map(|v| v.len()).unwrap_or(0) > STORE_LIMIT {
        return Err(Reply::fault(413, "MMDS limit exceeded error: The MMDS patch request doesn't fit."));
    }
    Ok(())
}

/// RFC 7396: members of `patch` replace those of `target`, `null` removes
/// one, objects merge member by member; anything else replaces `target`.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in members {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}
