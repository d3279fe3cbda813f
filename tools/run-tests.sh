#!/bin/bash
# Set everything up (tools/setup.sh) and run the whole test suite with stestr.
# Extra arguments are passed to "stestr run" as a test filter.  The last line
# is always "N passed, N failed, N skipped", counted from the subunit stream
# of this run; the exit status is non-zero if a test failed or none ran.

source "$(dirname "$0")/setup.sh"
set +e

# The id the stestr repository gives to the next run, to make sure that the
# stream summarised below is this run's and not an older one.
next_id() { cat .stestr/next-stream 2>/dev/null || echo 0; }
[ -d .stestr ] || stestr init >/dev/null
before="$(next_id)"

echo "==> stestr run $*"
stestr run "$@"
rc=$?

if [ "$(next_id)" != "$before" ]; then
    stestr last --subunit | python tools/subunit_summary.py
    summary_rc=$?
else
    printf '\nstestr recorded no run (exit status %s)\n' "$rc" >&2
    echo "0 passed, 0 failed, 0 skipped"
    summary_rc=1
fi
[ "$rc" = 0 ] && [ "$summary_rc" = 0 ]
