#!/usr/bin/env bash
# Writes the upgrade test's fixtures: a SQLite and a PostgreSQL database as
# the apiserver of an earlier commit left them, holding objects of every kind
# it knew (the examples of that commit), a token and a role binding. The
# test (crates/e2e/tests/upgrade.rs) loads them and starts today's
# apiserver on them.
#
#   bash hack/upgrade-fixture.sh REV [--bin-dir DIR]
#
# --bin-dir takes that commit's nexus-apiserver and nexusctl from DIR
# instead of building them. Needs PostgreSQL's server binaries (initdb),
# sqlite3 and pg_dump.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh
rev=${1:?usage: hack/upgrade-fixture.sh REV [--bin-dir DIR]}
shift
bin_dir=""
[ "${1:-}" = --bin-dir ] && bin_dir=$2
need_packages sqlite3:sqlite3 pg_dump:postgresql-client
out=$PWD/crates/e2e/tests/fixtures/upgrade
work=$(mktemp -d /var/tmp/nexus-fixture-XXXX)
# That nexusctl must not read this user's config (a newer one may not parse).
export NEXUS_CONFIG=$work/nexusctl.yaml
cleanup() {
    [ -n "${api_pid:-}" ] && kill "$api_pid" 2>/dev/null || true
    [ -d "$work/pg" ] && su postgres -s /bin/sh -c "$(ls /usr/lib/postgresql/*/bin/pg_ctl | head -1) -D $work/pg -m immediate stop" >/dev/null 2>&1 || true
    git worktree remove --force "$work/src" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
git worktree add --detach "$work/src" "$rev" >/dev/null
if [ -z "$bin_dir" ]; then
    (cd "$work/src" && CARGO_TARGET_DIR=$work/target cargo build --release -p nexus-apiserver -p nexusctl)
    bin_dir=$work/target/release
fi

# Starts that apiserver with "$2..." as its storage flags, applies the
# examples and a token, keeps its admin token as admin-$1.token, and stops it.
fill() {
    local name=$1; shift
    local token_file=$work/admin.token
    rm -f "$token_file"
    "$bin_dir/nexus-apiserver" --listen 127.0.0.1:7499 --bootstrap-token-file "$token_file" --allow-raw-paths "$@" \
        >"$work/apiserver.log" 2>&1 &
    api_pid=$!
    for _ in $(seq 100); do [ -s "$token_file" ] && break; sleep 0.1; done
    local ctl=("$bin_dir/nexusctl" --server http://127.0.0.1:7499 --token "$(cat "$token_file")")
    "${ctl[@]}" apply -f "$work/src/examples/" >/dev/null
    "${ctl[@]}" token create --subject sa:ci:runner --description "upgrade fixture" -o token >"$work/sa.token"
    cp "$token_file" "$out/admin-$name.token"
    kill "$api_pid"
    wait "$api_pid" 2>/dev/null || true
    api_pid=""
}

mkdir -p "$out"
fill sqlite --data-dir "$work/sqlite"
sqlite3 "$work/sqlite/nexus.db" .dump >"$out/sqlite.sql"

pgbin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | head -1)")
mkdir -p "$work/pg" && chown postgres "$work/pg" "$work"
su postgres -s /bin/sh -c "$pgbin/initdb -D $work/pg -A trust -U postgres >/dev/null"
su postgres -s /bin/sh -c "$pgbin/pg_ctl -D $work/pg -o '-p 55499 -k $work -c listen_addresses=127.0.0.1' -l $work/pg.log start >/dev/null"
for _ in $(seq 50); do pg_isready -h 127.0.0.1 -p 55499 >/dev/null 2>&1 && break; sleep 0.2; done
psql -q -h 127.0.0.1 -p 55499 -U postgres -c "CREATE DATABASE nexus" >/dev/null
fill postgres --database-url "postgres://postgres@127.0.0.1:55499/nexus"
pg_dump -h 127.0.0.1 -p 55499 -U postgres --no-owner --no-privileges nexus >"$out/postgres.sql"

cat >"$out/README.md" <<EOF
# Upgrade fixtures

Databases as the apiserver of commit \`$(git rev-parse --short "$rev")\` left them
(\`hack/upgrade-fixture.sh $(git rev-parse --short "$rev")\`): that commit's \`examples/\`
applied, and a token for \`sa:ci:runner\`. \`admin-sqlite.token\` and
\`admin-postgres.token\` are their bootstrap admins' tokens (test
credentials). \`crates/e2e/tests/upgrade.rs\` starts today's apiserver on
each and checks that every object is served.
EOF
echo "fixtures written to $out"
