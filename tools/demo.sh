#!/bin/bash
# Set everything up (tools/setup.sh: packages, RabbitMQ, .venv, and the guest
# kit in .guest-kit) and run the main job: xsm-migrate demo, a live migration
# of a running VM -- by default a real QEMU guest (TCG unless KVM works here)
# with two disks, its in-guest verifier writing the whole time -- between
# two hosts on this machine, then the guest's own check of every block it
# wrote, on the destination.  Needs no broker.  Arguments go to
# "xsm-migrate demo" (--guest qemu|model, --guest-kit DIR, --size, --disks,
# --write-rate, --workdir DIR, --json); exits non-zero when anything does
# not verify.

source "$(dirname "$0")/setup.sh"
exec xsm-migrate demo "$@"
