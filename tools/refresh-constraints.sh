#!/bin/bash
# Renew the pins and re-run the whole suite with them, in one command:
#
#   bash tools/refresh-constraints.sh
#
# upper-constraints.txt pins every direct and transitive dependency of the
# project and its tests (what tools/setup.sh, tox and the demo install);
# tests/nova_functional/upper-constraints.txt pins nova 34's stack for
# tools/run-nova-tests.sh.  Both are made anew from what the resolver picks
# today for requirements.txt + test-requirements.txt (+ the benchmarks'
# plotting, benchmarks/requirements.txt) and for
# tests/nova_functional/requirements.txt, each in a new, empty venv with
# pip's cache off; then tools/run-tests.sh runs every test with them.  On a
# green run the new files stay (commit them); on a red one the old pins come
# back, the new ones are left beside them as *.rejected, and the exit
# status is non-zero.  The requirements files keep lower bounds only.

set -eu
TOP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$TOP"

MAIN=upper-constraints.txt
NOVA=tests/nova_functional/upper-constraints.txt
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_NO_CACHE_DIR=1

freeze() {      # freeze NAME OUTPUT PIP-ARGS...: resolve, install, pin
    local name=$1 out=$2
    shift 2
    echo "==> resolving $* in a new venv"
    python3 -m venv "$work/$name"
    "$work/$name/bin/pip" install -q "$@" -e .
    {
        echo "# Made by tools/refresh-constraints.sh on $(date -u +%F)" \
             "with $("$work/$name/bin/python" -V);"
        echo "# the whole suite passed with these versions. Do not edit" \
             "by hand."
        "$work/$name/bin/pip" freeze --exclude-editable | LC_ALL=C sort -f
    } > "$out.new"
}

freeze main "$MAIN" -r requirements.txt -r test-requirements.txt \
    -r benchmarks/requirements.txt
freeze nova "$NOVA" -r tests/nova_functional/requirements.txt

for f in "$MAIN" "$NOVA"; do
    cp "$f" "$f.old"
    mv "$f.new" "$f"
    echo "==> $f:"
    diff -u "$f.old" "$f" | grep '^[-+][^-+#]' || echo "    unchanged"
done

echo "==> the whole suite with the new pins (tools/run-tests.sh)"
if bash tools/run-tests.sh; then
    rm -f "$MAIN.old" "$NOVA.old"
    echo "==> green: the new pins stay; commit $MAIN and $NOVA"
else
    for f in "$MAIN" "$NOVA"; do
        mv "$f" "$f.rejected"
        mv "$f.old" "$f"
    done
    echo "==> red: the old pins are back (.venv reinstalled with them);" \
         "the new ones are in *.rejected" >&2
    bash -c "source tools/setup.sh" >/dev/null
    exit 1
fi
