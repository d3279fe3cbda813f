#!/bin/bash
# Run tests/nova_functional: the Nova compute driver in Nova's
# own functional harness (nova 34's API, conductor, scheduler, placement and
# two nova-compute services using compute_driver = xsm.XSMDriver, in one
# process).
#
# Creates .venv-nova at the repository top when missing and (re)installs
# nova, its test requirements and this project into it, pinned by
# tests/nova_functional/upper-constraints.txt, when that file,
# tests/nova_functional/requirements.txt or setup.cfg changed;
# installs the nova/virt/xsm shim (xsm-nova-shim install). Then two stestr
# runs, with their own configuration and repository:
#
#   1. native threads (OS_NOVA_DISABLE_EVENTLET_PATCHING=True, nova 34's
#      default): every test but the eventlet one; extra arguments are
#      passed to this "stestr run" as a test filter;
#   2. eventlet (patching enabled): the live-migration test again, with
#      the agents inside nova-compute and as child processes (they meet on
#      RabbitMQ at 127.0.0.1:5672); XSM_NOVA_SKIP_EVENTLET=1 leaves it out.
#
# The last line is "N passed, N failed, N skipped" over both runs; the exit
# status is non-zero if a test failed or none ran.

set -eu
TOP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$TOP"

VENV=.venv-nova
REQS=tests/nova_functional/requirements.txt
# nova 34's stack at the versions this suite was last green with (its own
# file: nova's requirements are not ours); tools/refresh-constraints.sh
# renews it.
CONSTRAINTS="${XSM_NOVA_CONSTRAINTS:-tests/nova_functional/upper-constraints.txt}"
CONF=tests/nova_functional/.stestr.conf
REPO=$VENV/stestr
STAMP=$VENV/.xsm-installed

if [ ! -x "$VENV/bin/python" ]; then
    python3 -c 'import ensurepip, venv' 2>/dev/null || {
        echo "==> apt-get install python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    }
    echo "==> creating $TOP/$VENV"
    python3 -m venv "$VENV"
fi
want="$(cat "$REQS" "$CONSTRAINTS" setup.cfg | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "==> pip install -c $CONSTRAINTS -r $REQS -e . (into $VENV)"
    "$VENV/bin/pip" install -q -c "$CONSTRAINTS" -r "$REQS" -e .
    echo "$want" > "$STAMP"
fi
"$VENV/bin/xsm-nova-shim" install

export PATH="$TOP/$VENV/bin:$PATH"
export XSM_NOVA_TESTS=1
[ -d "$REPO/.stestr" ] || { mkdir -p "$REPO" && stestr -c "$CONF" -u "$REPO" init >/dev/null; }
next_id() { cat "$REPO/.stestr/next-stream" 2>/dev/null || echo 0; }
streams=$(mktemp -d)
trap 'rm -rf "$streams"' EXIT

set +e
status=0
run() {    # run NAME COMMAND...: one stestr run, its stream kept as NAME
    local name=$1 before rc
    shift
    before="$(next_id)"
    "$@"
    rc=$?
    if [ "$(next_id)" != "$before" ]; then
        stestr -c "$CONF" -u "$REPO" last --subunit > "$streams/$name"
    else
        printf '\nstestr recorded no run (exit status %s)\n' "$rc" >&2
        status=1
    fi
    [ "$rc" = 0 ] || status=1
}

echo "==> native threads: stestr run $*"
run native env OS_NOVA_DISABLE_EVENTLET_PATCHING=True \
    stestr -c "$CONF" -u "$REPO" run --concurrency 2 \
    --exclude-regex Eventlet "$@"
if [ "${XSM_NOVA_SKIP_EVENTLET:-0}" != 1 ]; then
    echo "==> eventlet: stestr run TestLiveMigrationEventlet"
    run eventlet env -u OS_NOVA_DISABLE_EVENTLET_PATCHING \
        stestr -c "$CONF" -u "$REPO" run --concurrency 1 \
        TestLiveMigrationEventlet
fi

cat "$streams"/* 2>/dev/null | python tools/subunit_summary.py
summary_rc=$?
[ "$status" = 0 ] && [ "$summary_rc" = 0 ]
