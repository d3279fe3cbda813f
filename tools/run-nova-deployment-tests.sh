#!/bin/bash
# Run tests/nova_deployment: a multi-process Nova deployment on this
# machine (placement-api and nova-api under gunicorn, nova-conductor,
# nova-scheduler, two nova-compute with compute_driver = xsm.XSMDriver and
# their xsm-agent processes, MariaDB, RabbitMQ on a virtual host of its
# own), driven with python-openstackclient. Needs MariaDB at
# 127.0.0.1:3306 (root, empty password) and RabbitMQ at 127.0.0.1:5672
# (guest/guest, rabbitmqctl); in CI (CI=true) their absence fails the
# group.
#
# Uses .venv-nova (made by tools/run-nova-tests.sh, or here when missing)
# and installs tests/nova_deployment/requirements.txt into it, pinned by
# tests/nova_functional/upper-constraints.txt, when a requirements file,
# the constraints or setup.cfg changed. Extra arguments are passed to
# "stestr run" as a test filter. The last line is "N passed, N failed,
# N skipped"; the exit status is non-zero if a test failed or none ran.

set -eu
TOP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$TOP"

VENV=.venv-nova
REQS="tests/nova_functional/requirements.txt tests/nova_deployment/requirements.txt"
CONSTRAINTS="${XSM_NOVA_CONSTRAINTS:-tests/nova_functional/upper-constraints.txt}"
CONF=tests/nova_deployment/.stestr.conf
REPO=$VENV/stestr-deployment
STAMP=$VENV/.xsm-deployment-installed

if [ ! -x "$VENV/bin/python" ]; then
    python3 -c 'import ensurepip, venv' 2>/dev/null || {
        echo "==> apt-get install python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    }
    echo "==> creating $TOP/$VENV"
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC2086
want="$(cat $REQS "$CONSTRAINTS" setup.cfg | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "==> pip install -c $CONSTRAINTS -r ${REQS// / -r } -e . (into $VENV)"
    # shellcheck disable=SC2046
    "$VENV/bin/pip" install -q -c "$CONSTRAINTS" \
        $(printf -- '-r %s ' $REQS) -e .
    echo "$want" > "$STAMP"
fi
"$VENV/bin/xsm-nova-shim" install

# MariaDB: this kind of machine starts it before a session; start it again
# if it stopped (RabbitMQ: tools/setup.sh)
if ! (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null && [ -x /usr/sbin/mariadbd ]; then
    echo "==> starting MariaDB"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    for _ in $(seq 60); do
        (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null && break
        sleep 1
    done
fi

export PATH="$TOP/$VENV/bin:$PATH"
export XSM_NOVA_DEPLOYMENT=1      # (tests/nova_deployment/__init__.py)
[ -d "$REPO/.stestr" ] || { mkdir -p "$REPO" && stestr -c "$CONF" -u "$REPO" init >/dev/null; }
next_id() { cat "$REPO/.stestr/next-stream" 2>/dev/null || echo 0; }
before="$(next_id)"

set +e
echo "==> nova deployment: stestr run $*"
start=$(date +%s)
stestr -c "$CONF" -u "$REPO" run --concurrency 1 "$@"
rc=$?
echo "nova deployment group: $(( $(date +%s) - start )) s"
if [ "$(next_id)" = "$before" ]; then
    printf '\nstestr recorded no run (exit status %s)\n' "$rc" >&2
    echo "0 passed, 1 failed, 0 skipped"
    exit 1
fi
stestr -c "$CONF" -u "$REPO" last --subunit | python tools/subunit_summary.py
summary_rc=$?
[ "$rc" = 0 ] && [ "$summary_rc" = 0 ]
