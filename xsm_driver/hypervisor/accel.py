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

"""Which accelerator QEMU uses: KVM when it really works, TCG otherwise.

``/dev/kvm`` existing is not enough: under nested virtualisation KVM may
open and then fail the guest (``failed to set MSR 0x10a`` with ``-cpu
host``), or run a boot sector and then hang a Linux kernel (a nested
``kvm-pvm`` host: not a line on the console). So ``auto`` runs a probe:
QEMU with the exact accelerator and CPU the driver would use boots the
guests' kernel (the guest kit's) with no root file system, which must
print its way to its panic (``panic=-1``, ``-no-reboot``: QEMU exits);
without a kernel, a 512-byte boot sector that writes to an
``isa-debug-exit`` port, which makes QEMU exit with status 99. Any other
end, or no end within the timeout, means KVM does not work here. The
result is kept in memory and in a small JSON file, keyed by the QEMU
binary, the probed kernel and the host's kernel, so an agent probes once.

The decisions are pure functions; :func:`probe` and :func:`resolve` are
the IO.
"""

import json
import logging
import os
import subprocess
import tempfile

LOG = logging.getLogger(__name__)

AUTO, KVM, TCG = 'auto', 'kvm', 'tcg'
CHOICES = (AUTO, KVM, TCG)
#: the CPU model each accelerator runs (the probe tests the same)
CPU = {KVM: 'host', TCG: None}

# mov al, 0x31; out 0xf4, al; hlt; jmp $-1 -- QEMU exits (0x31 << 1) | 1
_BOOT = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
BOOT_SECTOR = _BOOT + bytes(510 - len(_BOOT)) + b'\x55\xaa'
PROBE_EXIT = 99
#: what a probed kernel prints last (it finds no root file system)
KERNEL_END = b'Kernel panic'

_cache = {}


def needs_probe(setting, have_dev_kvm):
    """Whether choosing needs :func:`probe` (``auto`` with /dev/kvm)."""
    return setting == AUTO and have_dev_kvm


def decide(setting, have_dev_kvm, probe_ok=None):
    """The accelerator to use.

    :param setting: ``auto``, ``kvm`` or ``tcg`` (``[hypervisor]accel``).
    :param have_dev_kvm: whether ``/dev/kvm`` exists.
    :param probe_ok: the probe's verdict (only read for ``auto`` with
        ``/dev/kvm``).
    """
    if setting not in CHOICES:
        raise ValueError('accel must be one of %s, not %r'
                         % ('/'.join(CHOICES), setting))
    if setting != AUTO:
        return setting
    if not have_dev_kvm:
        return TCG
    return KVM if probe_ok else TCG


def probe_verdict(returncode, timed_out, output=b'', kernel=False):
    """Whether a probe run shows a working accelerator.

    :param output: what the guest printed (a kernel probe's console).
    :param kernel: a kernel probe (else the boot sector's).
    """
    if timed_out:
        return False
    if kernel:
        return KERNEL_END in output
    return returncode == PROBE_EXIT


def probe_command(binary, accel, image=None, kernel=None):
    """The probe's QEMU: a ``kernel`` to its panic, or a boot ``image``."""
    cmd = [binary, '-accel', accel]
    if CPU.get(accel):
        cmd += ['-cpu', CPU[accel]]
    cmd += ['-nodefaults', '-no-user-config', '-display', 'none',
            '-no-reboot']
    if kernel is not None:
        return cmd + ['-machine', 'q35', '-m', '128', '-kernel', kernel,
                      '-append', 'console=ttyS0 panic=-1',
                      '-serial', 'stdio']
    return cmd + ['-machine', 'pc', '-m', '16',
                  '-drive', 'file=%s,format=raw,if=ide' %
                  image.replace(',', ',,'),
                  '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04']


def probe(binary, accel=KVM, timeout=10.0, kernel=None):
    """Run the probe (``kernel``, else a boot sector): ``(ok, detail)``."""
    with tempfile.TemporaryDirectory(prefix='xsm-accel-probe-') as tmp:
        image = os.path.join(tmp, 'boot.img')
        with open(image, 'wb') as f:
            f.write(BOOT_SECTOR)
        cmd = probe_command(binary, accel, image, kernel)
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, 'no exit within %.0f s (hung)' % timeout
        except OSError as exc:
            return False, str(exc)
    err = proc.stderr.decode('utf-8', 'replace').strip().splitlines()
    ok = probe_verdict(proc.returncode, False, proc.stdout,
                       kernel is not None)
    detail = 'exit status %d' % proc.returncode
    if kernel is not None and not ok:
        detail += ', the kernel did not reach its end'
    return ok, detail + ((': ' + err[-1]) if err and not ok else '')


def _stamp(path):
    try:
        st = os.stat(path)
        return [st.st_size, int(st.st_mtime)]
    except OSError:
        return None


def _cache_key(binary, kernel=None):
    key = [os.path.realpath(binary), _stamp(binary), os.uname().release]
    if kernel is not None:
        key += [os.path.realpath(kernel), _stamp(kernel)]
    return key


def resolve(setting, binary, cache_file=None, timeout=10.0,
            dev_kvm='/dev/kvm', kernel=None):
    """The accelerator for ``setting``, probing (once) when needed.

    :param kernel: the guests' kernel, which the probe boots (else a boot
        sector, which a host that hangs Linux under KVM may still run).
    """
    have = os.path.exists(dev_kvm)
    if not needs_probe(setting, have):
        return decide(setting, have)
    key = _cache_key(binary, kernel)
    ok = _cache.get(json.dumps(key))
    if ok is None and cache_file:
        try:
            with open(cache_file) as f:
                saved = json.load(f)
            if saved.get('key') == key:
                ok = bool(saved['ok'])
        except (OSError, ValueError, KeyError):
            pass
    if ok is None:
        ok, detail = probe(binary, KVM, timeout, kernel)
        LOG.info('KVM probe with %s: %s (%s): using %s', binary,
                 'works' if ok else 'does not work', detail,
                 KVM if ok else TCG)
        if cache_file:
            try:
                tmp = cache_file + '.tmp'
                with open(tmp, 'w') as f:
                    json.dump({'key': key, 'ok': ok, 'detail': detail}, f)
                os.replace(tmp, cache_file)
            except OSError as exc:
                LOG.warning('cannot keep the KVM probe result in %s: %s',
                            cache_file, exc)
    _cache[json.dumps(key)] = ok
    return decide(setting, have, ok)
