#!/bin/bash
# Coverage-guided fuzzing with atheris (libFuzzer).
#
#   tools/fuzz.sh TARGET [SECONDS] [libFuzzer options...]
#   tools/fuzz.sh all [SECONDS]        (each target in turn)
#
# TARGET is one of nbd_protocol, nbd_server, vhd, rpc (modules of
# tests/fuzz). The seed corpus in tests/fuzz/corpus/TARGET is read, never
# written: new inputs go to $XSM_FUZZ_WORK/TARGET/
# corpus (default /tmp/xsm-fuzz) and crashes to its crashes/ folder. Keep a
# crash, once fixed, as a regression: copy it into the seed corpus. The
# bounded runs of the same targets are the test_* modules beside them, in
# the default test suite.
set -eu
cd "$(dirname "$0")/.."
target="${1:?usage: tools/fuzz.sh TARGET|all [SECONDS] [libFuzzer options]}"
seconds="${2:-60}"
shift $(( $# < 2 ? $# : 2 ))
if [ "$target" = all ]; then
    for t in nbd_protocol nbd_server vhd rpc; do
        "$0" "$t" "$seconds" "$@"
    done
    exit 0
fi
work="${XSM_FUZZ_WORK:-/tmp/xsm-fuzz}/$target"
mkdir -p "$work/corpus" "$work/crashes"
python=.venv/bin/python
[ -x "$python" ] || python=python3
"$python" -c 'import atheris' 2>/dev/null ||
    "$python" -m pip install -q -c upper-constraints.txt atheris
echo "==> fuzzing $target for $seconds s (corpus $work/corpus)"
exec "$python" -m "tests.fuzz.$target" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=60 \
    -artifact_prefix="$work/crashes/" "$@" \
    "$work/corpus" "tests/fuzz/corpus/$target"
