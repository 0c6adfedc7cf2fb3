//! Removing links in batches. After unregistering a device the kernel
//! waits for a grace period (readers of the old device to finish), and the
//! waits of requests that remove one link each follow one another: on the
//! benchmark host, 300 TAPs removed one request at a time took 4.9 s, ten
//! requests at a time 1.4 s, and one request that removed them as a group
//! 0.08 s. So a link to remove is moved into [`REMOVAL_GROUP`], and one
//! task per netlink connection removes that group with one request for all
//! the links moved into it since its last request (see decision 24).

use std::sync::Arc;

use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};
use tokio::sync::{mpsc, oneshot};

use super::net::{NetError, is_no_device};

/// The device group a link joins when it is to be removed. Nothing else
/// on a node may use it: every link in it is removed with the next batch.
/// (The kernel's default group is 0; this is "NXRM" in ASCII.)
pub const REMOVAL_GROUP: u32 = 0x4e58_524d;

/// What a batch came to for one link in it: whether it existed.
type Outcome = Result<bool, Arc<rtnetlink::Error>>;

/// A link waiting for the next batch: its name, and who to tell.
type Waiting = (String, oneshot::Sender<Outcome>);

/// Removes links of one network namespace, batching the requests that
/// arrive while one is under way.
#[derive(Debug, Clone)]
pub struct LinkReaper {
    handle: Handle,
    queue: mpsc::UnboundedSender<Waiting>,
}

impl LinkReaper {
    /// Starts the task removing batches over `handle`'s connection; it
    /// lives as long as a clone of the reaper does. Must be called inside a
    /// tokio runtime.
    pub fn spawn(handle: Handle) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(remove_batches(handle.clone(), waiting));
        LinkReaper { handle, queue }
    }

    /// Removes link `name`; returns whether it existed. Returns once it is
    /// gone.
    pub async fn remove(&self, name: &str) -> Result<bool, NetError> {
        match mark(&self.handle, name).await {
            Ok(()) => {}
            Err(e) if is_no_device(&e) => return Ok(false),
            Err(source) => return Err(NetError::Netlink { op: "mark for removal", name: name.into(), source }),
        }
        // Asked after the mark: the batch that answers began after it, so
        // it removed the link (or found it gone with an earlier batch).
        let (done, outcome) = oneshot::channel();
        let gone = || NetError::Vanished(format!("the link reaper (removing {name})"));
        self.queue.send((name.to_string(), done)).map_err(|_| gone())?;
        match outcome.await.map_err(|_| gone())? {
            Ok(existed) => Ok(existed),
            Err(source) => Err(NetError::Batch { name: name.into(), source }),
        }
    }
}

/// Moves link `name` into [`REMOVAL_GROUP`]. The request names the link
/// (the kernel finds it by name), so no request is spent on its index.
async fn mark(handle: &Handle, name: &str) -> Result<(), rtnetlink::Error> {
    let mut message = LinkUnspec::new_with_name(name).build();
    message.attributes.push(LinkAttribute::Group(REMOVAL_GROUP));
    handle.link().set(message).execute().await
}

/// Removes [`REMOVAL_GROUP`] once for every run of requests waiting, and
/// answers each of them with the outcome. Should the group's removal fail
/// (a device in it that cannot be removed by netlink, which none of the
/// agent's is), each waiting link is removed on its own, so that one
/// stray device does not stop every removal.
async fn remove_batches(handle: Handle, mut queue: mpsc::UnboundedReceiver<Waiting>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while let Ok(next) = queue.try_recv() {
            batch.push(next);
        }
        let mut group = LinkMessage::default();
        group.attributes.push(LinkAttribute::Group(REMOVAL_GROUP));
        let failed = match handle.link().del_with_message(group).execute().await {
            Ok(()) => None,
            // Nothing left in the group: an earlier batch took it all.
            Err(e) if is_no_device(&e) => None,
            Err(e) => Some(e),
        };
        tracing::debug!(links = batch.len(), failed = ?failed, "removed a batch of links");
        for (name, done) in batch {
            let outcome = match &failed {
                None => Ok(true),
                Some(_) => {
                    match handle.link().del_with_message(LinkUnspec::new_with_name(&name).build()).execute().await {
                        Ok(()) => Ok(true),
                        Err(e) if is_no_device(&e) => Ok(false),
                        Err(e) => Err(Arc::new(e)),
                    }
                }
            };
            let _ = done.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::net::{Net, create_persistent_tap, exists};

    /// Runs `test` with a netlink connection of a new network namespace,
    /// on a thread and runtime of its own (needs root).
    fn in_new_namespace<F: std::future::Future<Output = ()>>(test: impl FnOnce(Net) -> F + Send + 'static) {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a network namespace");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async { test(Net::connect().unwrap()).await });
        })
        .join()
        .expect("the test's thread")
    }

    #[test]
    fn links_removed_at_once_all_go_and_nothing_else_does() {
        in_new_namespace(|net| async move {
            for i in 0..60 {
                create_persistent_tap(&format!("nxtreap{i}"), (0, 0)).unwrap();
            }
            let kept = "nxtkept";
            create_persistent_tap(kept, (0, 0)).unwrap();
            let removals = (0..60).map(|i| {
                let net = net.clone();
                tokio::spawn(async move { net.delete_link(&format!("nxtreap{i}")).await })
            });
            for removed in futures::future::join_all(removals).await {
                assert!(removed.unwrap().unwrap(), "each existed");
            }
            for i in 0..60 {
                assert!(!exists(&format!("nxtreap{i}")).unwrap(), "nxtreap{i} is gone");
            }
            assert!(exists(kept).unwrap(), "a link not asked for stays");
            assert!(!net.delete_link("nxtreap0").await.unwrap(), "a second removal finds nothing");
            assert!(net.delete_link(kept).await.unwrap());
            assert!(!exists(kept).unwrap());
        });
    }

    #[test]
    fn a_device_in_the_group_that_netlink_cannot_remove_stops_no_removal() {
        in_new_namespace(|net| async move {
            // Loopback has no netlink removal: the group's removal fails with it in.
            mark(net.handle(), "lo").await.unwrap();
            create_persistent_tap("nxtafter", (0, 0)).unwrap();
            assert!(net.delete_link("nxtafter").await.unwrap());
            assert!(!exists("nxtafter").unwrap(), "removed on its own");
            assert!(exists("lo").unwrap());
        });
    }

    #[test]
    fn a_link_left_in_the_group_goes_with_the_next_batch() {
        in_new_namespace(|net| async move {
            // As an agent that stopped between marking and removing leaves it.
            create_persistent_tap("nxtleft", (0, 0)).unwrap();
            mark(net.handle(), "nxtleft").await.unwrap();
            create_persistent_tap("nxtnext", (0, 0)).unwrap();
            assert!(net.delete_link("nxtnext").await.unwrap());
            assert!(!exists("nxtleft").unwrap() && !exists("nxtnext").unwrap());
        });
    }
}
