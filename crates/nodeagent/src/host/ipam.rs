//! Guest addresses from the node's VM subnet: the bridge's address is the
//! gateway, and each VM that asks gets one address, kept for its life.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Why no address can be given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error(
        "this node has no VM subnet (its bridge has no address); remove spec.network.ip or give the agent --bridge-address"
    )]
    NoSubnet,
    #[error(
        "{addr} is not a usable guest address in {subnet}: pick one between {first} and {last}, other than the gateway {gateway}"
    )]
    OutOfRange { addr: Ipv4Addr, subnet: String, first: Ipv4Addr, last: Ipv4Addr, gateway: Ipv4Addr },
    #[error("{0} is already used by another VM on this node; use `auto` or pick another address")]
    InUse(Ipv4Addr),
    #[error("every address of {0} is in use")]
    Exhausted(String),
    #[error("{0:?} is neither `auto` nor an IPv4 address")]
    Malformed(String),
}

/// A subnet with its gateway (the bridge's address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub gateway: Ipv4Addr,
    pub len: u8,
}

impl Subnet {
    fn base(&self) -> u32 {
        u32::from(crate::host::nat::network(self.gateway, self.len))
    }

    fn size(&self) -> u32 {
        1u32.checked_shl(32 - u32::from(self.len)).unwrap_or(0)
    }

    /// `a.b.c.d/len`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.base()), self.len)
    }

    /// The dotted netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) })
    }

    fn usable(&self, a: Ipv4Addr) -> bool {
        let (base, size, a) = (self.base(), self.size(), u32::from(a));
        size >= 4 && a > base && a < base + size - 1 && a != u32::from(self.gateway)
    }

    /// The kernel `ip=` argument for `addr` on `eth0`, no autoconfiguration.
    pub fn kernel_arg(&self, addr: Ipv4Addr) -> String {
        format!("ip={addr}::{}:{}::eth0:off", self.gateway, self.netmask())
    }
}

/// Picks an address for VM `uid`: the requested one if it is free and in
/// range, or for `auto` the first free one probing from a point derived from
/// the uid (so a VM tends to get the same address back).
pub fn assign(
    subnet: Option<Subnet>,
    uid: &str,
    request: &str,
    used: &BTreeSet<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    let subnet = subnet.ok_or(IpamError::NoSubnet)?;
    if request != "auto" {
        let addr: Ipv4Addr = request.parse().map_err(|_| IpamError::Malformed(request.to_string()))?;
        if !subnet.usable(addr) {
            let (base, size) = (subnet.base(), subnet.size());
            return Err(IpamError::OutOfRange {
                addr,
                subnet: subnet.cidr(),
                first: Ipv4Addr::from(base + 1),
                last: Ipv4Addr::from(base + size.saturating_sub(2)),
                gateway: subnet.gateway,
            });
        }
        if used.contains(&addr) {
            return Err(IpamError::InUse(addr));
        }
        return Ok(addr);
    }
    let hosts = subnet.size().saturating_sub(2);
    if hosts < 2 {
        return Err(IpamError::Exhausted(subnet.cidr()));
    }
    let start = uid.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))) % hosts;
    (0..hosts)
        .map(|i| Ipv4Addr::from(subnet.base() + 1 + (start + i) % hosts))
        .find(|a| subnet.usable(*a) && !used.contains(a))
        .ok_or_else(|| IpamError::Exhausted(subnet.cidr()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Option<Subnet> {
        Some(Subnet { gateway: "172.30.0.1".parse().unwrap(), len: 24 })
    }

    #[test]
    fn auto_picks_a_free_host_address_and_skips_taken_ones() {
        let a = assign(net(), "uid-1", "auto", &BTreeSet::new()).unwrap();
        assert!(net().unwrap().usable(a), "{a}");
        assert_eq!(assign(net(), "uid-1", "auto", &BTreeSet::new()).unwrap(), a, "stable for one uid");
        let used: BTreeSet<Ipv4Addr> = [a].into();
        let b = assign(net(), "uid-1", "auto", &used).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn explicit_addresses_must_be_usable_and_free() {
        let used: BTreeSet<Ipv4Addr> = ["172.30.0.9".parse().unwrap()].into();
        assert_eq!(assign(net(), "u", "172.30.0.10", &used).unwrap(), "172.30.0.10".parse::<Ipv4Addr>().unwrap());
        assert!(matches!(assign(net(), "u", "172.30.0.9", &used), Err(IpamError::InUse(_))));
        for bad in ["172.30.0.0", "172.30.0.1", "172.30.0.255", "10.0.0.5"] {
            assert!(matches!(assign(net(), "u", bad, &used), Err(IpamError::OutOfRange { .. })), "{bad}");
        }
        assert_eq!(assign(None, "u", "auto", &used), Err(IpamError::NoSubnet));
        assert_eq!(
            net().unwrap().kernel_arg("172.30.0.10".parse().unwrap()),
            "ip=172.30.0.10::172.30.0.1:255.255.255.0::eth0:off"
        );
    }

    #[test]
    fn a_full_subnet_is_reported() {
        let tiny = Some(Subnet { gateway: "10.0.0.1".parse().unwrap(), len: 30 });
        let used: BTreeSet<Ipv4Addr> = ["10.0.0.2".parse().unwrap()].into();
        assert!(matches!(assign(tiny, "u", "auto", &used), Err(IpamError::Exhausted(_))));
    }
}
