#!/usr/bin/env bash
# Benchmarks one VM's start (release build, as root): the VMM driven by hand,
# then the same VM through nexus one at a time, with a per-phase breakdown;
# with --restore, a start from a snapshot the same way; with --fork N, N
# copies of a running VM from one fork request.
#   hack/bench-latency.sh [--vms 100] [--raw-runs 20] [--restore | --fork N]
#                         [--firecracker PATH --kernel VMLINUX --rootfs IMG] [--boot-line TEXT]
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh
need_build_tools
build_bench_bins
exec "${CARGO_TARGET_DIR:-target}/release/nexus-latency-bench" "$@"
