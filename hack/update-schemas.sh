#!/usr/bin/env bash
# Regenerates schemas/*.json and the route table of docs/api.md from the
# resource types and the kind registry in crates/api.
set -euo pipefail
cd "$(dirname "$0")/.."
NEXUS_UPDATE_SCHEMAS=1 cargo test -q -p nexus-api --test schemas
git status --short schemas/ docs/api.md
