#!/usr/bin/env bash
# Starts N firecracker-sim processes (default 500), reports the time until
# all of them listen on their API sockets, the CPU each start took (from
# the scheduler's counters) and their resident memory, then stops them.
# Prints a table and a JSON line. The simulator is linked statically, as
# the other benchmarks run it; `dynamic` runs the usual build instead.
#   hack/bench-fcsim.sh [N] [dynamic]   (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh
need_build_tools
need_packages curl:curl
n=${1:-500}
if [ "${2:-static}" = dynamic ]; then
    cargo build -q --release -p firecracker-sim
else
    link_sim_static
fi
bin=${CARGO_TARGET_DIR:-target}/release/firecracker-sim
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

ulimit -n 65536 2>/dev/null || true
t0=$(date +%s%N)
for i in $(seq "$n"); do
    "$bin" --api-sock "$dir/$i.sock" --id "sim-$i" >/dev/null 2>&1 &
    pids+=($!)
done
while [ "$(find "$dir" -name '*.sock' | wc -l)" -lt "$n" ]; do sleep 0.005; done
t1=$(date +%s%N)
start_ms=$(( (t1 - t0) / 1000000 ))

# CPU of every thread of every simulator so far (nanoseconds), per start.
cpu_ns=0
for p in "${pids[@]}"; do
    for t in /proc/"$p"/task/*/schedstat; do
        read -r ns _ < "$t"
        cpu_ns=$((cpu_ns + ns))
    done
done
cpu_us=$((cpu_ns / n / 1000))

# Every one answers its API.
for i in 1 $((n / 2)) "$n"; do
    curl -sf --unix-socket "$dir/$i.sock" http://localhost/ >/dev/null
done
sleep 1
total_kb=0; max_kb=0
for p in "${pids[@]}"; do
    kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")
    total_kb=$((total_kb + kb)); [ "$kb" -gt "$max_kb" ] && max_kb=$kb
done
avg_kb=$((total_kb / n))
printf '%-36s %s\n' "simulators" "$n" "time until all listen (ms)" "$start_ms" \
    "CPU per start, to listening (µs)" "$cpu_us" \
    "idle RSS per process, mean (KiB)" "$avg_kb" "idle RSS per process, max (KiB)" "$max_kb" \
    "idle RSS, all processes (MiB)" "$((total_kb / 1024))"
printf '{"simulators":%d,"start_all_ms":%d,"cpu_per_start_us":%d,"rss_mean_kib":%d,"rss_max_kib":%d,"rss_total_mib":%d}\n' \
    "$n" "$start_ms" "$cpu_us" "$avg_kb" "$max_kb" "$((total_kb / 1024))"
