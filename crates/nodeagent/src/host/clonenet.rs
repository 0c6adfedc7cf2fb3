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

use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

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

/// A restored VM's namespace being set up on a thread of its own: its TAP
/// first (all a snapshot load needs), then the veth's addresses, the
/// routes and the NAT (what the guest needs once it runs).
#[derive(Debug)]
pub struct Setup {
    /// Whether the TAP was made (once it is, or failed).
    tap: Option<tokio::sync::oneshot::Receiver<bool>>,
    done: Option<tokio::sync::oneshot::Receiver<Result<(), NetError>>>,
}

fn thread_gone(what: &str) -> NetError {
    NetError::Tap { name: what.to_string(), source: std::io::Error::other("the namespace's set-up thread ended") }
}

impl Setup {
    /// A set-up under way elsewhere (a spare's thread), heard of through
    /// `tap` (the TAP was made, or not) and `done`.
    pub fn waiting(
        tap: tokio::sync::oneshot::Receiver<bool>,
        done: tokio::sync::oneshot::Receiver<Result<(), NetError>>,
    ) -> Self {
        Setup { tap: Some(tap), done: Some(done) }
    }

    /// Returns once the VM's TAP is in its namespace.
    pub async fn tap_ready(&mut self) -> Result<(), NetError> {
        let Some(tap) = self.tap.take() else { return Ok(()) };
        if tap.await.unwrap_or(false) {
            return Ok(());
        }
        // The thread's own error says why.
        Err(self.outcome().await.err().unwrap_or_else(|| thread_gone("TAP")))
    }

    /// Returns once everything is set up.
    pub async fn finished(mut self) -> Result<(), NetError> {
        self.tap_ready().await?;
        self.outcome().await
    }

    async fn outcome(&mut self) -> Result<(), NetError> {
        match self.done.take() {
            Some(done) => done.await.unwrap_or_else(|_| Err(thread_gone("namespace"))),
            None => Ok(()),
        }
    }
}

/// Starts setting up the namespace of VMM `pid` (restored VM `uid`): its
/// TAP, and, when `addresses` are given, the veth pair on bridge `bridge`
/// and the NAT. The TAP belongs to `owner` (the VMM's uid and gid).
pub async fn start(
    net: &Net,
    pid: u32,
    uid: &Uid,
    bridge: u32,
    addresses: Option<Addresses>,
    owner: (u32, u32),
) -> Result<Setup, NetError> {
    let (veth, peer) = (veth_name(uid), peer_name(uid));
    if addresses.is_some() {
        // A pair left by an earlier VMM of this VM (its namespace is gone,
        // so its peer is too; the bridge end may linger for a moment).
        net.delete_link(&veth).await?;
        // One request: the peer is made inside the VMM's namespace (moving
        // a link between namespaces waits for an RCU grace period, 15-30 ms
        // here) and the bridge end on the bridge, up.
        let peer_in_vmm = LinkUnspec::new_with_name(&peer).setns_by_pid(pid).build();
        add_veth(net, &veth, peer_in_vmm, Some(bridge)).await?;
        crate::host::net::without_ipv6(&veth);
    }
    let tap = uid.tap_name();
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|source| NetError::Tap { name: format!("namespace of VMM {pid}"), source })?;
    let (tap_tx, tap_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // Netlink sockets, TUN devices and sysctls belong to the namespace of
    // the thread that makes them: do it all on a thread inside.
    std::thread::spawn(move || {
        let entered = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::Tap { name: tap.clone(), source: e.into() })
            .and_then(|()| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| NetError::Tap { name: tap.clone(), source })
            });
        match entered {
            Ok(rt) => {
                let _ = done_tx.send(rt.block_on(inside(&tap, &peer, addresses, owner, tap_tx)));
            }
            Err(e) => {
                let _ = tap_tx.send(false);
                let _ = done_tx.send(Err(e));
            }
        }
    });
    Ok(Setup { tap: Some(tap_rx), done: Some(done_rx) })
}

/// Makes veth pair `name` (in this namespace) and `peer` (a link message
/// naming the other end and, where it goes, its namespace); with `bridge`,
/// `name` is on that bridge and up, else down and on none.
pub(crate) async fn add_veth(
    net: &Net,
    name: &str,
    peer: rtnetlink::packet_route::link::LinkMessage,
    bridge: Option<u32>,
) -> Result<(), NetError> {
    let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth).name(name.to_string());
    let pair = match bridge {
        Some(index) => pair.controller(index).up(),
        None => pair,
    };
    let pair = pair.set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).build();
    net.handle().link().add(pair).execute().await.map_err(|source| NetError::Netlink {
        op: "add veth",
        name: name.to_string(),
        source,
    })
}

/// The part done inside the namespace; `tap_made` hears as soon as the
/// TAP is there.
async fn inside(
    tap: &str,
    peer: &str,
    addresses: Option<Addresses>,
    owner: (u32, u32),
    tap_made: tokio::sync::oneshot::Sender<bool>,
) -> Result<(), NetError> {
    // No IPv6 on the links of the namespace (the peer is there already).
    crate::host::net::no_ipv6_in_namespace();
    crate::host::net::without_ipv6(peer);
    // `nft` starts first and loads its rules (they name the links, which
    // need not exist yet) while the links are made.
    let nat = match addresses.map(|a| start_nat(peer, a)).transpose() {
        Ok(nat) => nat,
        Err(source) => {
            let _ = tap_made.send(false);
            return Err(NetError::Tap { name: format!("NAT on {peer}"), source });
        }
    };
    let net = Net::connect();
    let made = match net {
        Ok(net) => {
            let tap_result = make_tap(&net, tap, owner).await;
            let _ = tap_made.send(tap_result.is_ok());
            match (tap_result, addresses) {
                (Err(e), _) => Err(e),
                (Ok(tap_index), Some(a)) => peer_links(&net, tap, tap_index, peer, a).await,
                (Ok(_), None) => Ok(()),
            }
        }
        Err(e) => {
            let _ = tap_made.send(false);
            Err(e)
        }
    };
    let loaded = nat.map(finish_nat).transpose();
    made?;
    loaded.map(|_| ()).map_err(|source| NetError::Tap { name: format!("NAT on {peer}"), source })
}

/// `lo` up and the VM's TAP made and up; the TAP's index.
async fn make_tap(net: &Net, tap: &str, owner: (u32, u32)) -> Result<u32, NetError> {
    up_by_name(net, "lo").await?;
    tap_up(net, tap, owner).await
}

/// Link `name` up.
pub(crate) async fn up_by_name(net: &Net, name: &str) -> Result<(), NetError> {
    let link = net.link(name).await?.ok_or_else(|| NetError::Vanished(name.into()))?;
    set_up(net, name, link.index).await
}

/// The VM's TAP made and up; its index.
pub(crate) async fn tap_up(net: &Net, tap: &str, owner: (u32, u32)) -> Result<u32, NetError> {
    crate::host::net::create_persistent_tap(tap, owner).map_err(|source| NetError::Tap { name: tap.into(), source })?;
    let tap_link = net.link(tap).await?.ok_or_else(|| NetError::Vanished(tap.into()))?;
    set_up(net, tap, tap_link.index).await?;
    Ok(tap_link.index)
}

/// The veth's address, the routes and the sysctls of the namespace.
pub(crate) async fn peer_links(net: &Net, tap: &str, tap_index: u32, peer: &str, a: Addresses) -> Result<(), NetError> {
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
    set_up(net, peer, peer_link.index).await?;
    let to_guest = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(a.guest, 32)
        .output_interface(tap_index)
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
    let mut child = start_nat_waiting()?;
    write_rules(&mut child, peer, a)?;
    Ok(child)
}

/// Starts `nft` in this thread's namespace, waiting for its rules on its
/// input (it reads to the end before it does anything).
pub(crate) fn start_nat_waiting() -> std::io::Result<std::process::Child> {
    let mut nft = std::process::Command::new("nft");
    nft.args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    crate::host::forks::forking(|| nft.spawn())
}

/// Writes the rules to a waiting `nft` and ends its input.
fn write_rules(child: &mut std::process::Child, peer: &str, a: Addresses) -> std::io::Result<()> {
    use std::io::Write;
    let mut input = child.stdin.take().ok_or_else(|| std::io::Error::other("nft's input is gone"))?;
    input.write_all(ruleset(peer, a).as_bytes())
}

/// Loads the rules with an `nft` of [`start_nat_waiting`], and waits for it.
pub(crate) fn load_nat(mut child: std::process::Child, peer: &str, a: Addresses) -> std::io::Result<()> {
    write_rules(&mut child, peer, a)?;
    finish_nat(child)
}

/// Waits for an `nft` whose input has ended; its complaint when it failed.
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
