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

# Builds every release binary for a benchmark, then links the simulated VMM
# again statically, as Firecracker's release binaries are (see
# `link_sim_static`). Only the simulator and its own dependencies are built
# a second time (a later plain build puts the dynamically linked simulator
# back).
build_bench_bins() {
    cargo build -q --release --workspace --bins
    link_sim_static
}

# Puts a statically linked release simulated VMM at release/firecracker-sim.
# Firecracker's release binaries are static musl; so is the simulator when
# Rust's musl target is installed or rustup can add it. Otherwise it is
# linked statically against glibc, whose start measures the CPU's caches
# with some 80 `cpuid` instructions (each a trap to the hypervisor on a
# virtual host, about half of such a start's CPU there); the fleet benchmark
# prints which libc it ran.
link_sim_static() {
    local musl target
    musl="$(uname -m)-unknown-linux-musl"
    target=${CARGO_TARGET_DIR:-target}
    if command -v rustup >/dev/null 2>&1 &&
        { rustup target list --installed 2>/dev/null | grep -qx "$musl" ||
            timeout 300 rustup target add "$musl" >/dev/null 2>&1; }; then
        cargo build -q --release -p firecracker-sim --target "$musl"
        # Renamed into place: a simulator still running keeps its old file.
        cp "$target/$musl/release/firecracker-sim" "$target/release/firecracker-sim.musl"
        mv -f "$target/release/firecracker-sim.musl" "$target/release/firecracker-sim"
        return 0
    fi
    echo "Rust's $musl target cannot be had; linking the simulated VMM statically against glibc" >&2
    cargo rustc -q --release -p firecracker-sim --bin firecracker-sim -- -C target-feature=+crt-static
}

# PostgreSQL server binaries for the tests that start a throwaway cluster.
need_postgres() {
    if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        return 0
    fi
    need_packages __nexus_no_such_command__:postgresql
}

# Sets FIRECRACKER_API_SPEC to Firecracker's v1.16.1 OpenAPI spec: the one
# given, the copy in ../shared/firecracker/, or a download from Firecracker's
# repository at v1.16.1, kept under the target directory and checked against
# its sha256. Says so plainly when none can be had (the conformance tests
# then fail with the same reason).
need_firecracker_spec() {
    local sum=a514abec7b29700c5ca8bdaebbb960e4ffb46fe1fd4869094c6c63630a6fa41c
    local url=https://raw.githubusercontent.com/firecracker-microvm/firecracker/v1.16.1/src/firecracker/swagger/firecracker.yaml
    local shared
    shared="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/firecracker/firecracker-v1.16.1-api.yaml"
    if [ -n "${FIRECRACKER_API_SPEC:-}" ] && [ -f "$FIRECRACKER_API_SPEC" ]; then
        return 0
    fi
    if [ -f "$shared" ]; then
        export FIRECRACKER_API_SPEC="$shared"
        return 0
    fi
    local cache="${CARGO_TARGET_DIR:-$(pwd)/target}/firecracker-api/firecracker-v1.16.1-api.yaml"
    if [ ! -f "$cache" ] || ! echo "$sum  $cache" | sha256sum -c --quiet - >/dev/null 2>&1; then
        mkdir -p "$(dirname "$cache")"
        if ! curl -fsSL --max-time 60 -o "$cache.part" "$url"; then
            echo "no copy of Firecracker's v1.16.1 OpenAPI spec: not in \$FIRECRACKER_API_SPEC, not at $shared, and $url cannot be reached; the conformance tests will fail" >&2
            rm -f "$cache.part"
            return 0
        fi
        if ! echo "$sum  $cache.part" | sha256sum -c --quiet - >/dev/null 2>&1; then
            echo "the Firecracker spec downloaded from $url does not have sha256 $sum; not using it" >&2
            rm -f "$cache.part"
            return 0
        fi
        mv "$cache.part" "$cache"
    fi
    export FIRECRACKER_API_SPEC="$cache"
}

# Puts cargo-deny (a pinned version) on PATH: the one there, or one built
# once into $NEXUS_TOOLS_DIR (default /var/tmp/nexus-tools, beside CI's
# reused target directory), from crates.io.
need_cargo_deny() {
    local version=0.20.2
    local dir=${NEXUS_TOOLS_DIR:-/var/tmp/nexus-tools}
    export PATH="$dir/bin:$PATH"
    if cargo deny --version 2>/dev/null | grep -q "$version"; then
        return 0
    fi
    echo "installing cargo-deny $version into $dir" >&2
    cargo install --quiet --locked --version "$version" --root "$dir" cargo-deny
}
