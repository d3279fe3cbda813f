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

"""Preflight checks and error messages of the xenapi engine, without IO."""

import doctest
import threading

from tests import base
from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.xenapi import engine
from xsm_driver.core.xenapi import errors
from xsm_driver.core.xenapi import pool
from xsm_driver.core.xenapi import preflight
from xsm_driver.core.xenapi import session

GiB = 1 << 30


def load_tests(loader, tests, ignore):
    for module in (preflight, errors, engine, pool, session):
        tests.addTests(doctest.DocTestSuite(module))
    return tests


def _describe(ref, kind):
    return {'OpaqueRef:vdi': "VDI 11-22 'data' on SR 'Local storage'",
            'OpaqueRef:sr': "SR 33-44 'Local storage'",
            'OpaqueRef:host': "host 55-66 'xs-b1'",
            'OpaqueRef:vif': 'VIF 99-00 (device 0)',
            'OpaqueRef:vm': "VM 77-88 'web-1'",
            'OpaqueRef:net': "network n-1 'storage'",
            'OpaqueRef:pif': 'PIF p-1 (eth1)'}.get(ref, '%s %s'
                                                   % (kind, ref))


class TestTranslate(base.TestCase):
    """Every xapi error of DESIGN §9 says what failed and what to do."""

    def msg(self, *details, cls=errors.XenAPIError):
        exc = errors.translate(list(details), _describe, 'migrating VM '
                               'web-1 to pool-b')
        self.assertIsInstance(exc, cls)
        self.assertIsInstance(exc, mig_errors.MigrationError)
        text = str(exc)
        self.assertNotIn('OpaqueRef', text)
        return text

    def test_vdi_not_in_map(self):
        text = self.msg('VDI_NOT_IN_MAP', 'OpaqueRef:vdi',
                        cls=mig_errors.VDINotInMap)
        self.assertIn("VDI 11-22 'data' on SR 'Local storage'", text)
        self.assertIn('map every disk', text)

    def test_vif_not_in_map(self):
        self.assertIn('VIF_NOT_IN_MAP', self.msg(
            'VIF_NOT_IN_MAP', 'OpaqueRef:vif', cls=mig_errors.VIFNotInMap))

    def test_sr_does_not_support_migration(self):
        text = self.msg('SR_DOES_NOT_SUPPORT_MIGRATION', 'OpaqueRef:sr')
        self.assertIn("SR 33-44 'Local storage' does not support", text)
        self.assertIn('(xapi: SR_DOES_NOT_SUPPORT_MIGRATION)', text)

    def test_mirror_failed(self):
        text = self.msg('MIRROR_FAILED', 'OpaqueRef:vdi')
        self.assertIn("mirroring VDI 11-22 'data'", text)
        self.assertIn('web-1', text)

    def test_source_space(self):
        self.assertIn('no room for the snapshot', self.msg(
            'SR_SOURCE_SPACE_INSUFFICIENT', 'OpaqueRef:sr'))

    def test_too_many(self):
        text = self.msg('TOO_MANY_STORAGE_MIGRATES', '3',
                        cls=mig_errors.TooManyMigrations)
        self.assertIn('3 storage migrations', text)

    def test_version(self):
        # [vm; host], as xapi_vm_migrate.ml raises it
        text = self.msg('VM_HOST_INCOMPATIBLE_VERSION_MIGRATE',
                        'OpaqueRef:vm', 'OpaqueRef:host')
        self.assertIn("host 55-66 'xs-b1' runs an older", text)
        self.assertIn("VM 77-88 'web-1'", text)

    def test_migration_network_errors(self):
        # xapi_host.ml migrate_receive: [host; network], then [pif]
        text = self.msg('HOST_CANNOT_ATTACH_NETWORK', 'OpaqueRef:host',
                        'OpaqueRef:net')
        self.assertIn("host 55-66 'xs-b1' has no interface on network "
                      "n-1 'storage'", text)
        for code, words in (('INTERFACE_HAS_NO_IP', 'no IP address'),
                            ('PIF_HAS_NO_NETWORK_CONFIGURATION',
                             'pif-reconfigure-ip')):
            text = self.msg(code, 'OpaqueRef:pif')
            self.assertIn('PIF p-1 (eth1)', text)
            self.assertIn(words, text)
            self.assertIn('(xapi: %s)' % code, text)

    def test_other_refusals_of_xapi(self):
        self.assertIn('update first', self.msg(
            'NOT_SUPPORTED_DURING_UPGRADE'))
        self.assertIn("VDI 11-22 'data'", self.msg(
            'VDI_NEEDS_VM_FOR_MIGRATE', 'OpaqueRef:vdi'))
        self.assertIn('Copy mode is disallowed', self.msg(
            'OPERATION_NOT_ALLOWED', 'Copy mode is disallowed on intra '
            'pool storage migration'))
        text = self.msg('SR_DOES_NOT_SUPPORT_MIGRATION', 'OpaqueRef:sr',
                        'VDI_MIRROR;VDI_SNAPSHOT')
        self.assertIn('lacks VDI_MIRROR, VDI_SNAPSHOT', text)

    def test_host_disabled(self):
        self.assertIn('xe host-enable', self.msg('HOST_DISABLED',
                                                 'OpaqueRef:host'))

    def test_no_space(self):
        text = self.msg('SR_BACKEND_FAILURE_44', '', 'There is insufficient '
                        'space', '', cls=mig_errors.InsufficientSpace)
        self.assertIn('SR_BACKEND_FAILURE_44', text)
        self.assertIn('web-1', text)

    def test_chain_too_long(self):
        text = self.msg('SR_BACKEND_FAILURE_109', '', 'chain', '',
                        cls=mig_errors.ChainTooDeep)
        self.assertIn('delete snapshots', text)

    def test_licence(self):
        self.assertIn('licence does not allow', self.msg(
            'LICENCE_RESTRICTION', 'storage_motion'))

    def test_cpu(self):
        self.assertIn('CPU vendor', self.msg(
            'VM_INCOMPATIBLE_WITH_THIS_HOST', 'OpaqueRef:vm',
            'OpaqueRef:host', 'VM last booted on a CPU with features'))

    def test_unknown_code_keeps_everything(self):
        text = self.msg('SOMETHING_NEW', 'a', 'b')
        self.assertIn('SOMETHING_NEW a b', text)

    def test_cancelled(self):
        self.msg('TASK_CANCELLED', 'x', cls=mig_errors.MigrationAborted)


class TestPreflight(base.TestCase):

    def test_full_vdi_map(self):
        self.assertEqual({'a': 's1', 'b': 's2', 'sa': 's1', 'sb': 's9'},
                         preflight.full_vdi_map(
                             {'a': None, 'b': None},
                             {'sa': 'a', 'sb': 'b'},
                             {'a': 's1', 'b': 's2', 'sb': 's9'}))

    def test_orphan_snapshot_vdi_goes_to_the_default_sr(self):
        # xapi_vm_migrate.ml migrate_send': the destination's default SR
        self.assertEqual({'a': 's', 'old': 'dflt'}, preflight.full_vdi_map(
            {'a': None}, {'old': None}, {'a': 's'}, default_sr='dflt'))
        # with no default SR, xapi refuses it: VDI_NOT_IN_MAP
        exc = self.assertRaises(mig_errors.VDINotInMap,
                                preflight.full_vdi_map,
                                {'a': None}, {'old': None}, {'a': 's'})
        self.assertEqual(['old'], exc.kwargs['vdis'])

    def test_suspend_image_placement(self):
        self.assertEqual({'a': 's', 'susp': 'ssr'}, preflight.full_vdi_map(
            {'a': None}, {}, {'a': 's'}, default_sr='d', suspend=['susp'],
            suspend_sr='ssr'))
        self.assertEqual({'a': 's', 'susp': 'd'}, preflight.full_vdi_map(
            {'a': None}, {}, {'a': 's'}, default_sr='d', suspend=['susp']))

    def test_every_unmapped_disk_is_named(self):
        exc = self.assertRaises(mig_errors.VDINotInMap,
                                preflight.full_vdi_map,
                                {'a': None, 'b': None}, {'sb': 'b'}, {})
        self.assertEqual(['a', 'b', 'sb'], exc.kwargs['vdis'])

    def test_vifs_by_mac_and_within_pool(self):
        vifs = {'v1': {'device': '0', 'MAC': 'AA:BB'},
                'v2': {'device': '1', 'MAC': 'cc:dd'}}
        self.assertEqual({'v1': 'n', 'v2': 'm'}, preflight.resolve_vifs(
            vifs, {'aa:bb': 'n', '1': 'm'}, True))
        self.assertRaises(mig_errors.VIFNotInMap, preflight.resolve_vifs,
                          vifs, {'aa:bb': 'n'}, True)
        # within a pool xapi takes no VIF map at all: a VIF kept on its
        # network is dropped, a change refused
        self.assertEqual({}, preflight.intra_pool_vif_map(
            {'r1': 'n'}, {'r1': {'network': 'n', 'device': '0'}}))
        exc = self.assertRaises(errors.XenAPIError,
                                preflight.intra_pool_vif_map, {'r1': 'm'},
                                {'r1': {'network': 'n', 'device': '0'}})
        self.assertIn('OPERATION_NOT_ALLOWED', str(exc))
        self.assertIn('device 0', str(exc))

    def test_snapshot_vifs_follow_by_mac_or_are_named(self):
        vifs = {'v1': {'device': '0', 'MAC': 'aa:bb'}}
        snaps = {'s1': {'device': '0', 'MAC': 'AA:BB', 'snapshot': "'a'"},
                 's2': {'device': '1', 'MAC': 'ee:ff', 'snapshot': "'a'"}}
        exc = self.assertRaises(mig_errors.VIFNotInMap,
                                preflight.resolve_vifs, vifs, {'0': 'n'},
                                True, snaps)
        self.assertIn("s2 (of snapshot 'a', MAC ee:ff)", str(exc))
        self.assertEqual({'v1': 'n', 's1': 'n', 's2': 'm'},
                         preflight.resolve_vifs(
                             vifs, {'0': 'n', 'EE:FF': 'm'}, True, snaps))

    def test_space(self):
        sr = {'name_label': 'B', 'uuid': 'u', 'type': 'lvm',
              'physical_size': str(10 * GiB),
              'physical_utilisation': str(7 * GiB)}
        vdi = {'virtual_size': str(2 * GiB), 'physical_utilisation': '1'}
        self.assertEqual(2 * GiB, preflight.check_space(sr, [vdi]))
        exc = self.assertRaises(mig_errors.InsufficientSpace,
                                preflight.check_space, sr, [vdi, vdi])
        self.assertIn("SR 'B (uuid u)' needs 4.0 GiB", str(exc))
        # thin: what the VDI uses, plus headroom
        sr['type'] = 'nfs'
        self.assertEqual(65, preflight.check_space(sr, [
            {'virtual_size': str(GiB), 'physical_utilisation': '1'}], 64))

    def test_source_space(self):
        sr = {'type': 'ext', 'physical_size': '100',
              'physical_utilisation': '90'}
        preflight.check_source_space(sr, [{}], 10)
        self.assertRaises(errors.XenAPIError, preflight.check_source_space,
                          sr, [{}, {}], 10)

    def test_versions(self):
        old = {'software_version': {'platform_version': '3.2.1'}}
        new = {'software_version': {'platform_version': '3.10.0'}}
        preflight.check_versions(old, new)
        preflight.check_versions(new, new)
        self.assertRaises(errors.XenAPIError, preflight.check_versions,
                          new, old)

    def test_versions_xapi_build_and_xen_too(self):
        # helpers.ml Checks.Migration: platform_version, xapi_build, xen
        src = {'software_version': {'platform_version': '3.4.0',
                                    'xapi_build': '25.6.0',
                                    'xen': '4.17.5-20'}}
        for key, older in (('xapi_build', '25.5.9'), ('xen', '4.17.5-3'),
                           ('xen', '4.17.5')):
            dst = {'software_version': dict(src['software_version'],
                                            **{key: older})}
            exc = self.assertRaises(errors.XenAPIError,
                                    preflight.check_versions, src, dst)
            self.assertIn('VM_HOST_INCOMPATIBLE_VERSION_MIGRATE', str(exc))
            self.assertIn(key, str(exc))
            exc = self.assertRaises(errors.XenAPIError,
                                    preflight.check_versions, src, dst,
                                    cross_pool=False)
            self.assertIn('NOT_SUPPORTED_DURING_UPGRADE', str(exc))
        preflight.check_versions(src, {'software_version': dict(
            src['software_version'], xen='4.17.6-1')})

    def test_sr_features_not_allowed_operations(self):
        feats = preflight.sm_features({
            'r1': {'type': 'nfs', 'features': {'VDI_SNAPSHOT': '1',
                                               'VDI_MIRROR': '2'}},
            'r2': {'type': 'iso', 'features': {}}})
        busy = {'type': 'nfs', 'uuid': 'u', 'allowed_operations': []}
        preflight.check_sr_mirrors(busy, feats)
        preflight.check_sr_receives(busy, feats)
        exc = self.assertRaises(errors.XenAPIError,
                                preflight.check_sr_receives,
                                {'type': 'iso', 'uuid': 'i'}, feats)
        self.assertIn('VDI_SNAPSHOT, VDI_MIRROR_IN', str(exc))

    def test_copy_rules(self):
        running = {'power_state': 'Running', 'uuid': 'u'}
        halted = {'power_state': 'Halted', 'uuid': 'u'}
        preflight.check_copy(halted, True, False, True)
        preflight.check_copy(running, True, True, True)
        exc = self.assertRaises(errors.XenAPIError, preflight.check_copy,
                                running, True, False, True)
        self.assertIn('VM_BAD_POWER_STATE', str(exc))
        self.assertIn('force', str(exc))
        exc = self.assertRaises(errors.XenAPIError, preflight.check_copy,
                                halted, True, True, False)
        self.assertIn('OPERATION_NOT_ALLOWED', str(exc))

    def test_migration_network(self):
        host = {'uuid': 'h', 'name_label': 'xs-b1'}
        net = {'uuid': 'n', 'name_label': 'storage'}
        preflight.check_migration_network(host, net, [{'IP': '10.0.0.1'}])
        for pifs, code in (
                ([], 'HOST_CANNOT_ATTACH_NETWORK'),
                ([{'IP': '', 'ip_configuration_mode': 'None'}],
                 'PIF_HAS_NO_NETWORK_CONFIGURATION'),
                ([{'IP': '', 'ip_configuration_mode': 'DHCP'}],
                 'INTERFACE_HAS_NO_IP')):
            exc = self.assertRaises(errors.XenAPIError,
                                    preflight.check_migration_network,
                                    host, net, pifs)
            self.assertIn(code, str(exc))
            self.assertIn("xs-b1", str(exc))

    def test_power_states(self):
        # xapi_vm_lifecycle.ml: migrate_send in Halted, Suspended, Running
        self.assertTrue(preflight.live({'power_state': 'Running'}))
        self.assertFalse(preflight.live({'power_state': 'Halted'}))
        self.assertFalse(preflight.live({'power_state': 'Suspended'}))
        exc = self.assertRaises(errors.XenAPIError, preflight.live,
                                {'power_state': 'Paused', 'uuid': 'u'})
        self.assertIn('paused', str(exc))

    def test_resolve(self):
        recs = {'r1': {'uuid': 'u1', 'name_label': 'x'},
                'r2': {'uuid': 'u2', 'name_label': 'x'},
                'r3': {'uuid': 'u3', 'name_label': 'y'}}
        self.assertEqual('r2', preflight.resolve('SR', recs, 'u2'))
        self.assertEqual('r3', preflight.resolve('SR', recs, 'y'))
        exc = self.assertRaises(errors.XenAPIError, preflight.resolve,
                                'SR', recs, 'x')
        self.assertIn('u1, u2', str(exc))


class TestSlotQueue(base.TestCase):

    def test_first_come_first_served_per_key(self):
        q = engine.SlotQueue(1)
        never = threading.Event()
        self.assertTrue(q.acquire('h', 'a', never))
        order = []

        def take(token):
            q.acquire('h', token, never)
            order.append(token)
            q.release('h')

        threads = []
        for token in ('b', 'c'):
            t = threading.Thread(target=take, args=(token,))
            t.start()
            threads.append(t)
            self.wait_until(lambda: q.position('h', token) is not None)
        self.assertEqual(1, q.position('h', 'c'))
        # another key is not held up
        self.assertTrue(q.acquire('other', 'd', never))
        q.release('h')
        for t in threads:
            t.join(5)
        self.assertEqual(['b', 'c'], order)

    def test_cancel_leaves_the_queue(self):
        q = engine.SlotQueue(1)
        cancel = threading.Event()
        q.acquire('h', 'a', cancel)
        cancel.set()
        self.assertFalse(q.acquire('h', 'b', cancel))
        self.assertIsNone(q.position('h', 'b'))

    def wait_until(self, predicate):
        import time
        for _i in range(500):
            if predicate():
                return
            time.sleep(0.01)
        self.fail('timed out')


class TestPoolSpec(base.TestCase):

    def test_spec_without_a_name_is_refused_without_echo(self):
        exc = self.assertRaises(ValueError, session.parse_pool_spec,
                                ',https://x,root,topsecret')
        self.assertNotIn('topsecret', str(exc))
