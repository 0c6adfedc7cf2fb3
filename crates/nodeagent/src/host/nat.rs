//! NAT from the VM subnet to the uplink: an nftables masquerade rule in the
//! agent's own table, or an iptables rule where the host has no `nft`.
//! The rule is the node's, shared by all its VMs: it is made when the
//! bridge is, and stays while the agent manages the bridge.

use std::borrow::Cow;
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

/// The nftables table the agent owns; nothing else is touched.
pub const TABLE: &str = "nexus";
const CHAIN: &str = "postrouting";
/// Tag of the iptables rule, so it can be found again.
const IPT_COMMENT: &str = "nexus-masquerade";

/// Which packet filter the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firewall {
    Nftables,
    Iptables,
    /// Neither is installed: VMs get no route out, and the agent says so.
    None,
}

/// Failures setting up NAT.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("applying the nftables ruleset failed")]
    Nft(#[from] nftables::helper::NftablesError),
    #[error("iptables {args} failed: {stderr}")]
    Iptables { args: String, stderr: String },
    #[error("enabling IPv4 forwarding failed")]
    Forwarding(#[source] std::io::Error),
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file())).unwrap_or(false)
}

/// nft where it is installed (it is what iptables-nft drives too), else iptables.
pub fn detect() -> Firewall {
    if on_path("nft") {
        Firewall::Nftables
    } else if on_path("iptables") {
        Firewall::Iptables
    } else {
        Firewall::None
    }
}

/// The network address of `ip/len`.
pub fn network(ip: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    Ipv4Addr::from(u32::from(ip) & mask)
}

fn masquerade_rule<'a>(subnet: Ipv4Addr, len: u8, bridge: &'a str) -> Rule<'a> {
    let saddr = Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
            protocol: Cow::Borrowed("ip"),
            field: Cow::Borrowed("saddr"),
        }))),
        right: Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(Cow::Owned(subnet.to_string()))),
            len: u32::from(len),
        })),
        op: Operator::EQ,
    });
    let not_bridge = Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Oifname })),
        right: Expression::String(Cow::Borrowed(bridge)),
        op: Operator::NEQ,
    });
    Rule {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(CHAIN),
        expr: Cow::Owned(vec![saddr, not_bridge, Statement::Masquerade(None)]),
        comment: Some(Cow::Owned(format!("nexus: VMs on {bridge} reach the uplink"))),
        ..Rule::default()
    }
}

/// Makes traffic from `subnet/len` leaving by any interface but `bridge`
/// masquerade, and turns on IPv4 forwarding. Safe to repeat: the agent's
/// chain is flushed and refilled in one atomic `nft` transaction.
pub async fn ensure_masquerade(fw: Firewall, bridge: &str, ip: Ipv4Addr, len: u8) -> Result<(), NatError> {
    let subnet = network(ip, len);
    match fw {
        Firewall::Nftables => {
            let table = Table { family: NfFamily::IP, name: Cow::Borrowed(TABLE), ..Table::default() };
            let chain = Chain {
                family: NfFamily::IP,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(CHAIN),
                _type: Some(NfChainType::NAT),
                hook: Some(NfHook::Postrouting),
                prio: Some(100),
                ..Chain::default()
            };
            let mut batch = Batch::new();
            batch.add(NfListObject::Table(table));
            batch.add(NfListObject::Chain(chain.clone()));
            batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain)));
            batch.add(NfListObject::Rule(masquerade_rule(subnet, len, bridge)));
            nftables::helper::apply_ruleset_async(&batch.to_nftables()).await?;
        }
        Firewall::Iptables => {
            let spec = iptables_spec(subnet, len, bridge);
            let mut check = vec!["-t", "nat", "-C", "POSTROUTING"];
            check.extend(spec.iter().map(String::as_str));
            if iptables(&check).await.is_err() {
                let mut add = vec!["-t", "nat", "-A", "POSTROUTING"];
                add.extend(spec.iter().map(String::as_str));
                iptables(&add).await?;
            }
        }
        Firewall::None => {
            tracing::warn!("neither nft nor iptables is installed: VMs get no NAT to the uplink");
            return Ok(());
        }
    }
    tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1").await.map_err(NatError::Forwarding)
}

/// Removes the agent's NAT rule (nftables: its whole table).
pub async fn remove_masquerade(fw: Firewall, bridge: &str, ip: Ipv4Addr, len: u8) -> Result<(), NatError> {
    match fw {
        Firewall::Nftables => {
            if masquerade_present(fw, bridge).await {
                let mut batch = Batch::new();
                batch.delete(NfListObject::Table(Table {
                    family: NfFamily::IP,
                    name: Cow::Borrowed(TABLE),
                    ..Table::default()
                }));
                nftables::helper::apply_ruleset_async(&batch.to_nftables()).await?;
            }
        }
        Firewall::Iptables => {
            let spec = iptables_spec(network(ip, len), len, bridge);
            let mut del = vec!["-t", "nat", "-D", "POSTROUTING"];
            del.extend(spec.iter().map(String::as_str));
            while iptables(&del).await.is_ok() {}
        }
        Firewall::None => {}
    }
    Ok(())
}

/// Whether the masquerade rule for `bridge` is installed.
pub async fn masquerade_present(fw: Firewall, bridge: &str) -> bool {
    match fw {
        Firewall::Nftables => {
            let Ok(out) = tokio::process::Command::new("nft").args(["-j", "list", "table", "ip", TABLE]).output().await
            else {
                return false;
            };
            let text = String::from_utf8_lossy(&out.stdout);
            out.status.success() && text.contains("masquerade") && text.contains(&format!("\"{bridge}\""))
        }
        Firewall::Iptables => {
            let Ok(out) =
                tokio::process::Command::new("iptables").args(["-t", "nat", "-S", "POSTROUTING"]).output().await
            else {
                return false;
            };
            String::from_utf8_lossy(&out.stdout).lines().any(|l| l.contains(IPT_COMMENT) && l.contains(bridge))
        }
        Firewall::None => false,
    }
}

fn iptables_spec(subnet: Ipv4Addr, len: u8, bridge: &str) -> Vec<String> {
    ["-s", &format!("{subnet}/{len}"), "!", "-o", bridge, "-m", "comment", "--comment", IPT_COMMENT, "-j", "MASQUERADE"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

async fn iptables(args: &[&str]) -> Result<(), NatError> {
    let out = tokio::process::Command::new("iptables")
        .args(args)
        .output()
        .await
        .map_err(|e| NatError::Iptables { args: args.join(" "), stderr: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NatError::Iptables {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_addresses_mask_the_host_part() {
        assert_eq!(network("172.30.0.1".parse().unwrap(), 24), "172.30.0.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(network("10.1.2.3".parse().unwrap(), 16), "10.1.0.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(network("10.1.2.3".parse().unwrap(), 0), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn the_rule_matches_the_subnet_and_skips_the_bridge() {
        let rule = serde_json::to_string(&masquerade_rule("172.30.0.0".parse().unwrap(), 24, "nxbr0")).unwrap();
        assert!(rule.contains("\"saddr\"") && rule.contains("172.30.0.0") && rule.contains("\"len\":24"), "{rule}");
        assert!(rule.contains("\"op\":\"!=\"") && rule.contains("\"nxbr0\"") && rule.contains("masquerade"), "{rule}");
    }
}
