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

"""Nova boots, runs and live-migrates real QEMU guests (issue 14).

The two xsm computes of :mod:`tests.nova_functional.base` with
``[hypervisor]driver = qemu`` in nova.conf (TCG): each server is a
``qemu-system-x86_64`` process booted from the guest kit, or from the
kernel and ramdisk Glance images its image names (``kernel_id``,
``ramdisk_id``), whose disks are the agent's NBD exports; the in-guest
verifier writes and checks them. Through nova's API: boot from a raw or
VHD image, console output, pause/unpause, stop/start, hard reboot, live
migration with ``block_migration=True`` (QEMU's memory migration and the
engine's storage migration, one switch-over), and the refusal of a live
migration of a paused guest.

Every QEMU a test starts must be gone at its end: each test deletes its
servers, and a cleanup kills and reports any QEMU left under the test's
folder. Under ``CI=true`` a missing QEMU or guest kit fails the test.
"""

import io
import json
import os
import signal
import time
from unittest import mock

import oslo_messaging as messaging
from oslo_utils import uuidutils
from testtools import content

from tests.nova_functional import base
from tests import nova_shared
from xsm_driver.core.block import backends
from xsm_driver.core.vhd import ops as vhd_ops
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier
from xsm_driver.nova import agent_process
from xsm_driver.testing import harness

MiB = base.MiB
SOURCE, DEST = base.SOURCE, base.DEST

REPO_TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
KIT_DIR = os.environ.get('XSM_GUEST_KIT', os.path.join(REPO_TOP,
                                                       '.guest-kit'))
QEMU = 'qemu-system-x86_64'
#: TCG boots the kit in ~4 s; two cores shared with other test runs
BOOT_TIMEOUT = 120
IMAGE_MIB = 16


class QemuGuestTestCase(base.XSMLiveMigrationTestCase):
    """Two xsm computes whose guests are QEMU guests (TCG)."""

    # the root disk is the image's size (flavor disk 0, admin API)
    ROOT_GB, EPHEMERAL_GB = 0, 0
    MEMORY_MB = 128

    def setUp(self):
        problems = harness.qemu_guest_problems(KIT_DIR, QEMU)
        if problems:
            self.missing('; '.join(problems))
        super().setUp()
        # (runs before the computes stop: their agents leave QEMU guests
        # running, as an agent does when it stops)
        self.addCleanup(self.assert_no_qemu_left)
        flavor_id = self._create_flavor(
            name='xsm.qemu', memory_mb=self.MEMORY_MB, vcpu=1, disk=0,
            ephemeral=0)
        self.flavor = self.admin_api.get_flavor(flavor_id)

    #: [hypervisor]driver of each compute
    HYPERVISOR = {SOURCE: 'qemu', DEST: 'qemu'}

    def xsm_flags(self):
        self.flags(group='hypervisor', accel='tcg', guest_kit=KIT_DIR,
                   default_memory_mib=128, shutdown_timeout=15)
        # nova's own (os-stop's clean shutdown, and a SOFT reboot's): the
        # same 15 s, not nova's 60 and 120, well inside the harness's wait
        # for SHUTOFF or ACTIVE (base.PatientStateWaits.STATE_TIMEOUT)
        self.flags(shutdown_timeout=15)
        self.flags(group='libvirt', wait_soft_reboot_seconds=15)
        return super().xsm_flags()

    def start_xsm_compute(self, host, sr_path=None):
        # (the driver reads [hypervisor] at init_host)
        self.flags(group='hypervisor', driver=self.HYPERVISOR[host])
        return super().start_xsm_compute(host, sr_path)

    @property
    def usage(self):
        return {'VCPU': 1, 'MEMORY_MB': self.MEMORY_MB, 'DISK_GB': 0}

    def guests_folder(self, host):
        return os.path.join(self.root, host, 'state', 'guests')

    def assert_no_qemu_left(self):
        left = qemu.processes_naming(self.root)
        for pid in left:
            qemu.kill(pid)
        self.assertEqual([], left, 'QEMU processes left behind')

    # -- images --------------------------------------------------------------

    def create_image(self, data, disk_format='raw', container='bare',
                     properties=None):
        image_id = uuidutils.generate_uuid()
        self.glance.create(None, {
            'id': image_id, 'name': 'xsm-%s' % disk_format,
            'status': 'active', 'disk_format': disk_format,
            'container_format': container, 'size': len(data),
            'min_disk': 0, 'min_ram': 0, 'is_public': True,
            'properties': properties or {}}, data=io.BytesIO(data))
        return image_id

    def disk_data(self):
        """The image's disk: a MiB of random data, then zeros."""
        return os.urandom(MiB) + bytes((IMAGE_MIB - 1) * MiB)

    def raw_image(self, **kw):
        return self.create_image(self.disk_data(), **kw)

    def vhd_image(self, **kw):
        """A dynamic VHD (xsm's own writer) of IMAGE_MIB MiB."""
        path = os.path.join(self.root, 'image.vhd')
        vhd_ops.create(path, IMAGE_MIB * MiB)
        dev = backends.VHDDevice(path, writable=True)
        try:
            dev.pwrite(os.urandom(MiB), 0)
            dev.flush()
        finally:
            dev.close()
        with open(path, 'rb') as f:
            data = f.read()
        os.unlink(path)
        return self.create_image(data, disk_format='vhd', **kw)

    def kernel_images(self):
        """Glance images of the guest kit's kernel and ramdisk."""
        found = []
        for name, fmt in (('vmlinuz', 'aki'), ('initramfs.cpio.gz', 'ari')):
            with open(os.path.join(KIT_DIR, name), 'rb') as f:
                found.append(self.create_image(f.read(), disk_format=fmt,
                                               container=fmt))
        return found

    # -- servers -------------------------------------------------------------

    def boot_image(self, image_id, host=SOURCE, status='ACTIVE'):
        request = self._build_server(image_uuid=image_id,
                                     flavor_id=self.flavor['id'],
                                     networks='none')
        request['availability_zone'] = 'nova:%s' % host
        server = self._wait_for_state_change(
            self.api.post_server({'server': request}), status)
        if status == 'ACTIVE':
            self.assertEqual(host, server['OS-EXT-SRV-ATTR:host'])
        return server

    def driver_state(self, server, host):
        """The power state the driver of ``host`` reports (get_info)."""
        from nova import objects
        instance = objects.Instance.get_by_uuid(self.ctxt, server['id'])
        return self.computes[host].manager.driver.get_info(instance).state

    def console(self, server, length=None):
        """``os-getConsoleOutput`` through nova's API."""
        body = {'os-getConsoleOutput': {}}
        if length is not None:
            body['os-getConsoleOutput']['length'] = length
        return self.api.post_server_action(server['id'], body)['output']

    def wait_console(self, server, what, predicate, timeout=BOOT_TIMEOUT):
        """Wait until the API's console output satisfies ``predicate``.

        (On a timeout the console's last lines are a detail of the test.)
        """
        seen = []

        def check():
            text = self.console(server)
            seen[:] = [text]
            return text if predicate(text) else None
        try:
            return self.wait_for(what, check, timeout=timeout, interval=0.5)
        except self.failureException:
            self.addDetail('console', content.text_content(
                (seen or [''])[0][-4000:]))
            # and the VM as each agent sees it (its QEMU's QMP status)
            for host, api in sorted(self.xsm.items()):
                try:
                    vm = repr(api.vm_get(server['id']))
                except Exception as exc:
                    vm = '%s: %s' % (type(exc).__name__, exc)
                self.addDetail('vm on %s' % host, content.text_content(vm))
            raise

    def wait_writes(self, server, after=0, timeout=BOOT_TIMEOUT):
        """The last progress line, once it counts more than ``after`` writes.

        (On the console the API shows.)
        """
        text = self.wait_console(
            server, 'the verifier to write more than %d blocks' % after,
            lambda t: (verifier.last(t, 'progress') or {}).get(
                'writes', 0) > after, timeout)
        return verifier.last(text, 'progress')

    def qemu_pid(self, host):
        pids = qemu.processes_naming(self.guests_folder(host))
        self.assertEqual(1, len(pids), pids)
        return pids[0]

    def action(self, server, body, status):
        self.api.post_server_action(server['id'], body)
        return self._wait_for_state_change(server, status)

    def assert_verified(self, server, host):
        return nova_shared.assert_verified(self,
                                           self.guest_verify(server, host))

    def delete(self, server, host):
        self._delete_server(server)
        self.assertEqual([], self.xsm[host].vm_list())
        self.assertEqual([], self.xsm[host].vdi_list())
        self.assertEqual([], qemu.processes_naming(self.root))


class TestQemuGuest(QemuGuestTestCase):
    """One host: the life of a real guest through nova's API."""

    def test_boot_console_pause_stop_start_reboot(self):
        from nova.compute import power_state
        server = self.boot_image(self.raw_image())
        vm = self.xsm[SOURCE].vm_get(server['id'])
        self.assertEqual('running', vm['power_state'])
        self.assertEqual({'memory_mib': self.MEMORY_MB, 'vcpus': 1,
                          'firmware': 'qboot'}, vm['qemu'])
        self.assertEqual([IMAGE_MIB * MiB], [
            v['size'] for v in self.xsm[SOURCE].vdi_list()])
        pid = self.qemu_pid(SOURCE)
        self.assertEqual(power_state.RUNNING,
                         self.driver_state(server, SOURCE))

        # the serial console through the API: the guest's init, then the
        # verifier's start line and its writes (the kit's kernel is quiet)
        self.wait_writes(server)
        text = self.console(server)
        self.assertIsNotNone(verifier.last(text, 'init'), text[-2000:])
        start = verifier.last(text, 'start')
        self.assertIsNotNone(start, text[-2000:])
        self.assertEqual(1, start['disks'])
        # length: the last lines only (of a console the guest writes on:
        # they are in what the console holds a moment later)
        tail = self.console(server, length=3)
        self.assertLessEqual(len(tail.splitlines()), 3)
        self.assertIn(tail.rstrip()[-40:], self.console(server))

        # a QEMU that does not answer QMP in time (stopped here) makes the
        # agent's vm_get fail (QMPTimeout, after [hypervisor]'s 10 s): the
        # console, a file the agent reads, is answered all the same, not
        # a 500 (a busy QEMU's QMP was once that slow at load ~25)
        os.kill(pid, signal.SIGSTOP)
        try:
            exc = self.assertRaises(messaging.RemoteError,
                                    self.xsm[SOURCE].vm_get, server['id'])
            self.assertEqual('QMPTimeout', exc.exc_type, exc)
            stopped = self.console(server)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.assertEqual(start.line, verifier.last(stopped, 'start').line)

        # pause: the vCPUs stop (QMP), nova sees PAUSED
        self.action(server, {'pause': None}, 'PAUSED')
        self.assertEqual('paused',
                         self.xsm[SOURCE].vm_get(server['id'])['power_state'])
        self.assertEqual(power_state.PAUSED,
                         self.driver_state(server, SOURCE))
        paused = verifier.last(self.console(server), 'progress')['writes']
        time.sleep(1.5)
        self.assertEqual(paused, verifier.last(self.console(server),
                                               'progress')['writes'])
        self.action(server, {'unpause': None}, 'ACTIVE')
        self.assertEqual(power_state.RUNNING,
                         self.driver_state(server, SOURCE))
        self.wait_writes(server, after=paused)
        self.assertEqual(pid, self.qemu_pid(SOURCE))
        self.assert_verified(server, SOURCE)

        # stop: the QEMU process ends; start: a new one boots
        self.action(server, {'os-stop': None}, 'SHUTOFF')
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual([], qemu.processes_naming(self.root))
        self.assertEqual('halted',
                         self.xsm[SOURCE].vm_get(server['id'])['power_state'])
        self.assertEqual(power_state.SHUTDOWN,
                         self.driver_state(server, SOURCE))
        self.action(server, {'os-start': None}, 'ACTIVE')
        new_pid = self.qemu_pid(SOURCE)
        self.assertNotEqual(pid, new_pid)
        # (a new QEMU starts a new console log)
        self.wait_console(server, 'the new boot', lambda t: len(
            verifier.reports(t, 'start')) == 1)
        # (the verifier's model is of this boot: what it wrote since)
        self.wait_writes(server)
        self.assert_verified(server, SOURCE)

        # hard reboot: the same QEMU resets and boots again (on the
        # same console: a start line after the last line before the
        # reset; the console holds the last 100 KiB only, so the first
        # boot's start line may have gone)
        before = verifier.last(self.console(server), 'progress').line
        self.action(server, {'reboot': {'type': 'HARD'}}, 'ACTIVE')
        self.assertEqual(new_pid, self.qemu_pid(SOURCE))
        self.wait_console(server, 'the boot after the reset', lambda t: (
            before in t and verifier.last(t.partition(before)[2], 'start')))
        self.assertEqual(power_state.RUNNING,
                         self.driver_state(server, SOURCE))
        # soft reboot: stopped and started (a new QEMU)
        self.action(server, {'reboot': {'type': 'SOFT'}}, 'ACTIVE')
        self.assertNotIn(self.qemu_pid(SOURCE), (pid, new_pid))
        self.wait_console(server, 'the boot after the soft reboot',
                          lambda t: verifier.last(t, 'start'))
        self.assertEqual(power_state.RUNNING,
                         self.driver_state(server, SOURCE))

        self.delete(server, SOURCE)

    def test_a_guest_qemu_cannot_run_is_refused_by_name(self):
        # 8 MiB of memory: the agent refuses the guest's options
        flavor_id = self._create_flavor(name='xsm.tiny', memory_mb=8,
                                        vcpu=1, disk=0, ephemeral=0)
        self.flavor = self.admin_api.get_flavor(flavor_id)
        server = self.boot_image(self.raw_image(), status='ERROR')
        self.assertIn('memory_mib must be int in [16, ',
                      server['fault']['message'])
        for host in (SOURCE, DEST):
            self.assertEqual([], self.xsm[host].vm_list())
            self.assertEqual([], self.xsm[host].vdi_list())
        self.assertEqual([], qemu.processes_naming(self.root))
        self._delete_server(server)


class TestQemuLiveMigration(QemuGuestTestCase):
    """``os-migrateLive`` with ``block_migration=True`` moves the guest."""

    def test_live_block_migration_moves_the_running_guest(self):
        from nova.compute import power_state
        kernel, ramdisk = self.kernel_images()
        image = self.vhd_image(properties={'kernel_id': kernel,
                                           'ramdisk_id': ramdisk})
        server = self.boot_image(image)
        # booted from the Glance kernel and ramdisk, fetched next to the
        # agent, in the instance's folder
        folder = os.path.join(self.root, SOURCE, 'state', 'instances',
                              server['id'])
        vm = self.xsm[SOURCE].vm_get(server['id'])
        self.assertEqual(os.path.join(folder, 'kernel'), vm['qemu']['kernel'])
        self.assertEqual(os.path.join(folder, 'ramdisk'),
                         vm['qemu']['initrd'])
        with open(os.path.join(KIT_DIR, 'vmlinuz'), 'rb') as f:
            with open(vm['qemu']['kernel'], 'rb') as g:
                self.assertEqual(f.read(), g.read())
        src_pid = self.qemu_pid(SOURCE)
        self.assertIn(vm['qemu']['kernel'], qemu.process_argv(src_pid))
        before = self.wait_writes(server, after=20)

        self.live_migrate(server)
        self.wait_for_server(server, DEST, timeout=180)
        self.wait_for_migration(server, ['completed'])

        # the engine moved a QEMU guest: memory and disks, one switch-over
        engine = self.engine_migration()
        self.assertEqual('done', engine['phase'], engine.get('error'))
        self.assertEqual('qemu', engine['guest_kind'])
        self.assertIsNotNone(engine['qemu_downtime_ms'])
        self.assertIsNotNone(engine['downtime_ms'])

        # the source's QEMU is gone, the destination's runs the guest
        self.assertIsNone(qemu.process_argv(src_pid))
        self.assertEqual([], qemu.processes_naming(self.guests_folder(SOURCE)))
        self.qemu_pid(DEST)
        self.assertEqual([], self.xsm[SOURCE].vm_list())
        self.assertEqual([], self.xsm[SOURCE].vdi_list())
        self.assertFalse(os.path.exists(folder))
        # the destination fetched the kernel and ramdisk too
        self.assertTrue(os.path.isfile(os.path.join(
            self.root, DEST, 'state', 'instances', server['id'], 'kernel')))
        moved = self.xsm[DEST].vm_get(server['id'])
        self.assertEqual(vm['uuid'], moved['uuid'])
        self.assertEqual('running', moved['power_state'])
        self.assertEqual(power_state.RUNNING,
                         self.driver_state(server, DEST))

        # the guest goes on writing there, its memory intact: the
        # verifier's counters continue (no new boot) and every block it
        # wrote, on either host, reads back as written
        self.wait_writes(server, after=before['writes'] + 20)
        text = self.console(server)
        self.assertEqual([], verifier.reports(text, 'start'))
        result = self.assert_verified(server, DEST)
        self.assertGreater(result['writes'], before['writes'])
        self.addDetail('xsm-migration', content.text_content(json.dumps({
            k: engine.get(k) for k in (
                'downtime_ms', 'qemu_downtime_ms', 'bytes_copied',
                'guest_writes_during_migration')}) + ' ' + json.dumps(
            {k: result[k] for k in ('writes', 'blocks_checked',
                                    'max_stall_ms', 'max_wall_stall_ms')})))
        self.assertIsNotNone(verifier.last(self.console(server), 'verify'))

        self._run_periodics()
        self.assert_usage(DEST)
        self.assert_usage(SOURCE, servers=0)
        self.delete(server, DEST)
        self.assertFalse(os.path.exists(os.path.join(
            self.root, DEST, 'state', 'instances', server['id'])))

    def test_a_paused_guest_is_not_live_migrated(self):
        server = self.boot_image(self.raw_image())
        self.wait_writes(server)
        self.action(server, {'pause': None}, 'PAUSED')
        pid = self.qemu_pid(SOURCE)
        self.live_migrate(server)
        self.wait_for_migration(server, ['error'])
        check = self.destination_check(server)
        self.assertEqual('Error', check['result'])
        self.assertIn('is not running on host %s (its xsm VM is paused)'
                      % SOURCE, check['details'])
        server = self.wait_for_server(server, SOURCE, status='PAUSED')
        self.assertEqual(pid, self.qemu_pid(SOURCE))
        self.assertEqual([], qemu.processes_naming(self.guests_folder(DEST)))
        self.assertEqual([], self.xsm[DEST].vm_list())
        self.assertEqual([], self.xsm[DEST].vdi_list())
        self.action(server, {'unpause': None}, 'ACTIVE')
        self.assert_verified(server, SOURCE)
        self.delete(server, SOURCE)


class TestQemuToModelHost(QemuGuestTestCase):
    """A QEMU guest does not live-migrate to a host without QEMU guests."""

    HYPERVISOR = {SOURCE: 'qemu', DEST: 'model'}

    def test_the_destination_check_refuses_it(self):
        server = self.boot_image(self.raw_image())
        pid = self.qemu_pid(SOURCE)
        self.live_migrate(server)
        self.wait_for_migration(server, ['error'])
        check = self.destination_check(server)
        self.assertEqual('Error', check['result'])
        self.assertIn('runs in QEMU on host %s; host %s runs no QEMU guests '
                      '([hypervisor]driver = model)' % (SOURCE, DEST),
                      check['details'])
        self.wait_for_server(server, SOURCE)
        self.assertIsNone(self.engine_migration())
        self.assertEqual(pid, self.qemu_pid(SOURCE))
        self.assertEqual([], self.xsm[DEST].vm_list())
        self.assertEqual([], self.xsm[DEST].vdi_list())
        self.delete(server, SOURCE)


class _OnRabbit:
    """The computes' agents meet on RabbitMQ; ``[xsm]agent = AGENT``.

    (As tests.nova_functional.test_live_migration.TestLiveMigrationEventlet
    arranges it: an exchange of the test's own, each agent stopped when
    the test ends.)
    """

    AGENT = 'process'
    AGENT_CLASS = agent_process.AgentProcess

    def xsm_flags(self):
        flags = super().xsm_flags()
        problem = base.broker_problem()
        if problem:
            self.missing(problem)
        exchange = 'xsm-nova-%s' % uuidutils.generate_uuid()
        flags['transport_url'] = base.RABBIT_URL
        flags['agent'] = self.AGENT
        self.flags(control_exchange=exchange)
        return flags

    def start_xsm_compute(self, host, sr_path=None):
        compute = super().start_xsm_compute(host, sr_path)
        self.assertIsInstance(compute.manager.driver._agent,
                              self.AGENT_CLASS)
        self.addCleanup(compute.manager.driver.cleanup_host, host)
        return compute


class TestQemuLiveMigrationChildAgent(_OnRabbit, TestQemuLiveMigration):
    """The same with ``[xsm]agent = process``: a child xsm-agent per host.

    Configured from nova.conf's ``[xsm]`` and ``[hypervisor]``.
    """

    def test_the_child_agent_has_the_hypervisor_options(self):
        for host in (SOURCE, DEST):
            with open(self.computes[host].manager.driver._agent.config) as f:
                text = f.read()
            self.assertIn('\n[hypervisor]\ndriver = qemu\n', text)
            self.assertIn('\nguest_kit = %s\n' % KIT_DIR, text)
            self.assertIn('\naccel = tcg\n', text)

    # (the paused-guest refusal does not depend on where the agent runs)
    test_a_paused_guest_is_not_live_migrated = None


class TestLiveMigrationEventletQemuChild(_OnRabbit, TestQemuLiveMigration):
    """QEMU guests with nova monkey-patched by eventlet, child agents.

    Run by the eventlet run of tools/run-nova-tests.sh (its filter
    TestLiveMigrationEventlet matches this name); skipped in the
    native-threads run. The agents are child processes (native threads):
    in nova-compute's green threads an agent cannot stop a QEMU guest's
    disk exports (a green accept() on a unix socket is not woken by its
    shutdown), so the driver refuses ``[xsm]agent = thread`` with QEMU
    guests under eventlet.
    """

    def setUp(self):
        if not base.eventlet_patched():
            self.skipTest('eventlet mode: run without '
                          'OS_NOVA_DISABLE_EVENTLET_PATCHING')
        super().setUp()

    test_a_paused_guest_is_not_live_migrated = None

    def test_agent_in_green_threads_is_refused(self):
        from nova import exception
        self.flags(group='xsm', agent='thread', state_path=os.path.join(
            self.root, 'host3', 'state'))
        drv = type(self.computes[SOURCE].manager.driver)(None)
        with mock.patch('nova.virt.node.get_local_node_uuid',
                        return_value=uuidutils.generate_uuid()):
            exc = self.assertRaises(exception.NovaException, drv.init_host,
                                    'host3')
        self.assertIn('[xsm]agent = thread runs the xsm agent in '
                      'nova-compute\'s green threads, which cannot run '
                      'QEMU guests', str(exc))
        self.assertIsNone(drv._agent)


class TestQemuGuestPowerOff(QemuGuestTestCase):
    """nova's power_off contract: clean within a timeout, or hard."""

    def test_stop_is_a_clean_acpi_power_off_and_0_s_a_kill(self):
        server = self.boot_image(self.raw_image())
        self.wait_writes(server, after=20)
        pid = self.qemu_pid(SOURCE)
        # nova's shutdown_timeout (60 s): the power button, the guest
        # flushes, says so and powers off; its QEMU exits by itself
        t0 = time.monotonic()
        self.action(server, {'os-stop': None}, 'SHUTOFF')
        self.assertLess(time.monotonic() - t0, 50)
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual([], qemu.processes_naming(self.root))
        text = self.xsm[SOURCE].vm_console(server['id'])
        final = verifier.reports(text)[-1]
        self.assertEqual('shutdown', final.kind, text[-2000:])
        self.assertEqual(0, final['mismatches'], final.line)
        self.assertEqual(0, final['io_errors'], final.line)
        self.assertEqual(0, final['flush_errors'], final.line)

        # shutdown_timeout 0: a hard stop, killed at once (no last line)
        self.flags(shutdown_timeout=0)
        self.action(server, {'os-start': None}, 'ACTIVE')
        self.wait_writes(server)
        pid = self.qemu_pid(SOURCE)
        self.action(server, {'os-stop': None}, 'SHUTOFF')
        self.assertIsNone(qemu.process_argv(pid))
        text = self.xsm[SOURCE].vm_console(server['id'])
        self.assertIsNotNone(verifier.last(text, 'start'), text[-2000:])
        self.assertIsNone(verifier.last(text, 'shutdown'), text[-2000:])
        self.delete(server, SOURCE)
