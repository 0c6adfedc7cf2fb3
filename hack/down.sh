#!/usr/bin/env bash
# Stops what hack/up.sh started. VMs keep running unless deleted first;
# the agent adopts them when it starts again.
set -uo pipefail
state=${NEXUS_STATE_DIR:-/var/lib/nexus}
for name in controller nodeagent apiserver; do
    pidfile=$state/$name.pid
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
    echo "stopped $name"
done
