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

"""A slow destination: the migration link is limited to 10 MB/s.

The guest writes as fast as it can -- faster than the link, which each
test measures first (on a machine too busy for that, the link is made
slower than the guest; the detail ``guest-rate-before`` says so). The
mirror is synchronous: every guest write waits until the destination has
it, so the guest slows down to what the link carries (shared with the
copy) and the migration converges whatever the write rate; nothing is
lost.

The completion timeout (``[xsm]completion_timeout`` and
``completion_timeout_action`` in nova.conf) belongs to the Nova driver:
neither the engine nor xsm-agent has one. Its monitor loop needs nova
(tested in ``nova_functional``); :class:`TestCompletionTimeout` makes the
same decisions with the same pure functions
(:mod:`xsm_driver.nova.decisions`) from those options, and checks what
the engine does with each action on the slow link: ``abort`` rolls back
cleanly, ``force_complete`` lifts the migration's bandwidth limit so that
it completes at the link's pace.
"""

import time

from oslo_config import cfg
from testtools import content

from tests.functional.faults import fixtures
from xsm_driver.conf import nova as nova_conf
from xsm_driver.nova import decisions

MiB = fixtures.MiB

#: the link: 10 MB/s each way
LINK = 10 * 1000 * 1000
#: bytes one guest write puts on the disk
WRITE = 4096


class SlowLinkTest(fixtures.NamespacedAgentsFixture):

    SIZE = 16 * MiB

    def make_busy_vm(self):
        """A VM whose guest writes as fast as it can; sets ``self.link``.

        The guest checks its reads only at the end (``read_ratio`` 0), to
        write faster. Its rate is measured (the best of three samples):
        the link is :data:`LINK`, or half that rate on a machine too busy
        for the guest to write faster than :data:`LINK` -- the test must
        have a guest faster than its link to show anything.
        """
        vm = self.a.vm_create('vm-%s' % self.token,
                              [{'sr': 'sr-a', 'size': self.SIZE}],
                              vifs=['net0'])
        self.a.vm_start(vm['uuid'])
        self.a.guest_start(vm['uuid'], rate=None, read_ratio=0, fill=1.0)
        self.a.vm_snapshot(vm['uuid'])
        rates = []
        for _ in range(3):
            w0, t0 = self.guest_writes(vm), time.monotonic()
            time.sleep(0.5)
            rates.append((self.guest_writes(vm) - w0) * WRITE /
                         (time.monotonic() - t0))
        rate = max(rates)
        self.link = LINK if rate > 1.5 * LINK else int(rate / 2)
        self.addDetail('guest-rate-before', content.text_content(
            '%.1f MB/s (best of %s); link %.1f MB/s' % (
                rate / 1e6, ', '.join('%.1f' % (r / 1e6) for r in rates),
                self.link / 1e6)))
        self.assertGreater(rate, self.link)
        return self.a.vm_get(vm['uuid'])

    def guest_writes(self, vm, client=None):
        guest = (client or self.a).vm_get(vm['uuid'])['guest']
        self.assertIsNone(guest['error'], self.logs())
        return guest['writes']

    def follow(self, mid, on_tick=None, timeout=120):
        """Poll the migration until it ends; its status and duration."""
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            status = self.a.migration_get(mid)
            if status.get('finished') is not None:
                return status, time.monotonic() - start
            if on_tick is not None:
                on_tick(status, time.monotonic() - start)
            time.sleep(0.1)
        self.fail('migration %s did not end within %s s%s'
                  % (mid, timeout, self.logs()))


class TestSlowDestination(SlowLinkTest):

    def test_the_mirror_converges_and_the_guest_slows_down(self):
        vm = self.make_busy_vm()
        self.net.shape(self.link)
        mid = self.migrate(vm)
        status, took = self.follow(mid)
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        writes = status['guest_writes_during_migration']
        rate = writes * WRITE / took
        self.addDetail('migration', content.text_content(
            '%.1f s, %d guest writes (%.2f MB/s), %d bytes copied, '
            'downtime %s ms' % (took, writes, rate / 1e6,
                                status['bytes_copied'],
                                status['downtime_ms'])))
        # the guest went on writing, each write held to the link's pace
        self.assertGreater(writes, 0)
        self.assertLess(rate, self.link)
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.image_files('a', 'sr-a'))
        self.assertEqual('running', self.b.vm_get(vm['uuid'])['power_state'])
        time.sleep(0.2)
        self.assert_guest_verifies(self.b, vm, self.SIZE)


class TestCompletionTimeout(SlowLinkTest):

    #: [xsm]completion_timeout: seconds per GiB, 2 GiB counted at least
    SECONDS_PER_GIB = 1
    #: [xsm]bandwidth_limit, MiB/s: the copy alone would take 16 s
    BANDWIDTH_MIB = 1

    def nova_options(self, action):
        conf = cfg.ConfigOpts()
        nova_conf.register_opts(conf)
        conf([], project='xsm-driver-test', default_config_files=[],
             default_config_dirs=[])
        conf.set_override('completion_timeout', self.SECONDS_PER_GIB, 'xsm')
        conf.set_override('completion_timeout_action', action, 'xsm')
        conf.set_override('bandwidth_limit', self.BANDWIDTH_MIB, 'xsm')
        return conf.xsm

    def migrate_with_timeout(self, vm, action):
        """Migrate on the slow link; take the timeout action when due.

        As the Nova driver's monitor: the timeout from the data to copy,
        the action once.

        :returns: the final status, the seconds after which the action
            was taken, and the total.
        """
        opts = self.nova_options(action)
        mid = self.migrate(vm, bandwidth=decisions.bandwidth(
            opts.bandwidth_limit))
        taken = []

        def on_tick(status, elapsed):
            total = decisions.progress(status.get('progress') or {})[0]
            timeout = decisions.completion_timeout(opts.completion_timeout,
                                                   total)
            if decisions.should_trigger_timeout_action(elapsed, timeout):
                todo = decisions.timeout_action(
                    opts.completion_timeout_action, bool(taken))
                if todo == 'abort':
                    self.a.migration_abort(mid)
                elif todo == 'force_complete':
                    self.a.migration_force_complete(mid)
                if todo is not None:
                    taken.append(elapsed)

        status, took = self.follow(mid, on_tick)
        self.assertEqual(1, len(taken), 'the timeout action was not taken')
        self.addDetail('migration-%s' % action, content.text_content(
            '%s after %.1f s, ended %s after %.1f s, %d of %d bytes copied'
            % (action, taken[0], status['phase'], took,
               status['bytes_copied'], status['progress']['total'])))
        return status, taken[0], took

    def test_timeout_aborts_or_forces_completion(self):
        """The same VM: first with the abort action, then force_complete."""
        vm = self.make_busy_vm()
        before_a = self.a.vdi_list()
        self.net.shape(self.link)
        status, _at, _took = self.migrate_with_timeout(vm, 'abort')
        self.assertEqual('aborted', status['phase'], self.logs())
        self.assertIn('cancelled by the operator', status['error'])
        self.assertLess(status['bytes_copied'], status['progress']['total'])
        self.assert_rolled_back(vm, before_a, self.SIZE)
        # force_complete: the guest writes on, as fast as it can
        self.a.guest_start(vm['uuid'], rate=None, read_ratio=0)
        status, _at, took = self.migrate_with_timeout(vm, 'force_complete')
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        # at the bandwidth limit alone the copy would have taken this long
        limited = status['progress']['total'] / (self.BANDWIDTH_MIB * MiB)
        self.assertLess(took, limited)
        self.assertEqual([], self.a.vm_list())
        self.assertEqual('running', self.b.vm_get(vm['uuid'])['power_state'])
        time.sleep(0.2)
        self.assert_guest_verifies(self.b, vm, self.SIZE)
