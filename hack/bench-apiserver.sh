#!/usr/bin/env bash
# Benchmarks the apiserver on one backend (release build):
#   hack/bench-apiserver.sh [sqlite|postgres] [extra nexus-bench flags]
# e.g. hack/bench-apiserver.sh postgres --objects 10000 --concurrency 16
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh
need_build_tools
backend=${1:-sqlite}
shift || true
[ "$backend" = postgres ] && need_postgres
cargo build -q --release -p nexus-apiserver -p nexus-e2e --bins
exec "${CARGO_TARGET_DIR:-target}/release/nexus-bench" --backend "$backend" "$@"
