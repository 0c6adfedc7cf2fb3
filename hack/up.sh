#!/usr/bin/env bash
# Builds nexus, starts the apiserver (embedded SQLite), a node agent and the
# controller on this host, and runs the example VM. Needs root (bridge, TAP).
# Stop everything with hack/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh

state=${NEXUS_STATE_DIR:-/var/lib/nexus}
server=https://127.0.0.1:7443
pki=$state/data/pki
need_build_tools
[ "$(id -u)" -eq 0 ] || { echo "hack/up.sh needs root: the agent creates a bridge and TAP devices" >&2; exit 1; }

cargo build --workspace --bins
bin=${CARGO_TARGET_DIR:-target}/debug
case $bin in /*) ;; *) bin=$PWD/$bin ;; esac
export PATH="$bin:$PATH"

bash hack/down.sh >/dev/null 2>&1 || true
mkdir -p "$state/log"
bash hack/images.sh

if command -v firecracker >/dev/null 2>&1; then
    vmm=$(command -v firecracker)
else
    vmm=$bin/firecracker-sim
    echo "no firecracker binary on PATH: using the simulator ($vmm)"
fi

start() {
    local name=$1; shift
    nohup "$@" >>"$state/log/$name.log" 2>&1 &
    echo $! > "$state/$name.pid"
}
# TLS on the loopback too: the cluster's CA (made once, kept after), the
# apiserver's certificate (found in $pki by default) and the agent's.
nexus-apiserver --data-dir "$state/data" init-pki >/dev/null
nexus-apiserver issue-cert --dir "$pki" --name agent --san 127.0.0.1 >/dev/null
export NEXUS_CA_FILE=$pki/ca.crt
# Dev mode (--allow-raw-paths): the examples name kernels and disks by path.
start apiserver nexus-apiserver --data-dir "$state/data" --allow-raw-paths
for _ in $(seq 50); do nexusctl --server "$server" version >/dev/null 2>&1 && break; sleep 0.2; done
# The first start on an empty store wrote the cluster admin's token.
for _ in $(seq 50); do [ -s "$state/data/admin.token" ] && break; sleep 0.2; done
admin=$(cat "$state/data/admin.token")
# nexusctl uses it from now on (context "local", file mode 0600).
nexusctl config set-context local --server "$server" --certificate-authority "$pki/ca.crt" --token "$admin" \
    --project default >/dev/null
nexusctl config use-context local >/dev/null
# Each component its own credential: the controller's token, and a
# short-lived join token with which the agent gets its own.
if [ ! -s "$state/controller.token" ]; then
    (umask 077; nexusctl token create --subject system:controller --description controller -o token \
        > "$state/controller.token")
fi
(umask 077; nexusctl token create --subject system:join --ttl 10m --description "hack/up.sh" -o token \
    > "$state/join.token")
start nodeagent nexus-nodeagent --apiserver "$server" --ca-file "$pki/ca.crt" \
    --tls-cert "$pki/agent.crt" --tls-key "$pki/agent.key" --state-dir "$state/agent" \
    --join-token-file "$state/join.token" --run-dir "$state/run" --firecracker "$vmm"
start controller nexus-controller --apiserver "$server" --ca-file "$pki/ca.crt" \
    --token-file "$state/controller.token"

nexusctl apply -f examples/vm.yaml
running=0
nexusctl wait vm hello --for='jsonpath={.status.phase}=Running' --timeout 30 || running=$?
nexusctl get vms -o wide
[ "$running" -eq 0 ] || { echo "the example VM is not Running; see $state/log/*.log" >&2; exit 1; }
echo
echo "nexus is up: logs in $state/log, binaries in $bin (add it to PATH)."
echo "nexusctl's context \"local\" holds the cluster admin's token ($state/data/admin.token)"
echo "and trusts the cluster's CA ($pki/ca.crt); every connection is HTTPS."
echo "Try: $bin/nexusctl get vms; $bin/nexusctl delete vm hello; stop with hack/down.sh"
