#!/usr/bin/env bash
# Installs nexus on this host: the binaries, systemd units for the apiserver,
# the controller and the node agent, and their directories; then checks the
# host (`nexus-nodeagent check`).
#
#   bash hack/install.sh --start       build, install, check, start everything
#   bash hack/install.sh --destdir D   install under D only (packaging, tests)
#
# Options:
#   --destdir DIR   install under DIR; nothing is started or checked there
#   --prefix DIR    where binaries go (default /usr/local)
#   --bin-dir DIR   take built binaries from DIR instead of building them
#   --firecracker P the VMM binary the agent runs (default: firecracker on PATH)
#   --start         enable and start the units, and give the controller and
#                   the node their credentials
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh

destdir="" prefix=/usr/local bin_dir="" start=0 firecracker=firecracker
while [ $# -gt 0 ]; do
    case $1 in
        --destdir) destdir=$2; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --firecracker) firecracker=$2; shift 2 ;;
        --start) start=1; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -n "$destdir" ] && [ "$start" -eq 1 ]; then
    echo "--start and --destdir do not go together: units under $destdir are not this host's" >&2
    exit 2
fi
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    echo "hack/install.sh needs root to install into / (or pass --destdir)" >&2
    exit 1
fi

if [ -z "$bin_dir" ]; then
    need_build_tools
    cargo build --release --locked -p nexus-apiserver -p nexus-controller -p nexus-nodeagent -p nexusctl
    bin_dir=${CARGO_TARGET_DIR:-target}/release
fi

root=${destdir%/}
bindir=$root$prefix/bin
units=$root/etc/systemd/system
etc=$root/etc/nexus
state=$root/var/lib/nexus

install -d -m 0755 "$bindir" "$units" "$etc" "$root$prefix/share/doc/nexus"
for b in nexus-apiserver nexus-controller nexus-nodeagent nexusctl; do
    install -m 0755 "$bin_dir/$b" "$bindir/$b"
done
install -m 0644 docs/runbook.md docs/quickstart.md docs/security.md "$root$prefix/share/doc/nexus/"
# The agent's directories belong to root; the apiserver's and controller's
# state is made by systemd for their dynamic users (StateDirectory=).
install -d -m 0755 "$state" "$state/images"
install -d -m 0700 "$state/agent" "$state/run"

# Settings an operator changes without editing the units.
[ -e "$etc/nodeagent.env" ] || cat > "$etc/nodeagent.env" <<EOF
# Read by nexus-nodeagent.service. See nexus-nodeagent --help.
NEXUS_FIRECRACKER=$firecracker
NEXUS_VMM_UIDS=1000000-1065535
EOF
[ -e "$etc/apiserver.env" ] || cat > "$etc/apiserver.env" <<'EOF'
# Read by nexus-apiserver.service. See nexus-apiserver --help.
NEXUS_LISTEN=127.0.0.1:7443
EOF

# Hardening shared by the two services that need no privileges at all.
unprivileged='DynamicUser=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
UMask=0077'

cat > "$units/nexus-apiserver.service" <<EOF
[Unit]
Description=nexus apiserver
Documentation=file:$prefix/share/doc/nexus/runbook.md
After=network-online.target
Wants=network-online.target

[Service]
EnvironmentFile=-/etc/nexus/apiserver.env
StateDirectory=nexus/apiserver
StateDirectoryMode=0700
ExecStartPre=$prefix/bin/nexus-apiserver --data-dir /var/lib/nexus/apiserver init-pki
ExecStart=$prefix/bin/nexus-apiserver --data-dir /var/lib/nexus/apiserver
Restart=on-failure
RestartSec=2s
$unprivileged

[Install]
WantedBy=multi-user.target
EOF

cat > "$units/nexus-controller.service" <<EOF
[Unit]
Description=nexus controller
Documentation=file:$prefix/share/doc/nexus/runbook.md
After=nexus-apiserver.service
Wants=nexus-apiserver.service

[Service]
LoadCredential=token:/etc/nexus/controller.token
ExecStart=$prefix/bin/nexus-controller --apiserver https://127.0.0.1:7443 --ca-file /etc/nexus/ca.crt --token-file %d/token
Restart=always
RestartSec=2s
$unprivileged

[Install]
WantedBy=multi-user.target
EOF

# The agent needs root (bridges, TAPs, jails, cgroups), so it gets the
# hardening that leaves those: a read-only /usr, /boot and /etc, no home
# directories, no privilege gain. KillMode=process: VMMs outlive a restart
# of the agent, which adopts them again.
cat > "$units/nexus-nodeagent.service" <<EOF
[Unit]
Description=nexus node agent
Documentation=file:$prefix/share/doc/nexus/runbook.md
After=network-online.target nexus-apiserver.service
Wants=network-online.target

[Service]
EnvironmentFile=-/etc/nexus/nodeagent.env
ExecStart=$prefix/bin/nexus-nodeagent --apiserver https://127.0.0.1:7443 --ca-file /etc/nexus/ca.crt --state-dir /var/lib/nexus/agent --join-token-file /etc/nexus/join.token --run-dir /var/lib/nexus/run --image-root /var/lib/nexus/images
Restart=always
RestartSec=2s
KillMode=process
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=yes
PrivateTmp=yes
LimitNOFILE=1048576
TasksMax=infinity

[Install]
WantedBy=multi-user.target
EOF
chmod 0644 "$units"/nexus-*.service
echo "installed under ${root:-/}: $bindir/{nexus-apiserver,nexus-controller,nexus-nodeagent,nexusctl}, $units/nexus-*.service"

[ -n "$destdir" ] && exit 0

echo "== host check"
checked=0
"$bindir/nexus-nodeagent" check --firecracker "$firecracker" --run-dir /var/lib/nexus/run || checked=$?
[ "$start" -eq 1 ] || { echo "start with: bash hack/install.sh --start"; exit "$checked"; }
[ "$checked" -eq 0 ] || { echo "fix the problems above, then run this again" >&2; exit 1; }

systemctl daemon-reload
systemctl enable --now nexus-apiserver.service
pki=/var/lib/nexus/apiserver/pki
for _ in $(seq 100); do [ -s /var/lib/nexus/apiserver/admin.token ] && break; sleep 0.2; done
install -m 0644 "$pki/ca.crt" /etc/nexus/ca.crt
if [ ! -s /var/lib/nexus/agent/agent.crt ]; then
    "$bindir/nexus-apiserver" issue-cert --dir "$pki" --name agent --san 127.0.0.1 >/dev/null
    install -m 0600 "$pki/agent.crt" "$pki/agent.key" /var/lib/nexus/agent/
fi
ctl() { "$bindir/nexusctl" --server https://127.0.0.1:7443 "$@"; }
"$bindir/nexusctl" config set-context local --server https://127.0.0.1:7443 --certificate-authority /etc/nexus/ca.crt \
    --token "$(cat /var/lib/nexus/apiserver/admin.token)" --project default >/dev/null
"$bindir/nexusctl" config use-context local >/dev/null
if [ ! -s /etc/nexus/controller.token ]; then
    (umask 077; ctl token create --subject system:controller --description controller -o token > /etc/nexus/controller.token)
fi
(umask 077; ctl token create --subject system:join --ttl 15m --description "hack/install.sh" -o token > /etc/nexus/join.token)
systemctl enable --now nexus-controller.service nexus-nodeagent.service
echo "nexus runs: systemctl status 'nexus-*'; nexusctl get nodes"
