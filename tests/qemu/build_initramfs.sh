#!/usr/bin/env bash
# build_initramfs.sh OUT.cpio.gz [KERNEL_VERSION]
#
# Builds a small initramfs for Debian's kernel, used by tests/peers.py (QemuGuest):
#   - busybox (static) as the userland,
#   - the virtio-pci, virtio-net, virtio-vsock and bridge modules of KERNEL_VERSION (default: the newest
#     under /lib/modules) with their dependencies, listed in load order in /lib/modules/order
#     (dependencies first: virtio_ring before virtio, ...),
#   - socat and its shared libraries (AF_VSOCK client/server in the guest), if installed,
#   - tests/qemu/init as /init (reads vr.* kernel parameters, prints RESULT lines).
# The output is written to a temporary file and renamed, so a reader never sees a partial file.
set -euo pipefail
out=$1
kver=${2:-$(ls /lib/modules | sort -V | tail -1)}
here=$(cd "$(dirname "$0")" && pwd)
moddir=/lib/modules/$kver
[[ -f $moddir/modules.dep ]] || { echo "no $moddir/modules.dep" >&2; exit 2; }
busybox=$(command -v busybox || true)
[[ -n $busybox ]] || { echo "busybox not found (apt-get install busybox-static)" >&2; exit 2; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,lib/modules,etc,tmp,root}
cp "$busybox" "$root/bin/busybox"

# --- modules, dependencies first (resolved from modules.dep) ---
declare -A done_mod=()
add_module() { # $1 = path relative to $moddir as in modules.dep
    local rel=$1 dep name
    [[ -n ${done_mod[$rel]:-} ]] && return 0
    done_mod[$rel]=1
    for dep in $(awk -v m="$rel:" '$1 == m { for (i = 2; i <= NF; i++) print $i }' "$moddir/modules.dep"); do
        add_module "$dep"
    done
    name=$(basename "$rel"); name=${name%%.ko*}
    case $rel in
    *.ko.xz) xz -dc "$moddir/$rel" >"$root/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -dcq "$moddir/$rel" >"$root/lib/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$moddir/$rel" >"$root/lib/modules/$name.ko" ;;
    *) cp "$moddir/$rel" "$root/lib/modules/$name.ko" ;;
    esac
    echo "$name" >>"$root/lib/modules/order"
}
: >"$root/lib/modules/order"
for m in virtio_pci virtio_net vmw_vsock_virtio_transport bridge; do
    rel=$(awk -F: -v m="$m" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko.*/, "", n); if (n == m) { print $1; exit } }' "$moddir/modules.dep")
    if [[ -z $rel ]]; then
        # built into the kernel: nothing to load
        grep -q "/$m.ko" "$moddir/modules.builtin" 2>/dev/null || echo "warning: module $m not found" >&2
        continue
    fi
    add_module "$rel"
done

# --- socat and its libraries ---
if s=$(command -v socat); then
    mkdir -p "$root/bin"
    cp -L "$s" "$root/bin/socat"
    for l in $(ldd "$s" | grep -o '/[^ ]*'); do
        mkdir -p "$root$(dirname "$l")"
        cp -L "$l" "$root$l"
    done
fi

cp "$here/init" "$root/init"
chmod +x "$root/init"
tmp=$(mktemp "$out.XXXXXX")
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$out"
