# Shared setup of tools/run-tests.sh and tools/demo.sh; source it, don't run it.
# Installs the Debian packages the tests and the demo use, makes sure the
# RabbitMQ broker the agents talk through answers at 127.0.0.1:5672 (installs
# and starts rabbitmq-server when nothing listens there, and waits for a
# broker that is still starting), creates .venv at the repository top when
# missing and installs the project into it.
# Afterwards: TOP is the repository top (also the cwd) and PATH starts with
# $TOP/.venv/bin.

set -eu
TOP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$TOP"

DEBS="qemu-utils libnbd-bin nbdkit iproute2 tshark qemu-system-x86 linux-image-cloud-amd64 busybox-static gcc libc6-dev"

_sudo() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

echo "==> Debian packages: $DEBS"
export DEBIAN_FRONTEND=noninteractive
_sudo apt-get update -qq
python3 -c 'import ensurepip, venv' 2>/dev/null || DEBS="$DEBS python3-venv"
_sudo apt-get install -y -qq --no-install-recommends $DEBS >/dev/null

# The broker: the agents and the control-plane tests need a real one.
_broker_up() {
    python3 -c 'import socket; socket.create_connection(("127.0.0.1", 5672), 2).close()' \
        2>/dev/null
}
if ! _broker_up; then
    echo "==> RabbitMQ does not answer at 127.0.0.1:5672: starting it"
    command -v rabbitmq-server >/dev/null ||
        _sudo apt-get install -y -qq rabbitmq-server >/dev/null
    _sudo service rabbitmq-server start >/dev/null 2>&1 ||
        _sudo rabbitmq-server -detached >/dev/null 2>&1 || true
fi
# A broker that is still booting accepts connections before it accepts
# logins: wait for both (at most 3 minutes).
for _ in $(seq 180); do
    _broker_up && { ! command -v rabbitmqctl >/dev/null ||
        _sudo timeout 15 rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; } && break
    sleep 1
done
_broker_up || echo "WARNING: RabbitMQ still does not answer at" \
    "127.0.0.1:5672; the tests that need it will fail" >&2

if [ ! -x .venv/bin/python ]; then
    echo "==> creating $TOP/.venv"
    python3 -m venv .venv
fi
# Every dependency at the version the suite was last green with
# (upper-constraints.txt; tools/refresh-constraints.sh renews it).
CONSTRAINTS="${XSM_CONSTRAINTS:-$TOP/upper-constraints.txt}"
echo "==> pip install -c $(basename "$CONSTRAINTS") -r requirements.txt" \
    "-r test-requirements.txt -e ."
.venv/bin/pip install -q -c "$CONSTRAINTS" -r requirements.txt \
    -r test-requirements.txt -e .
export PATH="$TOP/.venv/bin:$PATH"
"$TOP/tools/guest-kit/build.sh" || echo "WARNING: the guest kit (tools/guest-kit/build.sh) did not build; the real-guest tests will fail" >&2
