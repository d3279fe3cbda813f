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

"""Pure decisions of a migration: no I/O, no clocks.

Everything here takes its inputs as arguments (time included) and either
returns a value or raises a :mod:`~xsm_driver.core.migration.errors`
exception, so that the source and destination roles stay thin and every
rule is tested without disks, sockets or sleeps.
"""

import logging
import math

from xsm_driver.core.block import device
from xsm_driver.core.migration import errors
from xsm_driver.core.vhd import format as vhd_format

LOG = logging.getLogger(__name__)

# -- phases -------------------------------------------------------------------

PHASES = ('preflight', 'prepare-receive', 'mirror', 'snapshot', 'copy',
          'compose', 'switch-over', 'clean-up', 'done')
ABORTED = 'aborted'
DONE = 'done'
#: the source could not learn, within ``[agent]commit_timeout``, whether
#: the destination committed: its guest stays paused until ``xsm-migrate
#: resolve`` learns it (see doc/source/switch-over.rst); not terminal
IN_DOUBT = 'in-doubt'
TERMINAL = (DONE, ABORTED)
ALL_PHASES = PHASES + (IN_DOUBT, ABORTED)

# From switch-over on, the VM may already run on the destination: the
# migration can only go forward.
_POINT_OF_NO_RETURN = PHASES.index('switch-over')


def _index(phase):
    if phase == IN_DOUBT:
        # a switch-over whose outcome is not known yet
        return _POINT_OF_NO_RETURN
    try:
        return PHASES.index(phase)
    except ValueError:
        if phase == ABORTED:
            return None
        raise errors.InvalidPhase(phase=phase, reason='not one of %s'
                                  % ', '.join(ALL_PHASES))


def check_phase(phase):
    """Raise :class:`~errors.InvalidPhase` for an unknown phase name."""
    _index(phase)
    return phase


def can_abort(phase):
    """Whether a migration in ``phase`` can still be rolled back.

    True before the switch-over; False from the switch-over on and for the
    terminal phases.
    """
    index = _index(phase)
    return index is not None and index < _POINT_OF_NO_RETURN


def next_phase(phase):
    """The phase after ``phase``.

    :raises errors.InvalidPhase: ``phase`` is unknown or terminal.
    """
    index = _index(phase)
    if index is None or phase == DONE:
        raise errors.InvalidPhase(phase=phase, reason='the migration has '
                                  'ended; no phase follows')
    return PHASES[index + 1]


# -- space ------------------------------------------------------------------

BLOCK_SIZE = vhd_format.BLOCK_SIZE
# Each VHD data block is preceded by its 512-byte sector bitmap, padded so
# that the data is 4 KiB aligned (see vhd.format.first_block_offset): a
# block costs 4 KiB of metadata, not just the bitmap sector.
BLOCK_OVERHEAD = vhd_format.align_up(vhd_format.BITMAP_SIZE,
                                     vhd_format.DATA_ALIGN)


def blocks_touched(ranges):
    """How many distinct 2 MiB VHD blocks ``(offset, length)`` ranges touch.

    Ranges must be sorted and not overlap (as :func:`split_extents`
    returns them).
    """
    count, last = 0, -1
    for offset, length in ranges:
        if length <= 0:
            continue
        first, stop = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        if first <= last:
            first = last + 1
        if stop >= first:
            count += stop - first + 1
        last = max(last, stop)
    return count


def vhd_metadata(size, differencing=False):
    """Bytes of a new, empty dynamic (or differencing) image of ``size``.

    Footer copy, header, BAT (4 bytes per 2 MiB block, padded to a
    sector), batmap header and batmap, parent locators of a differencing
    image, padding up to the first 4 KiB aligned block, and the footer.
    """
    lay = vhd_format.layout(vhd_format.round_size(size), differencing)
    return lay.first_block + vhd_format.SECTOR


def vdi_space(size, allocated, leaf_headroom, blocks=None):
    """Bytes one VDI needs on a VHD destination SR.

    The destination holds a dynamic parent with the copied data and a
    differencing leaf that receives the mirrored writes.

    :param size: virtual size.
    :param allocated: bytes of allocated data the copy moves.
    :param leaf_headroom: room for the leaf's mirrored writes; capped at
        the virtual size, which is all a leaf can ever hold.
    :param blocks: the number of 2 MiB blocks the data touches, when known
        (see :func:`blocks_touched`); a VHD allocates whole blocks, so
        scattered small writes take more than their bytes. Default: as
        few as ``allocated`` fills.
    """
    rounded = vhd_format.round_size(size)
    if blocks is None:
        blocks = -(-int(allocated) // BLOCK_SIZE)
    blocks = min(blocks, vhd_format.bat_entries(rounded))
    data = max(int(allocated), blocks * BLOCK_SIZE)
    headroom = min(int(leaf_headroom), rounded)
    headroom_blocks = -(-headroom // BLOCK_SIZE)
    return (data + blocks * BLOCK_OVERHEAD +
            vhd_metadata(rounded, differencing=False) +
            vhd_metadata(rounded, differencing=True) +
            headroom + headroom_blocks * BLOCK_OVERHEAD)


def space_needed(vdis, leaf_headroom):
    """Bytes the destination SR needs for the VDIs of a migration.

    :param vdis: dicts with ``uuid``, ``size`` (virtual) and ``allocated``
        (bytes of allocated data of the whole chain, what the copy moves);
        an optional ``blocks`` refines the estimate (see
        :func:`vdi_space`).
    :param leaf_headroom: bytes reserved per VDI for the mirrored leaf.
    """
    return sum(vdi_space(v['size'], v['allocated'], leaf_headroom,
                         v.get('blocks')) for v in vdis)


def check_space(sr_name, needed, free, host=None):
    """Raise :class:`~errors.InsufficientSpace` when ``needed > free``."""
    if needed > free:
        raise errors.InsufficientSpace(sr=sr_name, needed=needed, free=free,
                                       host=host)


# -- preflight ----------------------------------------------------------------

def _unmapped(items, mapping):
    missing = []
    for item in items:
        if not mapping.get(item) and item not in missing:
            missing.append(item)
    return missing


def check_vdi_map(vm_vdis, vdi_map):
    """Every VDI of the VM must have a destination SR.

    :param vm_vdis: uuids of the VM's VDIs.
    :param vdi_map: dict of VDI uuid to destination SR.
    :raises errors.VDINotInMap: naming every unmapped VDI.
    """
    missing = _unmapped(vm_vdis, vdi_map or {})
    if missing:
        raise errors.VDINotInMap(vdis=missing)


def check_vif_map(vm_vifs, vif_map, cross_pool):
    """Every VIF must have a destination network when the VM changes pool.

    :raises errors.VIFNotInMap: naming every unmapped VIF (cross-pool only).
    """
    if not cross_pool:
        return
    missing = _unmapped(vm_vifs, vif_map or {})
    if missing:
        raise errors.VIFNotInMap(vifs=missing)


def check_chain_depth(vdi, depth, limit=vhd_format.MAX_CHAIN_DEPTH):
    """The chain of ``vdi`` after migration must be at most ``limit`` deep."""
    if depth > limit:
        raise errors.ChainTooDeep(vdi=vdi, depth=depth, limit=limit)


def check_concurrency(host, active, limit):
    """Refuse one more migration when ``active`` already reach ``limit``.

    A ``limit`` of None or 0 means no limit (as Nova's
    ``max_concurrent_live_migrations``).
    """
    if limit and active >= limit:
        raise errors.TooManyMigrations(host=host, active=active, limit=limit)


def order_vdis(vdis):
    """VDIs largest allocated first, ties by uuid: long copies start first.

    :returns: a new list; ``vdis`` is not changed.
    """
    return sorted(vdis, key=lambda v: (-v['allocated'], v['uuid']))


# -- copy -------------------------------------------------------------------

def split_extents(extents, chunk):
    """The ``(offset, length)`` ranges a copy must read and write.

    :param extents: ``(offset, length, flags)`` as
        :meth:`~xsm_driver.core.block.device.BlockDevice.extents` returns
        them. An extent with :data:`~device.ZERO` set is skipped, since the
        destination starts zeroed; a hole that is not known to read as
        zeros (HOLE without ZERO, e.g. in a backing file) is copied.
    :param chunk: largest range returned.
    :returns: sorted ranges; adjacent extents are merged, then cut at
        multiples of ``chunk`` so that every range but the first and last
        of a run is a whole, aligned chunk.
    """
    if chunk <= 0:
        raise ValueError('chunk must be positive, not %r' % (chunk,))
    runs = []
    for offset, length, flags in sorted(extents):
        if length <= 0 or flags & device.ZERO:
            continue
        if runs and runs[-1][1] >= offset:
            runs[-1][1] = max(runs[-1][1], offset + length)
        else:
            runs.append([offset, offset + length])
    out = []
    for start, end in runs:
        pos = start
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            out.append((pos, stop - pos))
            pos = stop
    return out


def pace_delay(bytes_sent, elapsed, rate):
    """Seconds to wait so that ``bytes_sent`` in total keep under ``rate``.

    :param bytes_sent: bytes sent (or about to be) since the start.
    :param elapsed: seconds since the start.
    :param rate: bytes per second; None or 0 for no limit.
    """
    if not rate:
        return 0.0
    return max(0.0, bytes_sent / float(rate) - elapsed)


def rate(done, elapsed):
    """Average bytes per second (0.0 before any time has passed)."""
    if elapsed <= 0:
        return 0.0
    return done / float(elapsed)


def eta(done, total, elapsed):
    """Seconds left at the average rate so far, or None when unknown."""
    if done >= total:
        return 0.0
    speed = rate(done, elapsed)
    if speed <= 0:
        return None
    return (total - done) / speed


COMPLETION_ACTIONS = ('abort', 'force-complete')


def completion_action(elapsed, timeout, action):
    """What to do when copying or converging has run for ``elapsed`` s.

    :param timeout: the completion timeout in seconds; None or 0 never
        expires.
    :param action: what the operator chose on expiry: ``abort`` or
        ``force-complete`` (Nova spells it ``force_complete``).
    :returns: ``continue`` before the timeout, else ``action``.
    """
    action = str(action).replace('_', '-')
    if action not in COMPLETION_ACTIONS:
        raise ValueError('completion timeout action must be one of %s, not '
                         '%r' % (', '.join(COMPLETION_ACTIONS), action))
    if not timeout or elapsed < timeout:
        return 'continue'
    return action


# -- the switch-over's commit rule (doc/source/switch-over.rst) ---------------

#: what the source knows of the destination's commit
COMMITTED = 'committed'
UNKNOWN = 'unknown'
OUTCOMES = (COMMITTED, ABORTED, UNKNOWN)


def commit_outcome(call, answer=None, error=None):
    """What one answer of the destination says of its commit.

    Only two answers are knowledge: the destination's durable record of
    its commit (``complete`` returned, ``abort`` answered ``committed``,
    ``status`` says ``done`` or ``committed``) and its durable record of
    the roll-back, after which it refuses the commit (``abort`` answered
    ``aborted``, ``complete`` was refused as aborted, ``status`` says
    ``aborted``). Everything else -- a timeout, a lost reply, a broken
    link, any other error, a phase before the decision -- says nothing.

    :param call: ``complete``, ``abort`` or ``status``.
    :param answer: what the call returned (when it returned).
    :param error: what it raised (when it raised), an exception.
    :returns: :data:`COMMITTED`, :data:`ABORTED` or :data:`UNKNOWN`.

    >>> commit_outcome('complete', {'vdis': {}, 'vm': None})
    'committed'
    >>> commit_outcome('complete', error=TimeoutError('no reply'))
    'unknown'
    >>> commit_outcome('abort', 'committed')
    'committed'
    >>> commit_outcome('abort', 'aborted')
    'aborted'
    >>> commit_outcome('status', {'phase': 'compose'})
    'unknown'
    """
    if error is not None:
        if call == 'complete' and isinstance(error, errors.MigrationAborted):
            # refused: the destination's journal says it rolled back
            return ABORTED
        return UNKNOWN
    if call == 'complete':
        return COMMITTED if isinstance(answer, dict) else UNKNOWN
    if call == 'abort':
        return answer if answer in (COMMITTED, ABORTED) else UNKNOWN
    if call == 'status':
        answer = answer if isinstance(answer, dict) else {}
        if answer.get('committed') or answer.get('phase') == DONE:
            return COMMITTED
        if answer.get('phase') == ABORTED:
            return ABORTED
        return UNKNOWN
    raise ValueError('no commit outcome for a %r call' % (call,))


#: what the source does next at the switch-over
FINISH = 'finish'               # clean up here: the VM runs there
ROLL_BACK = 'roll-back'         # resume the guest here
ASK_AGAIN = 'ask-again'         # keep the guest paused, ask again
REPORT_IN_DOUBT = 'in-doubt'    # keep it paused, an operator resolves


def switch_over_action(outcome, elapsed, timeout):
    """The source's commit rule: what to do once it knows ``outcome``.

    The source resumes its guest only when it knows the destination did
    not and will not commit; while it does not know, the guest stays
    paused and the source asks again for ``timeout`` seconds, then
    reports the migration in doubt. It never guesses: no amount of
    silence is an answer.

    :param outcome: :data:`COMMITTED`, :data:`ABORTED` or
        :data:`UNKNOWN` (see :func:`commit_outcome`).
    :param elapsed: seconds since the source asked the destination to
        commit.
    :param timeout: ``[agent]commit_timeout``.

    >>> switch_over_action('committed', 999, 10)
    'finish'
    >>> switch_over_action('aborted', 999, 10)
    'roll-back'
    >>> switch_over_action('unknown', 3, 10), switch_over_action('unknown',
    ...                                                          10, 10)
    ('ask-again', 'in-doubt')
    """
    if outcome == COMMITTED:
        return FINISH
    if outcome == ABORTED:
        return ROLL_BACK
    if outcome != UNKNOWN:
        raise ValueError('commit outcome must be one of %s, not %r'
                         % (', '.join(OUTCOMES), outcome))
    return ASK_AGAIN if elapsed < timeout else REPORT_IN_DOUBT


def recovery_action(role, phase, committed=False):
    """What a restarted agent does with a migration its journal lists.

    :param role: ``source`` or ``destination``.
    :param phase: the journal's phase of it.
    :param committed: (destination) the journal records the commit.
    :returns: for the source, :data:`ROLL_BACK` (it never asked the
        destination to commit: nothing can have committed),
        :data:`FINISH` (it knew the commit: ``clean-up``) or
        :data:`ASK_AGAIN` (``switch-over``, ``in-doubt``: ask the
        destination; without a certain answer the migration stays in
        doubt and the VM stays stopped here); for the destination,
        :data:`FINISH` when it committed (compose, register the VM) and
        :data:`ROLL_BACK` otherwise.

    >>> recovery_action('source', 'copy'), recovery_action('source',
    ...                                                    'switch-over')
    ('roll-back', 'ask-again')
    >>> recovery_action('destination', 'switch-over', committed=True)
    'finish'
    """
    if role == 'destination':
        return FINISH if committed or phase == DONE else ROLL_BACK
    if phase in ('clean-up', DONE):
        return FINISH
    if can_abort(phase) or phase == ABORTED:
        return ROLL_BACK
    return ASK_AGAIN


# -- the switch-over's pause, step by step ------------------------------------

#: the source's steps of the pause, in order (seconds each, measured with
#: the source's monotonic clock); ``commit`` is the whole round trip of
#: the commit request, the destination's work included
SOURCE_STEPS = ('vcpus_pause', 'disks_drain', 'state_export',
                'mirrors_detach', 'commit', 'hand_over')
#: the destination's steps of its commit (see ``Receive.complete``); its
#: ``done`` record follows the answer, out of the pause
DESTINATION_STEPS = ('commit_record', 'exports_seal', 'compose',
                     'vm_register', 'guest_start')
#: what the prefix of a destination's step is in the breakdown
DESTINATION_PREFIX = 'dest_'


def switch_over_steps(source, destination=None):
    """The pause's breakdown in milliseconds: ``{step: ms}``.

    The commit's round trip is split into the destination's own steps
    (prefixed ``dest_``) and ``commit_transport``: what is left of the
    round trip (the request and its answer on the bus, and whatever the
    destination did that it did not time). So the steps add up to the
    pause, less what no step covers.

    :param source: ``{step: seconds}`` measured by the source, steps of
        :data:`SOURCE_STEPS` (missing ones did not happen).
    :param destination: ``{step: ms}`` the destination answered with its
        commit, or None (a destination that does not time its commit, or
        a commit learnt from another answer).
    :returns: a dict of floats, each rounded *down* to the microsecond
        (so that they never add up to more than the pause); JSON-simple.

    >>> switch_over_steps({'disks_drain': 0.001, 'commit': 0.010},
    ...                   {'commit_record': 4.0, 'compose': 2.5})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'disks_drain': 1.0, 'dest_commit_record': 4.0, 'dest_compose': 2.5,
     'commit_transport': 3.5}
    """
    out = {}
    dest = {DESTINATION_PREFIX + k: max(0.0, float(v))
            for k, v in (destination or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for step in SOURCE_STEPS:
        if step not in source:
            continue
        ms = max(0.0, source[step] * 1000.0)
        if step == 'commit' and dest:
            # The destination's steps cannot take longer than the round
            # trip they are part of (its clock may run a little
            # differently): scale them down if they do.
            total = sum(dest.values())
            if total > ms > 0 or (total and not ms):
                dest = {k: v * ms / total for k, v in dest.items()}
                total = ms
            for k, v in dest.items():
                out[k] = _floor_us(v)
            out['commit_transport'] = _floor_us(ms - total)
        else:
            out[step] = _floor_us(ms)
    return out


def _floor_us(ms):
    return math.floor(max(0.0, ms) * 1000.0 + 1e-6) / 1000.0
