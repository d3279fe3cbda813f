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

"""What every hypervisor driver offers, and the guest it is asked to run.

A driver runs the guests of one host: :meth:`Driver.start` boots a
:class:`GuestSpec`, the other calls act on a running guest by name, and
:meth:`Driver.recover` is what an agent that restarts calls first, to find
the guests that kept running without it.
"""

import os
import re

from xsm_driver.core import exception

# Power states, the same words as xsm_driver.core.migration.host's.
RUNNING = 'running'
PAUSED = 'paused'
HALTED = 'halted'
CRASHED = 'crashed'

_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$')


class HypervisorError(exception.XSMError):
    """A hypervisor driver could not do what it was asked."""


class GuestNotFound(HypervisorError):
    msg_fmt = 'hypervisor %(driver)s runs no guest %(name)s'


class GuestExists(HypervisorError):
    msg_fmt = 'hypervisor %(driver)s already runs a guest %(name)s'


class InvalidGuestOptions(HypervisorError):
    msg_fmt = 'invalid guest options: %(reason)s'


# What a VM record's ``qemu`` options may hold: (type, minimum, maximum).
_GUEST_OPTIONS = {
    'memory_mib': (int, 16, 1 << 20), 'vcpus': (int, 1, 256),
    'kernel': (str, None, None), 'initrd': (str, None, None),
    'cmdline': (str, None, None), 'verifier': (dict, None, None),
    'firmware': (str, None, None),
}
# The guest's firmware. ``seabios`` is what QEMU runs without ``-bios``: a
# record or spec file without ``firmware`` (older than it) means it.
# ``qboot`` (the default) boots the kernel QEMU is given and reboots on a
# reset at any moment. SeaBIOS does not always: with QEMU 7.2 under TCG, a
# reset right after the start left the vCPU running garbage at f000:0000
# in most tries, and later resets did not bring it back.
FIRMWARES = ('qboot', 'seabios')
DEFAULT_FIRMWARE = 'qboot'
LEGACY_FIRMWARE = 'seabios'
# The in-guest verifier's options (tools/guest-kit/xsm-verifier.c).
_VERIFIER_OPTIONS = {
    'rate': (0, 1000000), 'reads': (0, 1000), 'report_ms': (10, 3600000),
    'blocks': (1, 1 << 40), 'verify_at': (0, 1 << 62), 'adopt': (0, 1),
}


def guest_options(options):
    """Check the ``qemu`` options of a VM record; a copy of them.

    :raises InvalidGuestOptions: naming the first option that is wrong.
    """
    if options is None:
        return None
    if not isinstance(options, dict):
        raise InvalidGuestOptions(reason='expected an object, not %.80r'
                                  % (options,))
    for key, value in options.items():
        if key not in _GUEST_OPTIONS:
            raise InvalidGuestOptions(reason='unknown option %.80r (known: '
                                      '%s)' % (key, ', '.join(
                                          sorted(_GUEST_OPTIONS))))
        kind, low, high = _GUEST_OPTIONS[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (
                low is not None and not low <= value <= high):
            raise InvalidGuestOptions(reason='%s must be %s%s, not %.80r' % (
                key, kind.__name__, '' if low is None else ' in [%d, %d]'
                % (low, high), value))
    if 'firmware' in options and options['firmware'] not in FIRMWARES:
        raise InvalidGuestOptions(reason='firmware must be one of %s, not '
                                  '%.80r' % (', '.join(FIRMWARES),
                                             options['firmware']))
    if any(c in options.get('cmdline', '') for c in '\n\r\0'):
        raise InvalidGuestOptions(reason='cmdline must be one line')
    for key in ('kernel', 'initrd'):
        path = options.get(key)
        if path is not None and not (os.path.isabs(path) and
                                     os.path.isfile(path)):
            raise InvalidGuestOptions(reason='%s %.200r is not an absolute '
                                      'path of a file on this host'
                                      % (key, path))
    for key, value in options.get('verifier', {}).items():
        if key not in _VERIFIER_OPTIONS:
            raise InvalidGuestOptions(reason='unknown verifier option %.80r '
                                      '(known: %s)' % (key, ', '.join(
                                          sorted(_VERIFIER_OPTIONS))))
        low, high = _VERIFIER_OPTIONS[key]
        if (not isinstance(value, int) or isinstance(value, bool) or
                not low <= value <= high):
            raise InvalidGuestOptions(reason='verifier option %s must be an '
                                      'integer in [%d, %d], not %.80r'
                                      % (key, low, high, value))
    return dict(options, verifier=dict(options['verifier'])) if (
        'verifier' in options) else dict(options)


class DiskSpec:
    """One disk of a guest.

    :param name: the disk's name (a VDI's, for messages and ids).
    :param socket: ``qemu``: the unix socket of the NBD server that
        exports the disk.
    :param export: ``qemu``: the NBD export name.
    :param host: ``qemu``: the NBD server's TCP address, when it has no
        unix socket (``socket`` wins when both are given).
    :param port: ``qemu``: its TCP port.
    :param device: ``model``: the :class:`BlockDevice` the guest thread
        writes to.
    :param size: ``qemu``: the disk's size in bytes, when known: the
        disk's geometry is then set from it, and QEMU reads nothing of
        the disk before the guest does (otherwise it reads the first
        sector to guess the geometry -- which an incoming migration's
        disk, held until the commit, cannot answer).
    """

    def __init__(self, name, socket=None, export=None, device=None,
                 host=None, port=None, size=None):
        self.name, self.socket, self.export = name, socket, export
        self.host, self.port = host, port
        self.device = device
        self.size = size

    def to_dict(self):
        return {'name': self.name, 'socket': self.socket,
                'export': self.export, 'host': self.host,
                'port': self.port, 'size': self.size}


class GuestSpec:
    """What a driver needs to boot a guest.

    :param name: the guest's name, also its folder's name (letters,
        digits, ``.``, ``_`` and ``-``; a VM's uuid fits).
    :param disks: :class:`DiskSpec` list, in the order the guest sees them.
    :param memory_mib: guest RAM (``None``: the driver's default).
    :param vcpus: virtual CPUs.
    :param verifier: options of the in-guest verifier, e.g.
        ``{'rate': 50, 'verify_at': 1000}`` (``xsmv.rate=50 ...`` on the
        guest kernel's command line; see tools/guest-kit/xsm-verifier.c);
        the ``model`` driver reads ``rate`` and ``reads``.
    :param kernel: ``qemu``: kernel image (``None``: the guest kit's).
    :param initrd: ``qemu``: initramfs (``None``: the guest kit's).
    :param cmdline: ``qemu``: extra kernel command-line words.
    :param firmware: ``qemu``: one of :data:`FIRMWARES`.
    """

    def __init__(self, name, disks=(), memory_mib=None, vcpus=1,
                 verifier=None, kernel=None, initrd=None, cmdline='',
                 firmware=DEFAULT_FIRMWARE):
        if not _NAME.match(name or ''):
            raise HypervisorError('invalid guest name %r: use letters, '
                                  'digits, ".", "_" and "-" (at most 64)'
                                  % (name,))
        self.name = name
        self.disks = list(disks)
        self.memory_mib = memory_mib
        self.vcpus = int(vcpus)
        self.verifier = dict(verifier or {})
        self.kernel, self.initrd, self.cmdline = kernel, initrd, cmdline
        if firmware not in FIRMWARES:
            raise HypervisorError('unknown firmware %r (known: %s)'
                                  % (firmware, ', '.join(FIRMWARES)))
        self.firmware = firmware

    def to_dict(self):
        return {'name': self.name,
                'disks': [d.to_dict() for d in self.disks],
                'memory_mib': self.memory_mib, 'vcpus': self.vcpus,
                'verifier': self.verifier, 'kernel': self.kernel,
                'initrd': self.initrd, 'cmdline': self.cmdline,
                'firmware': self.firmware}

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data['disks'] = [DiskSpec(**d) for d in data.get('disks', ())]
        data.setdefault('firmware', LEGACY_FIRMWARE)   # an older spec file
        return cls(**data)


class Driver:
    """Interface of a hypervisor driver (``xsm_driver.hypervisor``)."""

    #: the driver's plugin name
    name = None

    def start(self, spec, paused=False):
        """Boot the guest ``spec``; ``paused``: with its vCPUs stopped."""
        raise NotImplementedError

    def shutdown(self, name, timeout=None):
        """Ask the guest to power off (ACPI); kill it after ``timeout``.

        :returns: True when the guest powered off by itself.
        """
        raise NotImplementedError

    def reboot(self, name):
        """Reset the guest (a hard reset, as the reset button)."""
        raise NotImplementedError

    def pause(self, name):
        raise NotImplementedError

    def resume(self, name):
        raise NotImplementedError

    def destroy(self, name):
        """Stop the guest at once; nothing of its process is left."""
        raise NotImplementedError

    def power_state(self, name):
        """RUNNING, PAUSED, HALTED or CRASHED."""
        raise NotImplementedError

    def list(self):
        """Names of the guests this driver knows, running or not."""
        raise NotImplementedError

    def recover(self):
        """Find the guests that ran before this driver was built.

        :returns: ``{name: power state}``.
        """
        raise NotImplementedError

    def close(self):
        """Let go of the guests (they keep running) and of every file."""
