//! Network namespaces made ahead for VMs restored from snapshots.
//!
//! A restored VM's VMM runs in a network namespace of its own (see
//! [`crate::host::clonenet`]). Made on demand, that namespace is on the
//! restore's critical path: a thread entering it, a netlink socket inside,
//! the veth pair, `lo`, the TAP, and an `nft` process forked and loaded for
//! the NAT. A spare is all of that made before any VM asks for it:
//!
//! - a network namespace, held by an open descriptor of the agent (no bind
//!   mount: it ends with the last process or descriptor holding it, so an
//!   agent that dies leaves nothing behind), with `lo` up and forwarding on;
//! - a veth pair: its namespace end `nxpeer` up inside, its other end
//!   `nxs<n>` in the agent's namespace, down and on no bridge;
//! - a thread inside the namespace with its netlink socket open, waiting
//!   for the one VM it will serve;
//! - an `nft` process started inside, blocked reading the rules it will
//!   load (it reads to the end of its input before it does anything).
//!
//! A claim renames the bridge end to the VM's `nxv<uid>`, puts it on the
//! bridge and up (one netlink request), and has the thread make the VM's
//! TAP at once; once the VM's addresses are known the thread gives the
//! peer its address and routes and writes the NAT rules to the waiting
//! `nft`. The VMM joins the namespace when it starts, the agent lets go of
//! its descriptor, and from then on the namespace is the VMM's, as one made
//! on demand would be. A replacement spare is made in the background.
//!
//! Each spare is made with a VMM waiting in it ([`crate::host::warm`]),
//! which a restore adopts when it can.
//!
//! Spares cost an idle thread and an idle `nft` (about 5 MiB) each, a veth
//! pair and the idle VMM; `--spare-netns` sets how many are kept (0:
//! none), and the agent's inventory counts them.

use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rtnetlink::LinkUnspec;
use tokio::sync::oneshot;

use crate::host::clonenet::{self, Addresses, Setup};
use crate::host::net::{Net, NetError};
use crate::host::warm::Warm;
use crate::paths::Uid;

/// Prefix of a spare's bridge end until a VM claims it.
pub const SPARE_PREFIX: &str = "nxs";
/// How long after a spare is taken its replacement is begun.
pub const REFILL_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
/// The namespace end of a spare's veth pair (the name is the namespace's own).
const PEER: &str = "nxpeer";

/// The spares of a node, up to the number wanted.
#[derive(Debug)]
pub struct Spares {
    want: usize,
    ready: Mutex<Vec<Spare>>,
    /// Spares made so far, for their names.
    made: AtomicU64,
    /// One fill at a time.
    filling: tokio::sync::Mutex<()>,
}

/// One namespace ready for a restored VM.
#[derive(Debug)]
pub struct Spare {
    ns: OwnedFd,
    /// The bridge end's index in the agent's namespace.
    veth: u32,
    claim: oneshot::Sender<Claim>,
    /// The VMM started in it ahead ([`crate::host::warm`]), if any.
    vmm: Option<Warm>,
}

/// What a claim asks of a spare's thread.
#[derive(Debug)]
struct Claim {
    tap: String,
    owner: (u32, u32),
    addresses: oneshot::Receiver<Addresses>,
    tap_made: oneshot::Sender<bool>,
    done: oneshot::Sender<Result<(), NetError>>,
}

/// A spare given to one VM: its namespace, for the VMM to join, and its
/// set-up under way.
#[derive(Debug)]
pub struct Claimed {
    ns: OwnedFd,
    addresses: Option<oneshot::Sender<Addresses>>,
    setup: Setup,
}

impl Claimed {
    /// The namespace, for the VMM's launch to join.
    pub fn netns(&self) -> RawFd {
        self.ns.as_raw_fd()
    }

    /// The set-up, finished with `addresses` (or without NAT when `None`).
    pub fn finish(mut self, addresses: Option<Addresses>) -> Setup {
        if let (Some(tx), Some(a)) = (self.addresses.take(), addresses) {
            let _ = tx.send(a);
        }
        self.setup
    }
}

impl Spares {
    /// Keeps up to `want` spares once [`Spares::fill`] runs.
    pub fn new(want: usize) -> Self {
        Spares { want, ready: Mutex::new(Vec::new()), made: AtomicU64::new(0), filling: Default::default() }
    }

    /// How many are ready now.
    pub fn ready(&self) -> usize {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A spare, if one is ready. The caller refills.
    pub fn take(&self) -> Option<Spare> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Removes every spare: its bridge end at once (the pair goes with it),
    /// its namespace, thread and `nft` as they notice. Spares made by an
    /// agent that was killed (their namespaces end with it; the kernel
    /// removes their links a moment later) are removed too, when found.
    pub async fn clear(&self, net: &Net) {
        let _one = self.filling.lock().await;
        let spares: Vec<Spare> = std::mem::take(&mut *self.ready.lock().unwrap_or_else(|p| p.into_inner()));
        drop(spares);
        remove_spare_links(net).await;
    }

    /// Makes spares until `want` are ready, each with the VMM `warm`
    /// starts in it (given the spare's number and its namespace); stops at
    /// the first failure (logged: a node without spares makes namespaces
    /// on demand).
    pub async fn fill<F, W>(&self, net: &Net, warm: F)
    where
        F: Fn(u64, OwnedFd) -> W,
        W: Future<Output = Option<Warm>>,
    {
        let _one = self.filling.lock().await;
        if self.made.load(Ordering::Relaxed) == 0 {
            // Left by an agent before this one.
            remove_spare_links(net).await;
        }
        while self.ready() < self.want {
            let n = self.made.fetch_add(1, Ordering::Relaxed);
            match make(net, n).await {
                Ok(mut spare) => {
                    if let Ok(ns) = spare.ns.try_clone() {
                        spare.vmm = warm(n, ns).await;
                    }
                    self.ready.lock().unwrap_or_else(|p| p.into_inner()).push(spare)
                }
                Err(e) => {
                    tracing::warn!(error = ?e, "making a spare network namespace failed");
                    return;
                }
            }
        }
    }
}

/// Deletes every link named as a spare's bridge end.
async fn remove_spare_links(net: &Net) {
    let Ok(links) = net.links().await else { return };
    for link in links.into_iter().filter(|l| l.name.starts_with(SPARE_PREFIX)) {
        if let Err(e) = net.delete_link(&link.name).await {
            tracing::warn!(link = %link.name, error = ?e, "removing a spare's veth failed");
        }
    }
}

/// Makes spare number `n`.
async fn make(net: &Net, n: u64) -> Result<Spare, NetError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| NetError::Tap { name: what, source }
    };
    let (ns_tx, ns_rx) = oneshot::channel::<std::io::Result<OwnedFd>>();
    let (peer_tx, peer_rx) = oneshot::channel::<()>();
    let (claim_tx, claim_rx) = oneshot::channel::<Claim>();
    std::thread::Builder::new()
        .name("spare-netns".into())
        .spawn(move || inside(ns_tx, peer_rx, claim_rx))
        .map_err(io("a spare namespace's thread"))?;
    let ns =
        ns_rx.await.map_err(|_| NetError::Vanished("a spare namespace".into()))?.map_err(io("a spare namespace"))?;
    let name = format!("{SPARE_PREFIX}{n:x}");
    // Brought up by the spare's thread: a veth end cannot be set up before
    // its pair is whole.
    let peer = LinkUnspec::new_with_name(PEER).setns_by_fd(ns.as_raw_fd()).build();
    clonenet::add_veth(net, &name, peer, None).await?;
    crate::host::net::without_ipv6(&name);
    let veth = net.link(&name).await?.ok_or_else(|| NetError::Vanished(name.clone()))?.index;
    let _ = peer_tx.send(());
    Ok(Spare { ns, veth, claim: claim_tx, vmm: None })
}

/// The thread of a spare: makes the namespace and stays in it until the
/// spare is claimed (and set up) or dropped.
fn inside(ns: oneshot::Sender<std::io::Result<OwnedFd>>, peer: oneshot::Receiver<()>, claim: oneshot::Receiver<Claim>) {
    let entered = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(std::io::Error::from)
        .and_then(|()| std::fs::File::open("/proc/thread-self/ns/net"))
        .and_then(|f| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map(|()| f));
    if entered.is_ok() {
        // Before its links are made: none of them gets IPv6.
        crate::host::net::no_ipv6_in_namespace();
    }
    let failed = entered.is_err();
    let _ = ns.send(entered.map(OwnedFd::from));
    if failed {
        return;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    rt.block_on(async move {
        // `nft` waits for its rules from the start.
        let mut nat = clonenet::start_nat_waiting();
        let net = match Net::connect() {
            Ok(net) => net,
            Err(e) => return reap_unused(nat, claim, e).await,
        };
        if peer.await.is_err() {
            return reap_unused(nat, claim, NetError::Vanished(PEER.into())).await;
        }
        for link in ["lo", PEER] {
            if let Err(e) = clonenet::up_by_name(&net, link).await {
                return reap_unused(nat, claim, e).await;
            }
        }
        let Ok(Claim { tap, owner, addresses, tap_made, done }) = claim.await else {
            // Dropped unclaimed.
            end_unused(nat.as_mut().ok());
            return;
        };
        let tap_index = clonenet::tap_up(&net, &tap, owner).await;
        let _ = tap_made.send(tap_index.is_ok());
        let a = match (tap_index.as_ref(), addresses.await) {
            (Ok(_), Ok(a)) => a,
            // No TAP, or no addresses to join (the VM's start ended, or its
            // source had none): no NAT.
            (_, _) => {
                end_unused(nat.as_mut().ok());
                let _ = done.send(tap_index.map(|_| ()));
                return;
            }
        };
        let result = async {
            clonenet::peer_links(&net, &tap, tap_index?, PEER, a).await?;
            let nat_error = |source| NetError::Tap { name: format!("NAT on {PEER}"), source };
            clonenet::load_nat(nat.map_err(nat_error)?, PEER, a).map_err(nat_error)
        };
        let _ = done.send(result.await);
    });
}

/// Ends a waiting `nft` that gets no rules (it exits on its empty input).
fn end_unused(nat: Option<&mut std::process::Child>) {
    if let Some(child) = nat {
        drop(child.stdin.take());
        let _ = child.wait();
    }
}

/// A spare that could not be finished: its claim, should one come, hears
/// `error`; its `nft` is ended.
async fn reap_unused(nat: std::io::Result<std::process::Child>, claim: oneshot::Receiver<Claim>, error: NetError) {
    if let Ok(mut child) = nat {
        let _ = child.kill();
        let _ = child.wait();
    }
    tracing::warn!(error = ?error, "a spare network namespace could not be finished");
    if let Ok(claim) = claim.await {
        let _ = claim.tap_made.send(false);
        let _ = claim.done.send(Err(error));
    }
}

impl Spare {
    /// The VMM waiting in this spare, if one does and still runs (one that
    /// ended is dropped).
    pub fn take_vmm(&mut self) -> Option<Warm> {
        self.vmm.take().filter(Warm::alive)
    }

    /// A descriptor of the namespace, for a VMM's launch to join.
    pub fn netns(&self) -> std::io::Result<OwnedFd> {
        self.ns.try_clone()
    }

    /// Gives this spare to restored VM `uid`: its bridge end becomes the
    /// VM's (`nxv<uid>`, on bridge `bridge`, up) and its thread makes the
    /// VM's TAP, owned by `owner`, at once.
    pub async fn claim(self, net: &Net, uid: &Uid, bridge: u32, owner: (u32, u32)) -> Result<Claimed, NetError> {
        // The caller removed any pair an earlier VMM of this VM left.
        let veth = clonenet::veth_name(uid);
        let mine = LinkUnspec::new_with_index(self.veth).name(veth.clone()).controller(bridge).up().build();
        net.handle().link().set(mine).execute().await.map_err(|source| NetError::Netlink {
            op: "claim spare veth",
            name: veth.clone(),
            source,
        })?;
        let (tap_tx, tap_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let (addresses_tx, addresses_rx) = oneshot::channel();
        let claim = Claim { tap: uid.tap_name(), owner, addresses: addresses_rx, tap_made: tap_tx, done: done_tx };
        if self.claim.send(claim).is_err() {
            return Err(NetError::Vanished(format!("the spare namespace for {veth}")));
        }
        Ok(Claimed { ns: self.ns, addresses: Some(addresses_tx), setup: Setup::waiting(tap_rx, done_rx) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn links_named(net: &Net, prefix: &str) -> Vec<String> {
        net.links().await.unwrap().into_iter().map(|l| l.name).filter(|n| n.starts_with(prefix)).collect()
    }

    /// Made, claimed and dropped in a namespace of the test's own; a
    /// dropped spare and a claimed one whose holder ended leave no link.
    #[test]
    fn a_spare_is_made_claimed_and_leaves_nothing() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: network namespaces need root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a namespace for the test");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let net = Net::connect().unwrap();
                let bridge = net.ensure_bridge("nxbrspare", Some(("172.31.9.1".parse().unwrap(), 24))).await.unwrap();
                let spares = Spares::new(2);
                spares.fill(&net, |_, _| async { None }).await;
                assert_eq!(spares.ready(), 2);
                assert_eq!(links_named(&net, SPARE_PREFIX).await.len(), 2, "two spare bridge ends");

                let uid = Uid::parse("7f0c9a52-3a43-4d1b-9d44-0c3f0e7d1a11").unwrap();
                let claimed = spares.take().unwrap().claim(&net, &uid, bridge, (0, 0)).await.unwrap();
                let a = Addresses {
                    guest: "172.31.9.5".parse().unwrap(),
                    own: "172.31.9.9".parse().unwrap(),
                    subnet: crate::host::ipam::Subnet { gateway: "172.31.9.1".parse().unwrap(), len: 24 },
                };
                let ns = claimed.ns.try_clone().unwrap();
                let started = std::time::Instant::now();
                claimed.finish(Some(a)).finished().await.unwrap();
                eprintln!("claimed spare set up in {:?}", started.elapsed());
                let veth = net.link(&clonenet::veth_name(&uid)).await.unwrap().expect("the VM's veth");
                assert_eq!(veth.controller, Some(bridge));
                assert!(veth.up);
                // Inside: the TAP, the peer's address and the NAT rules.
                let netns = format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd());
                let run = |args: &[&str]| {
                    let out = std::process::Command::new("nsenter")
                        .arg(format!("--net={netns}"))
                        .args(args)
                        .output()
                        .unwrap();
                    String::from_utf8_lossy(&out.stdout).into_owned()
                };
                assert!(run(&["ip", "-o", "link"]).contains(&uid.tap_name()), "the TAP");
                assert!(run(&["ip", "-o", "addr"]).contains("172.31.9.9/24"), "the VM's own address");
                assert!(run(&["nft", "list", "ruleset"]).contains("dnat to 172.31.9.5"), "the NAT");

                // The namespace's last holder gone: its veth goes with it;
                // the unclaimed spare is cleared.
                drop(ns);
                spares.clear(&net).await;
                assert!(links_named(&net, SPARE_PREFIX).await.is_empty(), "cleared at once");
                for _ in 0..200 {
                    if links_named(&net, clonenet::VETH_PREFIX).await.is_empty()
                        && links_named(&net, SPARE_PREFIX).await.is_empty()
                    {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                assert!(
                    links_named(&net, clonenet::VETH_PREFIX).await.is_empty(),
                    "{:?}",
                    links_named(&net, clonenet::VETH_PREFIX).await
                );
                assert!(
                    links_named(&net, SPARE_PREFIX).await.is_empty(),
                    "{:?}",
                    links_named(&net, SPARE_PREFIX).await
                );
            });
        })
        .join()
        .unwrap();
    }
}
