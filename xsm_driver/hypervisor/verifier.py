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

"""Read what the in-guest verifier says on the console.

The guest kit's verifier (tools/guest-kit/xsm-verifier.c) prints one line
per report, ``XSMV <kind> key=value ...``: ``start``, ``progress``,
``mismatch``, ``io_error``, ``verify``, ``adopt``, ``shutdown``, ``init``.
Kernel messages may sit between them on the console; they are skipped.

``shutdown`` is the verifier's last line, once it has flushed every disk
on the ACPI power button (then it powers off): ``flush_errors``,
``written`` (blocks it wrote) and ``model`` (a digest of what it wrote).
With the verifier option ``adopt`` (``xsmv.adopt=1``) a boot's verifier
first reads every disk and takes what they hold as its model; its
``adopt`` line's ``written`` and ``model`` equal the ``shutdown`` line's
of the boot before when the disks hold every write of that boot.

A ``progress`` line's ``win_*`` and ``lat_*`` fields cover the window
since the verifier started or since the last :data:`MARK` command: the
longest stalls between two writes (``win_max_stall_ms``,
``win_max_wall_stall_ms``) and the latency of one write in microseconds
(``lat_p50_us``, ``lat_p99_us``, ``lat_max_us``; -1 without a write).
"""

PREFIX = 'XSMV '

#: the commands the verifier reads on its command channel
VERIFY, STATUS, STOP, START = 'verify', 'status', 'stop', 'start'
#: starts a new window of the ``win_*`` and ``lat_*`` fields
MARK = 'mark'


class Report(dict):
    """One verifier line: its ``kind`` and its ``key=value`` fields.

    Fields that are whole numbers are ints.
    """

    def __init__(self, kind, fields, line):
        super().__init__(fields)
        self.kind = kind
        self.line = line

    def __repr__(self):
        return 'Report(%r, %s)' % (self.kind, dict.__repr__(self))


def parse_line(line):
    """A :class:`Report`, or None for a line that is not the verifier's."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    words = line[at + len(PREFIX):].split()
    if not words:
        return None
    fields = {}
    for word in words[1:]:
        key, sep, value = word.partition('=')
        if not sep:
            continue
        try:
            fields[key] = int(value)
        except ValueError:
            fields[key] = value
    return Report(words[0], fields, line.rstrip('\r\n'))


def reports(text, kind=None):
    """Every report in ``text`` (a console log), or those of ``kind``.

    Only whole lines count: the last one of a log the guest is still
    writing may be cut anywhere (``XSMV verify id=1`` without its result).
    """
    out = []
    for line in text.splitlines(keepends=True):
        if not line.endswith(('\n', '\r')):
            break                       # still being written
        rep = parse_line(line)
        if rep is not None and (kind is None or rep.kind == kind):
            out.append(rep)
    return out


def last(text, kind):
    """The last report of ``kind`` in ``text``, or None."""
    found = reports(text, kind)
    return found[-1] if found else None


def verified(report):
    """Whether a ``verify`` report says every disk is as the guest wrote."""
    return (report is not None and report.kind == 'verify' and
            report.get('result') == 'ok' and
            report.get('mismatches') == 0 and report.get('io_errors') == 0)
