#!/usr/bin/env bash
# Builds nexus, starts the apiserver (embedded SQLite), a node agent and the
# controller on this host, and runs the example VM. Needs root (bridge, TAP).
# Stop everything with hack/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh

state=${NEXUS_STATE_DIR:-/var/lib/nexus}
server=http://127.0.0.1:7443
need_build_tools
[ "$(id -u)" -eq 0 ] || { echo "hack/up.sh needs root: the agent creates a bridge and TAP devices" >&2; exit 1; }

cargo build --workspace --bins
bin=${CARGO_TARGET_DIR:-target}/debug
export PATH="$PWD/$bin:$PATH"

bash hack/down.sh >/dev/null 2>&1 || true
mkdir -p "$state/log"
[ -s "$state/agent-token" ] || (umask 077; head -c 32 /dev/urandom | base64 > "$state/agent-token")
bash hack/images.sh

if command -v firecracker >/dev/null 2>&1; then
    vmm=$(command -v firecracker)
else
    vmm=$PWD/$bin/firecracker-sim
    echo "no firecracker binary on PATH: using the simulator ($vmm)"
fi

start() {
    local name=$1; shift
    nohup "$@" >>"$state/log/$name.log" 2>&1 &
    echo $! > "$state/$name.pid"
}
start apiserver nexus-apiserver --data-dir "$state/data"
for _ in $(seq 50); do nexusctl --server "$server" version >/dev/null 2>&1 && break; sleep 0.2; done
start nodeagent nexus-nodeagent --apiserver "$server" --token-file "$state/agent-token" \
    --run-dir "$state/run" --firecracker "$vmm"
start controller nexus-controller --apiserver "$server" --agent-token-file "$state/agent-token"

nexusctl --server "$server" apply -f examples/vm.yaml
running=0
nexusctl --server "$server" wait vm hello --for='jsonpath={.status.phase}=Running' --timeout 30 || running=$?
nexusctl --server "$server" get vms -o wide
[ "$running" -eq 0 ] || { echo "the example VM is not Running; see $state/log/*.log" >&2; exit 1; }
echo
echo "nexus is up: logs in $state/log, binaries in $bin (add it to PATH)."
echo "Try: $bin/nexusctl get vms; $bin/nexusctl delete vm hello; stop with hack/down.sh"
