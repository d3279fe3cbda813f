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

"""Fuzz target: the agent's RPC endpoints, with hostile arguments.

An input is one RPC call -- a method name and keyword arguments -- as
oslo.messaging delivers it to :class:`~xsm_driver.core.rpc.agent.
AgentEndpoint` after deserialisation: JSON values (``null``, booleans,
any integers, floats with NaN and infinities, strings, lists, objects
with string keys), argument names missing, unknown or extra. The call
goes through oslo.messaging's own ``RPCDispatcher`` into a fresh host
with a VHD and a raw SR and one halted VM. Checked:

* the call returns a value the RPC reply can carry (JSON), or raises
  only an expected error (an ``XSMError``, which oslo.messaging answers
  without a traceback) or oslo.messaging's NoSuchMethod for a method that
  does not exist;
* a call that failed started nothing and left nothing behind: no thread,
  no file in the SRs or the state folder, no VM record changed;
* whatever a call that succeeded started stops with the agent (VMs
  stopped, migrations and receives aborted): no thread outlives it.

``python -m tests.fuzz.rpc [libFuzzer args]`` runs it under
atheris.
"""

import atexit
import inspect
import json
import math
import os
import shutil
import tempfile
import threading

import oslo_messaging as messaging
from oslo_messaging.rpc import dispatcher as rpc_dispatcher

from tests.fuzz import common
from xsm_driver.core import exception
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.rpc import agent
from xsm_driver.core import sr as sr_mod

TARGET = 'rpc'
MiB = 1024 * 1024
TIME_LIMIT = 60.0
HOST = 'fuzz-host'
METHODS = sorted(name for name, func in vars(agent.AgentEndpoint).items()
                 if inspect.isfunction(func) and not name.startswith('_'))
PARAMETERS = {
    name: [p for p in inspect.signature(
        inspect.unwrap(getattr(agent.AgentEndpoint, name))).parameters
        if p not in ('self', 'context')]
    for name in METHODS}
UUID = '0f0e0d0c-0b0a-4908-8706-050403020100'
STRINGS = ('', 'sr1', 'sr2', 'vm1', HOST, 'other-host', UUID,
           UUID.upper(), '../../../tmp/xsm-fuzz-escape', '/etc/passwd',
           '.', 'a' * 5000, '\0', 'x\ny', '\udcff', 'base:allocation',
           'running', 'halted', 'copy', 'chunk', 'bandwidth', 'network',
           'id', 'vdis', 'vm', 'size', 'uuid', 'sr', 'name', 'disks')
NUMBERS = (0, 1, -1, 2, 512, 4096, 4 * MiB, 2 ** 31, 2 ** 32, 2 ** 63,
           2 ** 64, -2 ** 63, 10 ** 30, 0.5, -0.5, 1e-9, 1e308,
           math.nan, math.inf, -math.inf)


class _Incoming:
    """What RPCDispatcher.dispatch reads of an incoming message."""

    def __init__(self, method, args):
        self.ctxt = {}
        self.message = {'method': method, 'args': args, 'version': '1.0'}
        self.client_timeout = None


def deliver(value):
    """``value`` as the agent receives it: through JSON."""
    return json.loads(json.dumps(value))


class Call:
    """One host, agent endpoint and dispatcher, made for one call."""

    def __init__(self, root):
        self.dir = tempfile.mkdtemp(prefix='call-', dir=root)
        srs = {'sr1': sr_mod.load_driver('vhd', 'sr1',
                                         os.path.join(self.dir, 'sr1')),
               'sr2': sr_mod.load_driver('raw', 'sr2',
                                         os.path.join(self.dir, 'sr2'))}
        self.host = host_mod.Host(HOST, srs, os.path.join(self.dir, 'state'))
        self.vm = self.host.create_vm('vm1', [{'sr': 'sr1', 'size': 4 * MiB}],
                                      ['net0'])
        self.vdi = self.vm.disks[0].vdi
        self.manager = manager_mod.Manager(self.host)
        self.endpoint = agent.AgentEndpoint(self.manager)
        self.dispatcher = messaging.RPCDispatcher([self.endpoint], None)

    def templates(self, name):
        """Plausible values of the argument ``name`` (to be mutated)."""
        vdi_spec = {'uuid': self.vdi, 'size': 4 * MiB, 'allocated': 0,
                    'name': 'd', 'sr': 'sr2', 'mirror': False}
        spec = {'id': UUID, 'source_host': 'other-host', 'vm': None,
                'vif_map': {}, 'cross_pool': False, 'network': None,
                'vdis': [vdi_spec], 'client_ca_pem': 'not a PEM'}
        return {
            'vm': [self.vm.uuid, 'vm1'],
            'sr': ['sr1', 'sr2'],
            'name': ['vm2'],
            'disks': [[{'sr': 'sr1', 'size': 2 * MiB}],
                      [{'sr': 'sr2', 'size': 2 * MiB}] * 3],
            'vifs': [['net0']],
            'rate': [1000, None], 'read_ratio': [0.5], 'fill': [0.1],
            'dest_host': [HOST, 'other-host'],
            'vdi_map': [{self.vdi: 'sr2'}, {self.vdi: 'sr1'}],
            'vif_map': [{'net0': 'net0'}],
            'options': [{'bandwidth': 1}, {'copy': True},
                        {'chunk': 0}, {'depth': 0}, {'network': '::1'}],
            'vdi': [self.vdi],
            'dest_sr': ['sr2', 'sr1'],
            'migration': [UUID],
            'spec': [spec, dict(spec, vm=self.vm.to_dict(), cross_pool=True,
                                vif_map={'net0': 'net0'})],
            'vm_state': [{'vm': self.vm.to_dict(), 'power_state': 'running',
                          'workload': None}],
        }.get(name, [None])

    # -- values from bytes -------------------------------------------------

    def value(self, r, depth=0):
        kind = r.below(10)
        if kind == 0:
            return None
        if kind == 1:
            return bool(r.int(1) & 1)
        if kind == 2:
            return r.int(1) - 128
        if kind == 3:
            return r.choice(NUMBERS)
        if kind == 4:
            return r.take(r.below(24)).decode('utf-8', 'replace')
        if kind in (5, 6):
            return r.choice(STRINGS + (self.vm.uuid, self.vdi))
        if depth > 3:
            return None
        if kind == 7:
            return [self.value(r, depth + 1) for _ in range(r.below(4))]
        out = {}
        for _ in range(r.below(4)):
            out[r.choice(STRINGS)] = self.value(r, depth + 1)
        return out

    def mutate(self, r, value, depth=0):
        """``value`` with a part replaced, removed or added."""
        how = r.below(4)
        if how == 0 or depth > 3:
            return value
        if how == 1:
            return self.value(r)
        if isinstance(value, dict) and value:
            value = dict(value)
            key = r.choice(sorted(value))
            if how == 2:
                value[key] = self.mutate(r, value[key], depth + 1)
            else:
                del value[key]
                value[r.choice(STRINGS)] = self.value(r)
        elif isinstance(value, list) and value:
            value = list(value)
            i = r.below(len(value))
            value[i] = self.mutate(r, value[i], depth + 1)
        return value

    def decode(self, data):
        """(method, kwargs) of one input."""
        r = common.Reader(data)
        # (Not 'target': oslo.messaging reserves that attribute of every
        # endpoint, and calls it like a method when asked to.)
        method = r.choice(METHODS + ['no_such_method', '_private'])
        kwargs = {}
        # Zero bytes (an input's end) give the most plausible call.
        for name in PARAMETERS.get(method, []):
            how = r.below(8)
            if how == 7:
                continue                        # missing
            if how == 6:
                kwargs[name] = self.value(r)
            else:
                kwargs[name] = self.mutate(r, r.choice(self.templates(name)))
        if r.below(8) == 7:
            kwargs[r.choice(STRINGS) or 'extra'] = self.value(r)
        return method, deliver(kwargs)

    # -- state ---------------------------------------------------------------

    def files(self):
        """Files of the SRs and the state folder.

        Not the journal, nor an SR's lock file (made, empty, on first use).
        """
        out = {}
        for top, dirs, names in os.walk(self.dir):
            for name in names:
                if name.startswith('journal.sqlite') or name == '.lock':
                    continue
                path = os.path.join(top, name)
                with open(path, 'rb') as f:
                    out[os.path.relpath(path, self.dir)] = f.read()
        return out

    def state(self):
        return (self.files(), sorted(
            (uuid, json.dumps(vm.to_dict(), sort_keys=True))
            for uuid, vm in self.host.vms.items()), self.manager.active())

    def stop(self):
        """Stop what the call started, as the agent does when it stops."""
        self.manager.shutdown()
        for rcv in list(self.manager._receives.values()):
            rcv.abort()
        for vm in list(self.host.vms.values()):
            self.host.stop_vm(vm.uuid)
        self.host.journal.close()

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def call(root, method, kwargs):
    """Make the call in a fresh host; raise AssertionError on a failure."""
    baseline = {t.ident for t in threading.enumerate()}
    c = Call(root)
    try:
        check_call(c, method, kwargs, baseline)
    finally:
        c.close()


def _extra_threads(baseline):
    return sorted(t.name for t in threading.enumerate()
                  if t.ident not in baseline)


def check_call(c, method, kwargs, baseline):
    """The module's checks for one call in the :class:`Call` ``c``.

    :param baseline: idents of the threads that ran before ``c`` was made.
    """
    before = c.state()
    errors = common.error_log()
    mark = len(errors.records)
    what = '%s(%s)' % (method, ', '.join(
        '%s=%.60r' % kv for kv in sorted(kwargs.items())))
    failed = None
    try:
        with common.time_limit(TIME_LIMIT, what):
            result = c.dispatcher.dispatch(_Incoming(method, kwargs))
    except rpc_dispatcher.ExpectedException as exc:
        failed = exc.exc_info[1]
        assert isinstance(failed, exception.XSMError), (what, failed)
    except (rpc_dispatcher.NoSuchMethod,
            rpc_dispatcher.UnsupportedVersion) as exc:
        assert method not in METHODS, (what, exc)
        failed = exc
    else:
        assert not errors.since(mark), (what, errors.since(mark))
        try:
            json.dumps(result)
        except (TypeError, ValueError) as exc:
            raise AssertionError('%s returned %r, which no RPC reply can '
                                 'carry: %s' % (what, result, exc))
    if failed is not None:
        assert common.settle(lambda: not _extra_threads(baseline), 10), (
            '%s failed (%s) but left threads %s'
            % (what, failed, _extra_threads(baseline)))
        after = c.state()
        assert before == after, '%s failed (%s) but changed %s' % (
            what, failed, sorted(
                set(before[0].items()) ^ set(after[0].items()))[:4]
            if before[0] != after[0] else 'the VMs or migrations')
        assert not errors.since(mark), (what, errors.since(mark))
    c.stop()
    assert common.settle(lambda: not _extra_threads(baseline), 30), (
        '%s: threads %s outlive the agent' % (what,
                                              _extra_threads(baseline)))


_ROOT = []


def root():
    if not _ROOT:
        _ROOT.append(tempfile.mkdtemp(prefix='xsm-fuzz-rpc-'))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


def one_input(data):
    baseline = {t.ident for t in threading.enumerate()}
    c = Call(root())
    try:
        method, kwargs = c.decode(data)
        check_call(c, method, kwargs, baseline)
    finally:
        c.close()


if __name__ == '__main__':
    common.atheris_main(one_input)
