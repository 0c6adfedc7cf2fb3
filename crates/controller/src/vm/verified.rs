//! Which VMs' agent reports are fresh: a reconcile of a VM whose spec,
//! labels (its guest reads them) and status are still exactly what the
//! last report made of them, within the
//! recheck period, has nothing to ask its agent (it was woken by the
//! controller's own status write). A VMM exit its node announced after
//! that report makes the report stale at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nexus_api::node::VmmExitNotice;
use nexus_api::{Vm, VmStatus};

/// What the agent last reported of each VM, by uid.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    seen: Arc<Mutex<HashMap<String, Report>>>,
}

/// One VM's last report, as it was written.
#[derive(Debug, Clone)]
struct Report {
    generation: Option<i64>,
    labels: std::collections::BTreeMap<String, String>,
    status: VmStatus,
    at: Instant,
    /// The node's latest exit notice for the VM when the report came (the
    /// node's own clock: only ever compared with its own notices).
    exit: Option<DateTime<Utc>>,
}

/// The latest exit notice `exits` holds for `uid`.
fn latest_exit(exits: &[VmmExitNotice], uid: &str) -> Option<DateTime<Utc>> {
    exits.iter().filter(|n| n.uid == uid).map(|n| n.at).max()
}

impl Verified {
    /// Records that `vm`'s report was written as `status`, while its node
    /// announced `exits`.
    pub fn record(&self, vm: &Vm, status: &VmStatus, exits: &[VmmExitNotice]) {
        let report = Report {
            generation: vm.metadata.generation,
            labels: vm.metadata.labels.clone(),
            status: status.clone(),
            at: Instant::now(),
            exit: latest_exit(exits, vm.uid()),
        };
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(vm.uid().to_string(), report);
    }

    /// Forgets VM `uid` (it is being deleted).
    pub fn forget(&self, uid: &str) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }

    /// How long `vm` stays verified: `None` unless it is unchanged since
    /// its report, within `period`, and its node (announcing `exits`) has
    /// announced no exit of its VMM since.
    pub fn remaining(&self, vm: &Vm, period: Duration, exits: &[VmmExitNotice]) -> Option<Duration> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let r = seen.get(vm.uid())?;
        let unchanged = r.generation == vm.metadata.generation
            && r.labels == vm.metadata.labels
            && vm.status.as_ref() == Some(&r.status);
        let no_new_exit = latest_exit(exits, vm.uid()) == r.exit;
        period.checked_sub(r.at.elapsed()).filter(|left| unchanged && no_new_exit && !left.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_api::VmSpec;

    #[test]
    fn a_report_stays_fresh_until_the_vm_changes_or_its_node_announces_an_exit() {
        let verified = Verified::default();
        let mut vm = Vm::new("a", Some("p"), VmSpec::default());
        vm.metadata.uid = Some("u1".into());
        vm.metadata.generation = Some(1);
        let status = VmStatus::default();
        vm.status = Some(status.clone());
        let earlier = VmmExitNotice { uid: "u1".into(), at: Utc::now() - chrono::Duration::seconds(30) };
        verified.record(&vm, &status, std::slice::from_ref(&earlier));
        let period = Duration::from_secs(5);
        assert!(verified.remaining(&vm, period, std::slice::from_ref(&earlier)).is_some(), "nothing new");
        let other = VmmExitNotice { uid: "u2".into(), at: Utc::now() };
        assert!(verified.remaining(&vm, period, &[earlier.clone(), other]).is_some(), "another VM's exit");
        let later = VmmExitNotice { uid: "u1".into(), at: Utc::now() };
        assert!(verified.remaining(&vm, period, &[earlier.clone(), later]).is_none(), "a new exit of its VMM");
        vm.metadata.generation = Some(2);
        assert!(verified.remaining(&vm, period, &[earlier]).is_none(), "its spec changed");
        verified.forget("u1");
        vm.metadata.generation = Some(1);
        assert!(verified.remaining(&vm, period, &[]).is_none(), "forgotten");
    }
}
