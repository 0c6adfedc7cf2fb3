#!/usr/bin/env bash
# Puts placeholder images where examples/vm.yaml expects them, unless images
# are already there. The simulated VMM only opens them; a real Firecracker
# needs a real kernel and root filesystem at these paths.
set -euo pipefail
dir=${NEXUS_IMAGE_DIR:-/var/lib/nexus/images}
mkdir -p "$dir"
if [ ! -e "$dir/vmlinux" ]; then
    head -c 4096 /dev/zero | tr '\0' '\177' > "$dir/vmlinux"
    echo "created placeholder kernel $dir/vmlinux"
fi
if [ ! -e "$dir/rootfs.ext4" ]; then
    truncate -s 256M "$dir/rootfs.ext4"
    echo "created placeholder rootfs $dir/rootfs.ext4 (sparse)"
fi
