#!/usr/bin/env bash
# Builds a small guest that boots on Firecracker, from Debian packages:
#
#   vmlinux      Debian's kernel (linux-image-amd64), uncompressed to the ELF
#                Firecracker boots
#   initrd.img   busybox and the kernel's virtio and ext4 modules, which
#                Debian builds as modules: it loads them (with the
#                virtio_mmio.device= arguments Firecracker adds to the
#                command line) and switches to the root filesystem
#   rootfs.ext4  busybox, with an /sbin/init that brings eth0 up from the
#                ip= argument nexus writes on the kernel command line, reads
#                the VM's metadata (hostname, SSH keys, user data, run once)
#                from the metadata service and gives a shell on the serial
#                console
#
#   bash hack/guest.sh [--out DIR]     (default /var/lib/nexus/images/debian)
#
# Then: nexusctl image import debian-kernel --type Kernel --from DIR/vmlinux
# (and the same for initrd.img as --type Initrd, rootfs.ext4 as Rootfs), and
# a VM with kernel, initrd and rootfs naming those Images. Booting needs
# /dev/kvm: see docs/guests.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh

out=/var/lib/nexus/images/debian
while [ $# -gt 0 ]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
need_packages xz:xz-utils cpio:cpio mkfs.ext4:e2fsprogs modinfo:kmod
work=$(mktemp -d /var/tmp/nexus-guest-XXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
cd "$work"

kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$kernel_pkg" ] || { echo "no linux-image-amd64 in the apt sources: run apt-get update" >&2; exit 1; }
echo "== downloading $kernel_pkg and busybox-static"
apt-get download -q -o APT::Sandbox::User=root "$kernel_pkg" busybox-static >/dev/null
dpkg-deb -x "$kernel_pkg"_*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
kver=$(ls kernel/lib/modules)
busybox_bin=busybox/bin/busybox

echo "== vmlinux from vmlinuz-$kver"
# vmlinuz is a boot stub followed by the compressed kernel: find the
# stream by its magic and uncompress just that stream.
vmlinuz=kernel/boot/vmlinuz-$kver
extract() { # magic, command
    local off
    for off in $(LC_ALL=C grep -obUaP "$1" "$vmlinuz" | cut -d: -f1); do
        tail -c +$((off + 1)) "$vmlinuz" | $2 > vmlinux 2>/dev/null || true
        [ "$(head -c 4 vmlinux | od -An -c | tr -d ' ')" = '177ELF' ] && return 0
    done
    return 1
}
extract '\xfd7zXZ\x00' "xz -dc --single-stream" || extract '\x28\xb5\x2f\xfd' "zstd -dc" \
    || extract '\x1f\x8b\x08' "gzip -dc" || { echo "no kernel ELF found in $vmlinuz" >&2; exit 1; }

echo "== initrd.img"
mods=kernel/lib/modules/$kver
mkdir -p initrd/bin initrd/dev initrd/proc initrd/sys initrd/newroot initrd/lib/modules
cp "$busybox_bin" initrd/bin/busybox
# The modules a root on virtio-blk and a virtio NIC need, each after what
# it depends on (modinfo's "depends"); ones built in are simply absent.
order=()
add_module() {
    local name=$1 file dep
    for m in "${order[@]}"; do [ "$m" = "$name" ] && return 0; done
    file=$(find "$mods" -name "$name.ko*" | head -1)
    [ -n "$file" ] || return 0
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do add_module "$dep"; done
    cp "$file" initrd/lib/modules/
    order+=("$name")
}
for m in virtio virtio_ring virtio_mmio virtio_blk virtio_net crc32c_generic crc16 ext4; do add_module "$m"; done
printf '%s\n' "${order[@]}" > initrd/modules
cat > initrd/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Module arguments on the command line (virtio_mmio.device=...) are the
# module loader's to pass on: with no modprobe here, this does it.
for m in $(cat /modules); do
    args=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$m\.//p" | tr '\n' ' ')
    insmod /lib/modules/$m.ko* $args
done
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; exec sh; }
umount /proc /sys
exec switch_root /newroot /sbin/init
EOF
chmod 0755 initrd/init
(cd initrd && find . | cpio -o -H newc --quiet | gzip -9) > initrd.img

echo "== rootfs.ext4"
mkdir -p rootfs/bin rootfs/sbin rootfs/dev rootfs/proc rootfs/sys rootfs/etc rootfs/tmp rootfs/root rootfs/var/lib
cp "$busybox_bin" rootfs/bin/busybox
echo nexus-guest > rootfs/etc/hostname
cat > rootfs/sbin/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
hostname -F /etc/hostname
ip link set lo up
# ip=<address>::<gateway>:<netmask>::eth0:off, as nexus writes it.
for arg in $(cat /proc/cmdline); do
    case $arg in
        ip=*)
            spec=${arg#ip=}
            addr=$(echo "$spec" | cut -d: -f1)
            gw=$(echo "$spec" | cut -d: -f3)
            mask=$(echo "$spec" | cut -d: -f4)
            dev=$(echo "$spec" | cut -d: -f6)
            eval "$(ipcalc -p "$addr" "$mask")"
            ip link set "${dev:-eth0}" up
            ip addr add "$addr/$PREFIX" dev "${dev:-eth0}"
            [ -n "$gw" ] && ip route add default via "$gw"
            echo "nexus-guest: ${dev:-eth0} $addr/$PREFIX via $gw"
            ;;
    esac
done
# The metadata service (Firecracker's MMDS, version 2) at 169.254.169.254
# on eth0: a session token first (PUT), then each value with it (GET).
mmds=169.254.169.254
ip link set eth0 up
ip -4 addr show dev eth0 | grep -q inet || ip addr add 169.254.0.2/16 dev eth0
ip route add $mmds/32 dev eth0 2>/dev/null
token=$(printf 'PUT /latest/api/token HTTP/1.1\r\nHost: %s\r\nX-metadata-token-ttl-seconds: 300\r\n\r\n' $mmds \
    | nc -w 2 $mmds 80 | tr -d '\r' | sed '1,/^$/d')
mmds_get() { wget -q -T 2 -O - --header "X-metadata-token: $token" "http://$mmds/$1" 2>/dev/null; }
if [ -n "$token" ]; then
    name=$(mmds_get latest/meta-data/local-hostname)
    if [ -n "$name" ]; then
        hostname "$name" && echo "$name" > /etc/hostname
        echo "nexus-guest: hostname $name (from the metadata service)"
    fi
    mkdir -p /root/.ssh && chmod 0700 /root/.ssh
    : > /root/.ssh/authorized_keys
    i=0
    while key=$(mmds_get "latest/meta-data/public-keys/$i/openssh-key") && [ -n "$key" ]; do
        echo "$key" >> /root/.ssh/authorized_keys
        i=$((i + 1))
    done
    chmod 0600 /root/.ssh/authorized_keys
    echo "nexus-guest: $i SSH keys in /root/.ssh/authorized_keys"
    # The user data runs once in the disk's life (the disk is the VM's own).
    mmds_get latest/user-data > /tmp/user-data
    if [ -s /tmp/user-data ] && [ ! -e /var/lib/nexus-guest/user-data.done ]; then
        mkdir -p /var/lib/nexus-guest
        if head -1 /tmp/user-data | grep -q '^#!'; then
            echo "nexus-guest: running the user data ($(wc -c < /tmp/user-data) bytes)"
            sh /tmp/user-data 2>&1 | sed 's/^/user-data: /'
            echo "nexus-guest: the user data finished"
        else
            echo "nexus-guest: the user data is not a script (#!); left in /var/lib/nexus-guest/user-data"
        fi
        cp /tmp/user-data /var/lib/nexus-guest/user-data
        : > /var/lib/nexus-guest/user-data.done
    fi
else
    echo "nexus-guest: no metadata service answered at $mmds"
fi
echo "nexus-guest login: ready"
exec setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
EOF
chmod 0755 rootfs/sbin/init
mkfs.ext4 -q -F -L rootfs -d rootfs rootfs.ext4 64M

mkdir -p "$out"
install -m 0644 vmlinux initrd.img rootfs.ext4 "$out/"
echo "guest in $out: vmlinux ($kver), initrd.img (modules: ${order[*]}), rootfs.ext4"
ls -l "$out"
