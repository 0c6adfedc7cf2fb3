//! Host networking: the bridge and one persistent TAP per VM. Links are
//! managed over netlink; TAPs are created with the TUNSETIFF/TUNSETPERSIST
//! ioctls because netlink cannot create them.

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use super::link_reaper::LinkReaper;

/// Failures configuring host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("opening a netlink socket failed")]
    Connect(#[source] std::io::Error),
    #[error("netlink {op} on {name} failed")]
    Netlink {
        op: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("creating TAP device {name} failed")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link {0} vanished while being configured")]
    Vanished(String),
    #[error("removing link {name} with its batch failed")]
    Batch {
        name: String,
        #[source]
        source: std::sync::Arc<rtnetlink::Error>,
    },
    #[error("looking up link {name} failed")]
    Lookup {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// A link as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// Index of the bridge it is enslaved to.
    pub controller: Option<u32>,
    /// Whether it is administratively up.
    pub up: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            name: String::new(),
            index: msg.header.index,
            controller: None,
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                _ => {}
            }
        }
        link
    }
}

/// Netlink access for one network namespace (the agent's own).
#[derive(Debug, Clone)]
pub struct Net {
    handle: Handle,
    reaper: LinkReaper,
}

pub(super) fn is_no_device(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV)
}

impl Net {
    /// Opens a netlink connection; must be called inside a tokio runtime.
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { reaper: LinkReaper::spawn(handle.clone()), handle })
    }

    /// The underlying netlink handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The link called `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        let mut stream = self.handle.link().get().match_name(name).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_no_device(&e) => Ok(None),
            Err(source) => Err(NetError::Netlink { op: "get", name: name.to_string(), source }),
        }
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetError> {
        let msgs: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(|source| NetError::Netlink {
                op: "dump",
                name: "*".into(),
                source,
            })?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Creates bridge `name` if missing, gives it `address` and brings it up.
    /// Returns its index. Safe to repeat.
    pub async fn ensure_bridge(&self, name: &str, address: Option<(Ipv4Addr, u8)>) -> Result<u32, NetError> {
        if self.link(name).await?.is_none() {
            match self.handle.link().add(LinkBridge::new(name).build()).execute().await {
                Ok(()) => {}
                // Lost a race with another creator: fine, it exists now.
                Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {}
                Err(source) => return Err(NetError::Netlink { op: "add bridge", name: name.into(), source }),
            }
        }
        let link = self.link(name).await?.ok_or_else(|| NetError::Vanished(name.into()))?;
        if let Some((ip, prefix)) = address {
            self.handle
                .address()
                .add(link.index, IpAddr::V4(ip), prefix)
                .replace()
                .execute()
                .await
                .map_err(|source| NetError::Netlink { op: "add address", name: name.into(), source })?;
        }
        self.set_up(name, link.index, None).await?;
        Ok(link.index)
    }

    async fn set_up(&self, name: &str, index: u32, controller: Option<u32>) -> Result<(), NetError> {
        let mut builder = LinkUnspec::new_with_index(index).up();
        if let Some(c) = controller {
            builder = builder.controller(c);
        }
        self.handle.link().set(builder.build()).execute().await.map_err(|source| NetError::Netlink {
            op: "set up",
            name: name.into(),
            source,
        })
    }

    /// Creates persistent TAP `name` if missing, owned by `owner` (uid,
    /// gid: the only user besides root that may attach to it), enslaves it
    /// to the bridge with index `bridge` and brings it up, in one netlink
    /// request (enslaving to its own bridge again changes nothing). Returns
    /// its index. Safe to repeat.
    pub async fn ensure_tap(&self, name: &str, bridge: u32, owner: (u32, u32)) -> Result<u32, NetError> {
        // An existing TAP is opened again to set its owner (it may be
        // left from a VMM of another user); one in use is left as it is.
        // It waits for forks under way, so not on this task's thread.
        let made = {
            let tap = name.to_string();
            tokio::task::spawn_blocking(move || create_persistent_tap(&tap, owner))
                .await
                .map_err(|e| NetError::Tap { name: name.into(), source: std::io::Error::other(e.to_string()) })?
        };
        match made {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(source) => return Err(NetError::Tap { name: name.into(), source }),
        }
        let index = index_of(name)?.ok_or_else(|| NetError::Vanished(name.into()))?;
        self.without_ipv6_address(name, index).await;
        self.set_up(name, index, Some(bridge)).await?;
        Ok(index)
    }

    /// Has link `index` make no IPv6 address of its own (address
    /// generation `none`), before it is brought up: with no address there
    /// is no duplicate address detection, no multicast listener report and
    /// no route to add or remove as it goes up and down, as with
    /// [`without_ipv6`], but in a netlink request (writing the sysctl spins
    /// while another link changes: the kernel only tries its lock there).
    /// Best effort: a host without IPv6 has nothing to turn off.
    async fn without_ipv6_address(&self, name: &str, index: u32) {
        let none = AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)]);
        let request =
            LinkUnspec::new_with_index(index).append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![none])).build();
        if let Err(e) = self.handle.link().set(request).execute().await {
            tracing::debug!(link = name, error = %e, "turning IPv6 address generation off failed");
        }
    }

    /// Deletes link `name`, with the others being deleted at the same
    /// time (see [`LinkReaper`]); returns whether it existed. Returns once
    /// it is gone.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetError> {
        self.reaper.remove(name).await
    }
}

nix::ioctl_write_int!(tunsetiff, b'T', 202);
nix::ioctl_write_int!(tunsetpersist, b'T', 203);
nix::ioctl_write_int!(tunsetowner, b'T', 204);
nix::ioctl_write_int!(tunsetgroup, b'T', 206);

/// Whether link `name` exists in this network namespace (see [`index_of`]).
pub fn exists(name: &str) -> Result<bool, NetError> {
    Ok(index_of(name)?.is_some())
}

/// Turns IPv6 off on link `name` of the calling thread's network namespace.
/// A VM's TAP and veth are ports of a bridge (or of the VM's own
/// namespace): the host needs no IPv6 address on them, and without one
/// bringing them up and down costs no duplicate address detection,
/// multicast listener reports or walks of the IPv6 routing table (the
/// guest's own IPv6 still crosses the bridge). Best effort: a host without
/// IPv6 has nothing to turn off.
pub fn without_ipv6(name: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1")
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::debug!(link = name, error = %e, "turning IPv6 off failed");
    }
}

/// Turns IPv6 off for every link made from now on in the calling thread's
/// network namespace (see [`without_ipv6`]), and on those there already.
pub fn no_ipv6_in_namespace() {
    for conf in ["default", "all"] {
        without_ipv6(conf);
    }
}

/// Creates (or opens) persistent TAP `name` with the flags Firecracker
/// opens it with (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), owned by `owner`
/// (uid, gid). While its descriptor is open no fork happens (see
/// [`crate::host::forks`]); it waits for forks under way.
pub fn create_persistent_tap(name: &str, owner: (u32, u32)) -> std::io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "interface name too long"));
    }
    crate::host::forks::without_forks(|| make_persistent_tap(name, owner))
}

fn make_persistent_tap(name: &str, owner: (u32, u32)) -> std::io::Result<()> {
    let tun = attach_tap(name)?;
    // SAFETY: `tun` is a descriptor attached to the TAP; the calls take integers.
    unsafe {
        tunsetowner(tun.as_raw_fd(), owner.0 as libc::c_ulong).map_err(std::io::Error::from)?;
        tunsetgroup(tun.as_raw_fd(), owner.1 as libc::c_ulong).map_err(std::io::Error::from)?;
        tunsetpersist(tun.as_raw_fd(), 1).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// A new descriptor attached to TAP `name` (made if missing, gone with the
/// descriptor unless persistent), with the flags Firecracker uses. EBUSY
/// when another descriptor is attached to it.
pub(crate) fn attach_tap(name: &str) -> std::io::Result<std::fs::File> {
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `req` outlives the call.
    unsafe { tunsetiff(tun.as_raw_fd(), &req as *const libc::ifreq as libc::c_ulong) }.map_err(std::io::Error::from)?;
    Ok(tun)
}

/// The index of interface `name`, if there is one.
///
/// An ioctl on a socket (`if_nametoindex`), not a netlink exchange, whose
/// answer carries every attribute and statistic of the link.
fn index_of(name: &str) -> Result<Option<u32>, NetError> {
    let lookup = |source| NetError::Lookup { name: name.to_string(), source };
    let c_name = std::ffi::CString::new(name).map_err(|e| lookup(std::io::Error::other(e)))?;
    // SAFETY: `c_name` is NUL-terminated and outlives the call, which only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index != 0 {
        return Ok(Some(index));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        e => Err(lookup(e)),
    }
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = text.split_once('/').ok_or_else(|| format!("{text:?} is not in a.b.c.d/len form"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| format!("prefix length {len:?} must be 0-32"))?;
    Ok((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_exists_or_not_without_netlink() {
        assert!(exists("lo").unwrap(), "every namespace has lo");
        assert!(!exists("nxt-none-such").unwrap());
        assert!(exists("l\0o").is_err(), "a name with a NUL is an error, not an absent link");
    }
}
