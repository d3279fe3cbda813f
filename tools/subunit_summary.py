# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""Read a subunit v2 stream on stdin and print 'N passed, N failed, N skipped'.

Failures, errors and unexpected successes count as failed.  The exit status
is 1 when a test failed or when no test ran, else 0.
"""

import sys

import subunit
import testtools

PASSED = {'success', 'xfail'}
FAILED = {'fail', 'uxsuccess'}
SKIPPED = {'skip'}


def summarize(stream):
    """Return (passed, failed, skipped) counts of a subunit v2 byte stream."""
    status = {}

    def record(test):
        status[test['id']] = test['status']

    case = subunit.ByteStreamToStreamResult(stream, non_subunit_name='stdout')
    result = testtools.StreamToDict(record)
    result.startTestRun()
    try:
        case.run(result)
    finally:
        result.stopTestRun()
    counts = [sum(1 for s in status.values() if s in kinds)
              for kinds in (PASSED, FAILED, SKIPPED)]
    # A test that started but never finished (e.g. the worker died) failed.
    counts[1] += sum(1 for s in status.values()
                     if s not in PASSED | FAILED | SKIPPED)
    return tuple(counts)


def main():
    passed, failed, skipped = summarize(sys.stdin.buffer)
    print('%d passed, %d failed, %d skipped' % (passed, failed, skipped))
    return 1 if failed or not (passed + failed + skipped) else 0


if __name__ == '__main__':
    sys.exit(main())
