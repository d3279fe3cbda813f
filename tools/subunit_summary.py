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

Failures, errors and unexpected successes count as failed; the id of each
failed test is printed on stderr as "FAILED <id>", so that a runner can repeat
them where a reader of its log will see them.  The exit status is 1 when a
test failed or when no test ran, else 0.
"""

import sys

import subunit
import testtools

PASSED = {'success', 'xfail'}
FAILED = {'fail', 'uxsuccess'}
SKIPPED = {'skip'}


def summarize(stream):
    """Count the tests of a subunit v2 byte stream.

    :returns: ``((passed, failed, skipped), sorted ids of the failed)``.
    """
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
    # A test that started but never finished (e.g. the worker died) failed.
    failed = sorted(test for test, s in status.items()
                    if s not in PASSED | SKIPPED)
    passed = sum(1 for s in status.values() if s in PASSED)
    skipped = sum(1 for s in status.values() if s in SKIPPED)
    return (passed, len(failed), skipped), failed


def main():
    (passed, failed, skipped), failed_ids = summarize(sys.stdin.buffer)
    for test in failed_ids:
        print('FAILED %s' % test, file=sys.stderr)
    print('%d passed, %d failed, %d skipped' % (passed, failed, skipped))
    return 1 if failed or not (passed + failed + skipped) else 0


if __name__ == '__main__':
    sys.exit(main())
