#!/usr/bin/env bash
# Runs the fleet benchmark against two builds in turn (before, after,
# before, after, ...) on this machine, so that both see the same spells of
# a busy or quiet host, and prints one row per run and each build's means:
# apply to all Running, delete all, and the ramp's CPU per VM of the
# apiserver, controller, agents and simulated VMMs. Each build is a
# directory of release binaries as `build_bench_bins` makes them: copy
# `nexus-*` and `firecracker-sim` of `$CARGO_TARGET_DIR/release` aside
# before changing the code.
#   hack/bench-compare.sh BEFORE_DIR AFTER_DIR [PAIRS=3] [fleet bench flags]   (as root)
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
before=$1 after=$2
shift 2
pairs=3
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then pairs=$1; shift; fi
for d in "$before" "$after"; do
    [ -x "$d/nexus-fleet-bench" ] || { echo "no nexus-fleet-bench in $d" >&2; exit 2; }
done

# The value of the benchmark's table line that begins with $1, in $2.
value() { awk -v k="$1" 'index($0, k) == 1 {print $NF; exit}' "$2"; }
# Of a line whose value is "a / b": a (n=1) or b (n=2).
pair() { awk -v k="$1" -v n="$3" 'index($0, k) == 1 {print (n == 1 ? $(NF-2) : $NF); exit}' "$2"; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf '%-7s %4s %9s %9s %8s %8s %8s %8s\n' build run "ramp ms" "delete ms" "api ms/VM" "ctl" agents VMMs
for i in $(seq "$pairs"); do
    for side in before after; do
        dir=$before
        [ "$side" = after ] && dir=$after
        log="$out/$side-$i.txt"
        if ! NEXUS_BIN_DIR="$dir" "$dir/nexus-fleet-bench" "$@" > "$log" 2> "$log.err"; then
            cat "$log.err" >&2
            exit 1
        fi
        vms=$(pair "VMs / agents" "$log" 1)
        ramp=$(value "apply -> all Running ms" "$log")
        del=$(value "delete all (--wait) ms" "$log")
        api=$(pair "CPU ms apiserver / controller" "$log" 1)
        ctl=$(pair "CPU ms apiserver / controller" "$log" 2)
        agents=$(pair "CPU ms agents / bench" "$log" 1)
        vmms=$(value "CPU ms simulated VMMs" "$log")
        echo "$side $i $ramp $del $api $ctl $agents $vmms $vms" >> "$out/rows"
        awk -v v="$vms" '{printf "%-7s %4s %9s %9s %8.2f %8.2f %8.2f %8.2f\n", $1, $2, $3, $4, $5/v, $6/v, $7/v, $8/v}' \
            <(tail -1 "$out/rows")
    done
done
echo
awk '{n[$1]++; r[$1]+=$3; d[$1]+=$4; a[$1]+=$5/$9; c[$1]+=$6/$9; g[$1]+=$7/$9; m[$1]+=$8/$9}
     END {for (s in n) printf "%-7s mean %9.0f %9.0f %8.2f %8.2f %8.2f %8.2f\n", s, r[s]/n[s], d[s]/n[s], a[s]/n[s], c[s]/n[s], g[s]/n[s], m[s]/n[s]}' \
    "$out/rows" | sort
