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

from oslo_config import cfg

from xsm_driver.conf import _util

hypervisor_group = cfg.OptGroup(
    'hypervisor',
    title='Hypervisor options',
    help='Options that choose and tune what runs the guests (VMs) of this '
         'host.')

hypervisor_opts = [
    cfg.StrOpt(
        'driver',
        default='model',
        help='What runs the guests of this host: a stevedore plugin of the '
             'xsm_driver.hypervisor namespace. The qemu driver runs each '
             'guest as a qemu-system-x86_64 process whose disks are NBD '
             'exports of this agent; the model driver runs a verifying '
             'thread in the agent in place of a guest, for hosts without '
             'QEMU and for scale tests.'),
    cfg.StrOpt(
        'qemu_binary',
        default='qemu-system-x86_64',
        help='The QEMU system emulator the qemu driver starts, as a path '
             'or a command name looked up in PATH.'),
    cfg.StrOpt(
        'accel',
        default='auto',
        choices=[('auto', 'KVM when a short probe run shows that it works '
                          'on this host, TCG otherwise'),
                 ('kvm', 'always KVM, with the host CPU model'),
                 ('tcg', 'always TCG, the emulator (slow, works '
                         'everywhere)')],
        help='The accelerator of the qemu driver. The auto probe boots a '
             'boot sector under KVM once per QEMU binary and host kernel '
             'and keeps the result, because /dev/kvm may exist where KVM '
             'cannot run a guest (nested virtualisation).'),
    cfg.IntOpt(
        'default_memory_mib',
        default=256,
        min=64,
        help='Memory of a guest, in MiB, when its VM record does not say.'),
    cfg.IntOpt(
        'shutdown_timeout',
        default=30,
        min=0,
        help='Seconds a guest has to power off after an ACPI shutdown '
             'request before the qemu driver kills its process.'),
    cfg.IntOpt(
        'nbd_reconnect_delay',
        default=60,
        min=0,
        max=3600,
        help='Seconds a QEMU guest\'s disk requests wait, and QEMU '
             'reconnects, when the agent serving its disks goes away (an '
             'agent restart or upgrade) before QEMU fails them and the '
             'guest sees I/O errors. Longer than an agent restart takes on '
             'a busy host (seen here: 10 to 21 s at load 15 to 18, and '
             'over 30 s at load 45). 0: no reconnect, requests fail at '
             'once. Applies to guests started after the change; a running '
             'QEMU keeps the value it was started with.'),
    cfg.StrOpt(
        'guest_kit',
        default='/var/lib/xsm-driver/guest-kit',
        help='The folder of the guest kit (vmlinuz and initramfs.cpio.gz, '
             'built by tools/guest-kit/build.sh) that a guest boots when '
             'its VM record names no kernel of its own.'),
]


register_opts = _util.registrar(hypervisor_group, hypervisor_opts)


def list_opts():
    return {hypervisor_group: hypervisor_opts}
