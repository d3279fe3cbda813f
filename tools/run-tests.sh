#!/bin/bash
# Set everything up (tools/setup.sh) and run the whole test suite with stestr,
# then (without a filter) the Nova driver's tests in Nova's own harness
# (tools/run-nova-tests.sh) and in a multi-process Nova deployment
# (tools/run-nova-deployment-tests.sh).  Extra arguments are passed to
# "stestr run" as a test filter.  The last line is always "N passed, N
# failed, N skipped", counted from the subunit streams of this run, after a
# "FAILED <test id>" line for each test that failed; the exit status is
# non-zero if a test failed or none ran.

source "$(dirname "$0")/setup.sh"
set +e

# The id the stestr repository gives to the next run, to make sure that the
# stream summarised below is this run's and not an older one.
next_id() { cat .stestr/next-stream 2>/dev/null || echo 0; }
[ -d .stestr ] || stestr init >/dev/null
before="$(next_id)"
# Every summary's "FAILED <id>" lines, repeated at the end of the log.
failures="$(mktemp)"
trap 'rm -f "$failures"' EXIT

echo "==> stestr run $*"
stestr run "$@"
rc=$?

if [ "$(next_id)" != "$before" ]; then
    main_line="$(stestr last --subunit |
                 python tools/subunit_summary.py 2>"$failures")"
    summary_rc=$?
    cat "$failures" >&2
else
    printf '\nstestr recorded no run (exit status %s)\n' "$rc" >&2
    main_line="0 passed, 0 failed, 0 skipped"
    summary_rc=1
fi
[ "$rc" = 0 ] && [ "$summary_rc" = 0 ]
main_rc=$?

# Without a filter, the Nova driver's tests in Nova's own harness run too
# (in .venv-nova: nova's requirements are not ours).
if [ $# = 0 ]; then
    echo "==> Nova functional tests (tools/run-nova-tests.sh)"
    nova_out="$(mktemp)"
    bash tools/run-nova-tests.sh 2>&1 | tee "$nova_out"
    nova_rc=${PIPESTATUS[0]}
    nova_line="$(tail -n 1 "$nova_out")"
    grep -h '^FAILED ' "$nova_out" >>"$failures"
    # and a real multi-process Nova deployment (tests/nova_deployment)
    echo "==> Nova deployment tests (tools/run-nova-deployment-tests.sh)"
    bash tools/run-nova-deployment-tests.sh 2>&1 | tee "$nova_out"
    deploy_rc=${PIPESTATUS[0]}
    deploy_line="$(tail -n 1 "$nova_out")"
    grep -h '^FAILED ' "$nova_out" >>"$failures"
    rm -f "$nova_out"
    grep -h '^FAILED ' "$failures"
    echo "main suite: $main_line"
    echo "Nova suite: $nova_line"
    echo "Nova deployment: $deploy_line"
    python3 - "$main_line" "$nova_line" "$deploy_line" <<'PY'
import re, sys
total = [0, 0, 0]
for line in sys.argv[1:]:
    m = re.fullmatch(r'(\d+) passed, (\d+) failed(?:, (\d+) skipped)?',
                     line.strip())
    if not m:
        print('unreadable summary %r counted as 1 failure' % line,
              file=sys.stderr)
        total[1] += 1
        continue
    for i, n in enumerate(m.groups()):
        total[i] += int(n or 0)
print('%d passed, %d failed, %d skipped' % tuple(total))
PY
    [ "$main_rc" = 0 ] && [ "$nova_rc" = 0 ] && [ "$deploy_rc" = 0 ]
else
    grep -h '^FAILED ' "$failures"
    echo "$main_line"
    [ "$main_rc" = 0 ]
fi
