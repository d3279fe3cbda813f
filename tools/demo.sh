#!/bin/bash
# Set everything up (tools/setup.sh) and run the main job: xsm-migrate demo,
# a live migration of a VM with two disks between two hosts on this machine
# while its guest writes and verifies, then a bit-for-bit verification of
# the destination.  Needs no broker.  Arguments go to "xsm-migrate demo"
# (--size, --disks, --write-rate, --workdir DIR, --json); exits non-zero
# when anything does not verify.

source "$(dirname "$0")/setup.sh"
exec xsm-migrate demo "$@"
