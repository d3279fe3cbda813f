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

"""Pure decisions of the compute driver: no nova, no I/O, no clocks.

Like nova's own ``virt/libvirt/migration.py``, each decision is a small
named function with a worked example; the driver's monitor loop calls
them.
"""

GiB = 1 << 30
MiB = 1 << 20

#: a live migration counts at least this much data for its timeout (as
#: nova's libvirt driver does)
MIN_TIMEOUT_DATA = 2 * GiB

# What a finished (or running) engine migration means to Nova.
RUNNING = 'running'
SUCCEEDED = 'succeeded'
CANCELLED = 'cancelled'
FAILED = 'failed'
#: the engine's phase (and Nova's view of it) when the switch-over's
#: commit was neither confirmed nor refused: the guest is paused on the
#: source, the outcome unknown until ``xsm-migrate resolve`` settles it
#: (doc/source/switch-over.rst)
IN_DOUBT = 'in-doubt'


def disk_sizes(root_gb, ephemeral_gb=0, swap_mb=0, image_size=0):
    """Bytes of each disk an instance of a flavor gets, root first.

    A flavor with ``root_gb`` 0 takes the image's size (at least 1 MiB);
    ephemeral and swap disks are only made when the flavor has them.

    >>> disk_sizes(1, 2, 0)
    [1073741824, 2147483648]
    >>> disk_sizes(0, image_size=3 * MiB, swap_mb=512)
    [3145728, 536870912]
    """
    root = root_gb * GiB if root_gb else max(int(image_size or 0), MiB)
    sizes = [root]
    if ephemeral_gb:
        sizes.append(ephemeral_gb * GiB)
    if swap_mb:
        sizes.append(swap_mb * MiB)
    return sizes


def completion_timeout(seconds_per_gib, data_bytes):
    """Seconds a migration of ``data_bytes`` may take; None: no timeout.

    The option is per GiB of data to copy, at least 2 GiB counted:
    800 s/GiB and 5 GiB give 4000 s; 800 s/GiB and 100 MiB give 1600 s.

    >>> completion_timeout(800, 5 * GiB), completion_timeout(800, 100 * MiB)
    (4000.0, 1600.0)
    >>> completion_timeout(0, 5 * GiB) is None
    True
    """
    if not seconds_per_gib:
        return None
    return seconds_per_gib * max(data_bytes, MIN_TIMEOUT_DATA) / GiB


def should_trigger_timeout_action(elapsed, timeout):
    """Whether a migration running for ``elapsed`` s has timed out.

    >>> should_trigger_timeout_action(10, 5), should_trigger_timeout_action(
    ...     4, 5), should_trigger_timeout_action(99, None)
    (True, False, False)
    """
    return timeout is not None and elapsed > timeout


def progress(snapshot):
    """Nova's view of the engine's progress ``{'done', 'total', ...}``.

    :returns: ``(total, processed, remaining, percent)``; percent is an
        int 0..100 (0 while the total is not known yet).

    >>> progress({'done': 25, 'total': 100})
    (100, 25, 75, 25)
    >>> progress({'done': 0, 'total': 0})
    (0, 0, 0, 0)
    """
    total = int(snapshot.get('total') or 0)
    done = min(int(snapshot.get('done') or 0), total) if total else 0
    percent = done * 100 // total if total else 0
    return total, done, total - done, percent


def migration_progress(progress):
    """The Migration record's disk fields from :func:`progress`'s answer.

    Nova's API schemas (``GET /servers/{id}/migrations``) want each at
    least 1, or null: a 0 (nothing copied yet, nothing left) is None.

    >>> sorted(migration_progress((100, 25, 75, 25)).items())
    [('disk_processed', 25), ('disk_remaining', 75), ('disk_total', 100)]
    >>> sorted(migration_progress((100, 100, 0, 100)).items())
    [('disk_processed', 100), ('disk_remaining', None), ('disk_total', 100)]
    >>> set(migration_progress((0, 0, 0, 0)).values())
    {None}
    """
    total, done, remaining, _ = progress
    return {'disk_total': total or None, 'disk_processed': done or None,
            'disk_remaining': remaining or None}


def outcome(status, abort_requested=False):
    """What an engine migration status means for Nova.

    :param status: the engine's ``migration_get`` answer.
    :param abort_requested: the operator asked Nova to abort it.
    :returns: :data:`RUNNING`; :data:`SUCCEEDED` once the destination
        committed (also when only the source's clean-up after the commit
        failed: the instance runs on the destination then);
        :data:`IN_DOUBT` while nobody knows whether it committed (never a
        failure: a rollback could run the guest twice; never a success:
        the destination may have refused) -- also when an abort was
        asked; :data:`CANCELLED` for an abort the operator asked for;
        :data:`FAILED` otherwise.

    >>> outcome({'finished': None, 'phase': 'copy'})
    'running'
    >>> outcome({'finished': 1.0, 'phase': 'done'})
    'succeeded'
    >>> outcome({'finished': 1.0, 'phase': 'in-doubt'}, abort_requested=True)
    'in-doubt'
    >>> outcome({'finished': 1.0, 'phase': 'aborted'}, abort_requested=True)
    'cancelled'
    >>> outcome({'finished': 1.0, 'phase': 'aborted'})
    'failed'
    """
    phase = status.get('phase')
    if phase == IN_DOUBT:
        return IN_DOUBT
    if status.get('finished') is None:
        return RUNNING
    if phase == 'done' or (phase == 'clean-up' and status.get('result')):
        return SUCCEEDED
    if abort_requested:
        return CANCELLED
    return FAILED


def timeout_action(action, already_taken):
    """The action to take now that the timeout has passed, or None.

    Each action is taken once: an abort is final, and a force-complete
    that has lifted the bandwidth limit cannot do more.

    >>> timeout_action('abort', False), timeout_action('abort', True)
    ('abort', None)
    """
    if already_taken:
        return None
    if action not in ('abort', 'force_complete'):
        raise ValueError('unknown completion timeout action %r' % action)
    return action


def bandwidth(limit_mib):
    """Bytes per second from the ``bandwidth_limit`` option; None: no limit.

    >>> bandwidth(0) is None, bandwidth(2)
    (True, 2097152)
    """
    return limit_mib * MiB if limit_mib else None


#: image disk formats spawn writes into the root disk as they are
IMAGE_DISK_FORMATS = ('raw', 'vhd')
#: container formats that wrap the disk in something else
WRAPPING_CONTAINERS = ('ova', 'docker', 'compressed')


def image_format(disk_format, container_format=None):
    """The format to write a Glance image's data in; raises ValueError.

    The data of a ``raw`` image is the disk, a ``vhd`` image's data is a
    VHD file whose virtual disk is the disk; anything else (qcow2, vmdk,
    iso, a kernel, an image inside an OVA) cannot be written as it is.

    >>> image_format('raw', 'bare'), image_format('vhd')
    ('raw', 'vhd')
    >>> image_format('qcow2')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: disk format 'qcow2' cannot be written ... (raw and vhd can)
    """
    if disk_format not in IMAGE_DISK_FORMATS:
        raise ValueError('disk format %r cannot be written into an xsm root '
                         'disk (%s can)' % (disk_format,
                                            ' and '.join(IMAGE_DISK_FORMATS)))
    if container_format in WRAPPING_CONTAINERS:
        raise ValueError('container format %r wraps the disk; an xsm root '
                         'disk takes bare images' % container_format)
    return disk_format


def vm_name(instance_uuid):
    """The xsm VM of a Nova instance is named after the instance's uuid."""
    return str(instance_uuid)
