//! Actions and the VM's state: InstanceStart, SendCtrlAltDel, FlushMetrics,
//! pause and resume.

use super::*;

impl Vmm {
    pub(super) fn put_action(&mut self, body: &[u8]) -> (Reply, After) {
        let action: InstanceAction = match parse(body) {
            Ok(a) => a,
            Err(r) => return (r, After::Nothing),
        };
        match action.action_type.as_str() {
            "InstanceStart" => {
                if self.state != InstanceState::NotStarted {
                    return (Reply::fault(400, NOT_SUPPORTED_AFTER_BOOT), After::Nothing);
                }
                if self.boot.is_none() {
                    return (Reply::fault(400, "Cannot start microvm without kernel configuration."), After::Nothing);
                }
                self.state = InstanceState::Running;
                self.log("main", "INFO", "Successfully started microvm that was configured from one single json");
                (Reply::no_content(), self.after_running())
            }
            "FlushMetrics" => {
                if self.metrics.is_none() {
                    return (Reply::fault(400, "The metrics system is not initialized."), After::Nothing);
                }
                self.flush_metrics();
                (Reply::no_content(), After::Nothing)
            }
            "SendCtrlAltDel" => {
                if self.state == InstanceState::NotStarted {
                    return (Reply::fault(400, NOT_SUPPORTED_BEFORE_BOOT), After::Nothing);
                }
                self.log("main", "INFO", "Sending CTRL+ALT+DEL to the guest");
                // Firecracker only injects the keys: powering off is the
                // guest's business, and some guests ignore them.
                if std::env::var_os("FIRECRACKER_SIM_GUEST_IGNORES_CTRL_ALT_DEL").is_some() {
                    return (Reply::no_content(), After::Nothing);
                }
                (Reply::no_content(), After::Shutdown)
            }
            other => (
                Reply::fault(
                    400,
                    format!(
                        "An error occurred when deserializing the json body of a request: unknown variant `{other}`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`."
                    ),
                ),
                After::Nothing,
            ),
        }
    }

    /// `Booted` the first time the guest is seen running, so the console starts once.
    pub(super) fn after_running(&mut self) -> After {
        if self.state == InstanceState::Running && !self.console_started {
            self.console_started = true;
            After::Booted
        } else {
            After::Nothing
        }
    }

    pub(super) fn patch_vm(&mut self, body: &[u8]) -> Reply {
        let vm: VmState = attempt!(parse(body));
        if self.state == InstanceState::NotStarted {
            return Reply::fault(400, NOT_SUPPORTED_BEFORE_BOOT);
        }
        match vm.state.as_str() {
            "Paused" => self.state = InstanceState::Paused,
            "Resumed" => self.state = InstanceState::Running,
            other => {
                return Reply::fault(
                    400,
                    format!(
                        "An error occurred when deserializing the json body of a request: unknown variant `{other}`, expected `Paused` or `Resumed`."
                    ),
                );
            }
        }
        Reply::no_content()
    }
}
