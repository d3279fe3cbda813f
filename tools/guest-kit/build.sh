#!/bin/bash
# Build the xsm-driver guest kit: a tiny bootable guest made on this machine
# from Debian packages (nothing binary is committed).
#
#   tools/guest-kit/build.sh [OUT]      (default: $XSM_GUEST_KIT or
#                                        <repository top>/.guest-kit)
#
# OUT/vmlinuz           the kernel of linux-image-cloud-amd64
# OUT/initramfs.cpio.gz busybox-static, the virtio modules (decompressed),
#                       /init (tools/guest-kit/init) and the in-guest
#                       verifier (tools/guest-kit/xsm-verifier.c, gcc -static)
# OUT/kit.env           what was built from what (KERNEL_VERSION, STAMP, ...)
#
# The kit is rebuilt only when this folder's files or the kernel change.
# Missing packages are installed with apt-get when running as root (set
# XSM_GUEST_KIT_NO_INSTALL=1 to fail instead).
set -eu
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOP="$(cd "$HERE/../.." && pwd)"
OUT="${1:-${XSM_GUEST_KIT:-$TOP/.guest-kit}}"
# virtio_blk and what it needs, in load order; then the ACPI power button
# and evdev, so that the verifier hears system_powerdown.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
virtio_pci virtio_blk button evdev"

say() { echo "guest-kit: $*" >&2; }

kernel_version() {
    local k
    k=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1)
    [ -n "$k" ] && basename "$k" | sed 's/^vmlinuz-//'
}

need_install=""
[ -n "$(kernel_version || true)" ] || need_install="$need_install linux-image-cloud-amd64"
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 ||
    need_install="$need_install busybox-static"
command -v gcc >/dev/null || need_install="$need_install gcc"
[ -f "/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)/libc.a" ] ||
    need_install="$need_install libc6-dev"
if [ -n "$need_install" ]; then
    if [ "$(id -u)" != 0 ] || [ -n "${XSM_GUEST_KIT_NO_INSTALL:-}" ]; then
        say "missing Debian packages:$need_install (apt-get install -y$need_install)"
        exit 1
    fi
    say "installing$need_install"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends $need_install >/dev/null
fi

KVER=$(kernel_version)
MODDIR=/lib/modules/$KVER/kernel/drivers
STAMP=$( (cat "$HERE/build.sh" "$HERE/init" "$HERE/xsm-verifier.c";
          echo "$KVER"; ls -l --time-style=+%s "/boot/vmlinuz-$KVER") |
        sha256sum | cut -c1-16)
if [ -f "$OUT/kit.env" ] && grep -qx "STAMP=$STAMP" "$OUT/kit.env" &&
        [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
    say "up to date in $OUT ($STAMP)"
    exit 0
fi

start=$(date +%s.%N)
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT/bin" "$ROOT/lib/modules" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"

gcc -static -O2 -Wall -o "$ROOT/bin/xsm-verifier" "$HERE/xsm-verifier.c"
strip "$ROOT/bin/xsm-verifier" 2>/dev/null || true
cp /bin/busybox "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
install -m 0755 "$HERE/init" "$ROOT/init"

: > "$ROOT/lib/modules/order"
for m in $MODULES; do
    src=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" \
          -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
    if [ -z "$src" ]; then
        # built into this kernel, or not present: nothing to load
        say "module $m: not a module of $KVER, skipped"
        continue
    fi
    # busybox insmod may not decompress: do it here
    case "$src" in
        *.xz) xz -dc "$src" > "$ROOT/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$src" > "$ROOT/lib/modules/$m.ko" ;;
        *.gz) gzip -dc "$src" > "$ROOT/lib/modules/$m.ko" ;;
        *) cp "$src" "$ROOT/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$ROOT/lib/modules/order"
done

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
    /bin/busybox cpio -o -H newc -0 2>/dev/null) | gzip -1 > "$WORK/initramfs.cpio.gz"
cp "/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cat > "$WORK/kit.env" <<ENV
KERNEL_VERSION=$KVER
MODULES="$(tr '\n' ' ' < "$ROOT/lib/modules/order" | sed 's/ $//')"
STAMP=$STAMP
ENV
mv -f "$WORK/vmlinuz" "$WORK/initramfs.cpio.gz" "$OUT/"
mv -f "$WORK/kit.env" "$OUT/kit.env"    # last: marks the kit complete
say "built in $OUT in $(echo "$(date +%s.%N) - $start" | bc 2>/dev/null ||
    echo '?') s (kernel $KVER, $STAMP)"
