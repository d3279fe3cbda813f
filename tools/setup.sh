# Shared setup of tools/run-tests.sh and tools/demo.sh; source it, don't run it.
# Installs the Debian packages the tests and the demo use, creates .venv at
# the repository top when missing and installs the project into it.
# Afterwards: TOP is the repository top (also the cwd) and PATH starts with
# $TOP/.venv/bin.

set -eu
TOP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$TOP"

DEBS="qemu-utils libnbd-bin nbdkit iproute2 tshark"

_sudo() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

echo "==> Debian packages: $DEBS"
export DEBIAN_FRONTEND=noninteractive
_sudo apt-get update -qq
python3 -c 'import ensurepip, venv' 2>/dev/null || DEBS="$DEBS python3-venv"
_sudo apt-get install -y -qq --no-install-recommends $DEBS >/dev/null

if [ ! -x .venv/bin/python ]; then
    echo "==> creating $TOP/.venv"
    python3 -m venv .venv
fi
echo "==> pip install -r requirements.txt -r test-requirements.txt -e ."
.venv/bin/pip install -q -r requirements.txt -r test-requirements.txt -e .
export PATH="$TOP/.venv/bin:$PATH"
