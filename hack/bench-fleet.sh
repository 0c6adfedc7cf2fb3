#!/usr/bin/env bash
# Benchmarks the whole system (release build, simulated VMM, as root):
# V VMs applied at once across N agents, each in its own network namespace.
#   hack/bench-fleet.sh [--vms 1000] [--agents 10]
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh
need_build_tools
build_bench_bins
exec "${CARGO_TARGET_DIR:-target}/release/nexus-fleet-bench" "$@"
