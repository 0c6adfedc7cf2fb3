#!/usr/bin/env bash
# Runs every check and test: formatting, lints, schema drift, unit tests and
# the system tests (real processes in network namespaces; needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh
need_build_tools
need_postgres
need_packages psql:postgresql-client curl:curl dbus-daemon:dbus-daemon mkfs.xfs:xfsprogs systemd-analyze:systemd mkfs.ext4:e2fsprogs debugfs:e2fsprogs sqlite3:sqlite3 strace:strace chromium:chromium chromedriver:chromium-driver
# A font for the console's browser tests (chromium only recommends one).
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_packages __nexus_no_such_command__:fonts-dejavu-core

# Firecracker's v1.16.1 OpenAPI spec, which the conformance tests check the
# agent's requests against: $FIRECRACKER_API_SPEC, a copy beside the
# repository, or one downloaded from Firecracker's repository (and checked).
need_firecracker_spec

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo deny (licenses, bans, sources)"
need_cargo_deny
cargo deny -L error check licenses bans sources
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --bins --locked
echo "== tests (schema drift check included)"
cargo test --workspace --locked --no-fail-fast
