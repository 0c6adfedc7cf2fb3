# Shared helpers for the hack/ scripts. Source it; do not run it.

# Installs the Debian packages a script needs when their commands are missing.
# Usage: need_packages cmd:package ...
need_packages() {
    local missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Makes sure a Rust toolchain is on PATH (rustup's, which Debian's is too old for).
need_rust() {
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    command -v cargo >/dev/null 2>&1 && return 0
    need_packages curl:curl
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    . "$HOME/.cargo/env"
}

# The packages every build and test needs.
need_build_tools() {
    need_packages ip:iproute2 cc:gcc git:git nft:nftables
    need_rust
}

# PostgreSQL server binaries for the tests that start a throwaway cluster.
need_postgres() {
    if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        return 0
    fi
    need_packages __nexus_no_such_command__:postgresql
}
