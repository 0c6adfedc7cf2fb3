#!/usr/bin/env bash
# Regenerates schemas/*.json from the resource types in crates/api.
set -euo pipefail
cd "$(dirname "$0")/.."
NEXUS_UPDATE_SCHEMAS=1 cargo test -q -p nexus-api --test schemas
git status --short schemas/
