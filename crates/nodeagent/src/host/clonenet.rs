//! The network of a VM restored from a snapshot.
//!
//! A restored guest keeps what its memory holds: the MAC address and the IP
//! address its source had. Several VMs restored from one snapshot, and the
//! source itself, would put the same MAC and IP on the node's bridge. So
//! each restored VMM runs in a network namespace of its own (it unshares
//! one when it starts; the namespace ends with the process, taking
//! everything in it along), holding:
//!
//! - the VM's TAP, which Firecracker opens;
//! - one end of a veth pair whose other end, `nxv<uid>`, is on the bridge
//!   with a MAC of its own and the VM's own address from the node subnet;
//! - NAT between the two: the guest's address is rewritten to the VM's on
//!   the way out and back on the way in, and the namespace answers ARP for
//!   the rest of the subnet on the TAP (proxy ARP), so the guest's idea of
//!   its network keeps working.
//!
//! The bridge therefore sees one distinct MAC and address per VM, whatever
//! the guests believe. A snapshot of a VM that had no address from the node
//! gives restored VMs a TAP in their namespace and nothing beyond it.

use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::host::ipam::Subnet;
use crate::host::net::{Net, NetError};
use crate::paths::Uid;

/// Prefix of the bridge end of a restored VM's veth pair.
pub const VETH_PREFIX: &str = "nxv";
/// Prefix of the namespace end.
const PEER_PREFIX: &str = "nxp";

/// The addresses NAT joins, for a VM whose source had one from the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// What the guest believes it has (its source's).
    pub guest: Ipv4Addr,
    /// What the VM has on the bridge.
    pub own: Ipv4Addr,
    pub subnet: Subnet,
}

/// Names of a restored VM's links.
pub fn veth_name(uid: &Uid) -> String {
    format!("{VETH_PREFIX}{}", &uid.tap_name()[crate::paths::TAP_PREFIX.len()..])
}

fn peer_name(uid: &Uid) -> String {
    format!("{PEER_PREFIX}{}", &uid.tap_name()[crate::paths::TAP_PREFIX.len()..])
}

/// Sets up the namespace of VMM `pid` (restored VM `uid`): its TAP, and,
/// when `addresses` are given, the veth pair on bridge `bridge` and the NAT.
/// The TAP belongs to `owner` (the VMM's uid and gid).
pub async fn setup(
    net: &Net,
    pid: u32,
    uid: &Uid,
    bridge: u32,
    addresses: Option<Addresses>,
    owner: (u32, u32),
) -> Result<(), NetError> {
    let (veth, peer) = (veth_name(uid), peer_name(uid));
    if addresses.is_some() {
        // A pair left by an earlier VMM of this VM (its namespace is gone,
        // so its peer is too; the bridge end may linger for a moment).
        net.delete_link(&veth).await?;
        net.handle()
            .link()
            .add(LinkVeth::new(&veth, &peer).build())
            .execute()
            .await
            .map_err(|source| NetError::Netlink { op: "add veth", name: veth.clone(), source })?;
        net.handle()
            .link()
            .set(LinkUnspec::new_with_name(&peer).setns_by_pid(pid).build())
            .execute()
            .await
            .map_err(|source| NetError::Netlink { op: "move into the VM's namespace", name: peer.clone(), source })?;
        let link = net.link(&veth).await?.ok_or_else(|| NetError::Vanished(veth.clone()))?;
        net.handle()
            .link()
            .set(LinkUnspec::new_with_index(link.index).controller(bridge).up().build())
            .execute()
            .await
            .map_err(|source| NetError::Netlink { op: "attach to the bridge", name: veth.clone(), source })?;
    }
    let tap = uid.tap_name();
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|source| NetError::Tap { name: format!("namespace of VMM {pid}"), source })?;
    // Netlink sockets, TUN devices and sysctls belong to the namespace of
    // the thread that makes them: do it all on a thread inside.
    let work = std::thread::spawn(move || -> Result<(), NetError> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::Tap { name: tap.clone(), source: e.into() })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| NetError::Tap { name: tap.clone(), source })?;
        rt.block_on(inside(&tap, &peer, addresses, owner))
    });
    tokio::task::spawn_blocking(move || work.join())
        .await
        .map_err(|e| NetError::Tap { name: uid.tap_name(), source: std::io::Error::other(e.to_string()) })?
        .map_err(|_| NetError::Tap { name: uid.tap_name(), source: std::io::Error::other("setup thread panicked") })?
}

/// The part done inside the namespace.
async fn inside(tap: &str, peer: &str, addresses: Option<Addresses>, owner: (u32, u32)) -> Result<(), NetError> {
    // `nft` starts first and loads its rules (they name the links, which
    // need not exist yet) while the links are made.
    let nat = addresses
        .map(|a| start_nat(peer, a))
        .transpose()
        .map_err(|source| NetError::Tap { name: format!("NAT on {peer}"), source })?;
    let made = links(tap, peer, addresses, owner).await;
    let loaded = nat.map(finish_nat).transpose();
    made?;
    loaded.map(|_| ()).map_err(|source| NetError::Tap { name: format!("NAT on {peer}"), source })
}

/// The links, addresses, routes and sysctls of the namespace.
async fn links(tap: &str, peer: &str, addresses: Option<Addresses>, owner: (u32, u32)) -> Result<(), NetError> {
    let net = Net::connect()?;
    let lo = net.link("lo").await?.ok_or_else(|| NetError::Vanished("lo".into()))?;
    set_up(&net, "lo", lo.index).await?;
    crate::host::net::create_persistent_tap(tap, owner).map_err(|source| NetError::Tap { name: tap.into(), source })?;
    let tap_link = net.link(tap).await?.ok_or_else(|| NetError::Vanished(tap.into()))?;
    set_up(&net, tap, tap_link.index).await?;
    let Some(a) = addresses else { return Ok(()) };
    let peer_link = net.link(peer).await?.ok_or_else(|| NetError::Vanished(peer.into()))?;
    let netlink = |op: &'static str, name: &str| {
        let name = name.to_string();
        move |source| NetError::Netlink { op, name, source }
    };
    net.handle()
        .address()
        .add(peer_link.index, IpAddr::V4(a.own), a.subnet.len)
        .replace()
        .execute()
        .await
        .map_err(netlink("add address", peer))?;
    set_up(&net, peer, peer_link.index).await?;
    let to_guest = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(a.guest, 32)
        .output_interface(tap_link.index)
        .scope(RouteScope::Link)
        .build();
    net.handle().route().add(to_guest).replace().execute().await.map_err(netlink("add route", tap))?;
    let default =
        RouteMessageBuilder::<Ipv4Addr>::new().gateway(a.subnet.gateway).output_interface(peer_link.index).build();
    net.handle().route().add(default).replace().execute().await.map_err(netlink("add default route", peer))?;
    for (path, value) in
        [("/proc/sys/net/ipv4/ip_forward".to_string(), "1"), (format!("/proc/sys/net/ipv4/conf/{tap}/proxy_arp"), "1")]
    {
        std::fs::write(&path, value).map_err(|source| NetError::Tap { name: path.clone(), source })?;
    }
    Ok(())
}

async fn set_up(net: &Net, name: &str, index: u32) -> Result<(), NetError> {
    net.handle()
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|source| NetError::Netlink { op: "set up", name: name.into(), source })
}

/// The nftables rules of the namespace, as `nft -f` reads them.
pub fn ruleset(peer: &str, a: Addresses) -> String {
    format!(
        "table ip nexus_clone {{\n\
         \tchain prerouting {{ type nat hook prerouting priority dstnat; policy accept; iifname \"{peer}\" ip daddr {own} dnat to {guest}; }}\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; oifname \"{peer}\" ip saddr {guest} snat to {own}; }}\n\
         }}\n",
        own = a.own,
        guest = a.guest,
    )
}

/// Starts `nft` loading the NAT rules, from this (namespaced) thread: the
/// child runs in the thread's namespace.
fn start_nat(peer: &str, a: Addresses) -> std::io::Result<std::process::Child> {
    use std::io::Write;
    let mut nft = std::process::Command::new("nft");
    nft.args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = crate::host::forks::forking(|| nft.spawn())?;
    // Dropped once written: `nft` reads to the end of its input.
    child.stdin.take().expect("piped").write_all(ruleset(peer, a).as_bytes())?;
    Ok(child)
}

/// Waits for the `nft` of [`start_nat`]; its complaint when it failed.
fn finish_nat(child: std::process::Child) -> std::io::Result<()> {
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Bridge ends of veth pairs of restored VMs, by name.
pub async fn veths(net: &Net) -> Result<Vec<String>, NetError> {
    Ok(net.links().await?.into_iter().map(|l| l.name).filter(|n| n.starts_with(VETH_PREFIX)).collect())
}

/// Whether VMM `pid` runs in a network namespace other than the agent's.
pub fn in_own_namespace(pid: u32) -> bool {
    let ours = std::fs::read_link("/proc/self/ns/net").ok();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    theirs.is_some() && ours != theirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nat_rules_swap_the_guests_address_for_the_vms_own() {
        let a = Addresses {
            guest: "172.30.0.5".parse().unwrap(),
            own: "172.30.0.9".parse().unwrap(),
            subnet: Subnet { gateway: "172.30.0.1".parse().unwrap(), len: 24 },
        };
        let rules = ruleset("nxp7f0c9a523a43", a);
        assert!(rules.contains("iifname \"nxp7f0c9a523a43\" ip daddr 172.30.0.9 dnat to 172.30.0.5"), "{rules}");
        assert!(rules.contains("oifname \"nxp7f0c9a523a43\" ip saddr 172.30.0.5 snat to 172.30.0.9"), "{rules}");
        let uid = Uid::parse("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11").unwrap();
        assert_eq!(veth_name(&uid), "nxv7f0c9a523a43");
        assert!(veth_name(&uid).len() < 16);
    }
}
