#!/bin/bash
# Start, for a person to try, the multi-process Nova deployment that
# tests/nova_deployment runs: placement-api and nova-api under gunicorn,
# nova-conductor, nova-scheduler, two nova-compute (nc-alpha, nc-beta)
# with compute_driver = xsm.XSMDriver and their own xsm-agent processes,
# a minimal image and network service, this machine's MariaDB
# (127.0.0.1:3306, root, empty password) and RabbitMQ (127.0.0.1:5672,
# guest/guest, a virtual host of its own).
#
# NO KEYSTONE: nova-api believes every caller is an administrator
# (tests/nova_deployment/noauth.py). For tests and trials on this machine
# only; never expose its ports.
#
#   tools/nova-deployment.sh start [--root DIR] [--bandwidth-limit MIB/S]
#                                  [--hypervisor model|qemu]
#       starts it (about 2-4 minutes), prints the openstack client's
#       environment, where the logs are and how to stop it; with
#       --hypervisor qemu each server is a QEMU guest (TCG) booting the
#       guest kit (.guest-kit, made by tools/setup.sh), its console in
#       "openstack console log show"
#   tools/nova-deployment.sh stop DIR
#       stops every process of it (the xsm agents and their guests too),
#       drops its databases and RabbitMQ virtual host, removes DIR
#
# Uses .venv-nova, made and completed as tools/run-nova-deployment-tests.sh
# does (XSM_DEPLOYMENT_NO_INSTALL=1 skips that check).

set -eu
TOP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$TOP"
VENV=.venv-nova
REQS="tests/nova_functional/requirements.txt tests/nova_deployment/requirements.txt"
CONSTRAINTS="${XSM_NOVA_CONSTRAINTS:-tests/nova_functional/upper-constraints.txt}"
STAMP=$VENV/.xsm-deployment-installed

case "${1:-}" in
    start|stop) ;;
    *) echo "usage: $0 start [--root DIR] [--bandwidth-limit MIB/S] | stop DIR" >&2
       exit 2 ;;
esac

if [ "$1" = start ] && [ "${XSM_DEPLOYMENT_NO_INSTALL:-0}" != 1 ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # shellcheck disable=SC2086
    want="$(cat $REQS "$CONSTRAINTS" setup.cfg | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
        echo "==> pip install -c $CONSTRAINTS -r ${REQS// / -r } -e . (into $VENV)"
        # shellcheck disable=SC2046
        "$VENV/bin/pip" install -q -c "$CONSTRAINTS" \
            $(printf -- '-r %s ' $REQS) -e .
        echo "$want" > "$STAMP"
    fi
    "$VENV/bin/xsm-nova-shim" install >/dev/null
fi
exec "$VENV/bin/python" -m tests.nova_deployment.deployment "$@"
