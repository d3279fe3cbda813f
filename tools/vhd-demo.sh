#!/bin/bash
# Set everything up (tools/setup.sh) and run an xsm-vhd session: create a
# dynamic VHD, write to it, snapshot it into a child, write to the child,
# check, inspect, export, compare with qemu-img, coalesce.  Every result is
# checked against a plain bytearray model of the disk; exits non-zero on any
# mismatch.

source "$(dirname "$0")/setup.sh"

WORK="$(mktemp -d /tmp/xsm-demo.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
WRITES=()   # "offset:file" pairs, in order, for the model

step() { printf '\n==> %s\n' "$*"; }
run() { echo "\$ $*"; "$@"; }

# pattern NAME SIZE SEED: a file of SIZE bytes that no other pattern repeats.
pattern() {
    python3 -c 'import sys; n, s = int(sys.argv[2]), int(sys.argv[3]);
open(sys.argv[1], "wb").write(bytes((i * 31 + s + i // 509) % 256
                                    for i in range(n)))' "$@"
}

vwrite() {  # vwrite IMAGE OFFSET FILE
    run xsm-vhd write "$1" --offset "$2" --input "$3"
    WRITES+=("$2:$3")
}

# model SIZE: sha256 of a zeroed disk of SIZE bytes with WRITES applied;
# also leaves the model in model.raw.
model() {
    python3 - "$1" "${WRITES[@]}" <<'PY'
import hashlib, sys
disk = bytearray(int(sys.argv[1]))
for w in sys.argv[2:]:
    off, path = w.split(':', 1)
    data = open(path, 'rb').read()
    disk[int(off):int(off) + len(data)] = data
open('model.raw', 'wb').write(disk)
print(hashlib.sha256(disk).hexdigest())
PY
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

expect_same() {  # expect_same WHAT GOT WANT
    if [ "$2" = "$3" ]; then
        echo "OK   $1: sha256 $2"
    else
        echo "FAIL $1: sha256 $2, the model says $3" >&2
        exit 1
    fi
}

step "create a 64M dynamic image"
run xsm-vhd create base.vhd --size 64M
SIZE="$(xsm-vhd info base.vhd --json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual_size"])')"
echo "virtual size: $SIZE bytes"

step "write 1 MiB at 1.5 MiB (across the first 2 MiB block boundary)"
pattern a.bin 1048576 1
vwrite base.vhd 1572864 a.bin

step "qemu-img reads the base image like we do"
run xsm-vhd export base.vhd base.raw
run qemu-img convert -O raw --image-opts \
    driver=vpc,force_size_calc=current_size,file.filename=base.vhd base-qemu.raw
WANT="$(model "$SIZE")"
expect_same "xsm-vhd export of base.vhd" "$(sha base.raw)" "$WANT"
expect_same "qemu-img convert of base.vhd" "$(sha base-qemu.raw)" "$WANT"

step "snapshot base.vhd into child.vhd"
run xsm-vhd snapshot child.vhd --parent base.vhd

step "write in the child: over the old data, and at the end of the disk"
pattern b.bin 69632 2
vwrite child.vhd 2093056 b.bin
pattern c.bin 4608 3
vwrite child.vhd $((SIZE - 1048576 + 1536)) c.bin

step "check, inspect and map the chain"
run xsm-vhd check child.vhd --chain
run xsm-vhd info child.vhd
run xsm-vhd map child.vhd

step "export the chain to raw and compare with the model"
run xsm-vhd export child.vhd child.raw
WANT="$(model "$SIZE")"
expect_same "xsm-vhd export of child.vhd" "$(sha child.raw)" "$WANT"
run qemu-img compare -f raw -F raw child.raw model.raw

step "coalesce the child into its parent"
run xsm-vhd coalesce child.vhd
run xsm-vhd check base.vhd
run xsm-vhd export base.vhd base2.raw
expect_same "base.vhd after coalesce" "$(sha base2.raw)" "$WANT"

printf '\ndemo OK: every export matches the model\n'
