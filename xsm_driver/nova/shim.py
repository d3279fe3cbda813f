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

"""``xsm-nova-shim``: put ``nova/virt/xsm/__init__.py`` into nova.

nova-compute imports ``compute_driver`` only as ``nova.virt.<value>``, and
Nova has no entry point for drivers. Out-of-tree drivers therefore ship a
one-line module under ``nova/virt/`` that re-exports their class (as
nova-powervm's ``nova/virt/powervm_ext/driver.py`` did).

xsm-driver does not put a ``nova`` directory into its own wheel: a second
distribution owning files under nova's package is fragile (pip cannot tell
whose ``nova/virt/`` it is, an editable install of ours cannot provide it
at all, and a mistaken ``nova/__init__.py`` would replace nova's). Instead
this command writes the shim into the nova package it finds on the
``sys.path`` of the Python that runs it, once per installation of nova:

* ``xsm-nova-shim install`` -- write it (again: it is idempotent);
* ``xsm-nova-shim check`` -- exit 0 when it is there and current;
* ``xsm-nova-shim remove`` -- remove it.

Then ``compute_driver = xsm.XSMDriver`` in nova.conf. Reinstalling or
upgrading nova removes nova's directory tree: run ``install`` again.
"""

import argparse
import importlib.util
import os
import sys

SHIM_PACKAGE = 'xsm'

SHIM = '''\
# Installed by xsm-nova-shim (xsm-driver); do not edit. nova-compute loads
# compute_driver = xsm.XSMDriver as nova.virt.xsm.XSMDriver.
from xsm_driver.nova.driver import XSMDriver  # noqa: F401

__all__ = ['XSMDriver']
'''


def virt_dir():
    """The directory of the ``nova.virt`` package this Python imports."""
    spec = importlib.util.find_spec('nova')
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('nova is not installed for %s' % sys.executable)
    for location in spec.submodule_search_locations:
        path = os.path.join(location, 'virt')
        if os.path.isfile(os.path.join(path, '__init__.py')):
            return path
    raise RuntimeError('nova at %s has no virt package'
                       % ', '.join(spec.submodule_search_locations))


def shim_path(base=None):
    return os.path.join(base or virt_dir(), SHIM_PACKAGE, '__init__.py')


def is_installed(base=None):
    try:
        with open(shim_path(base)) as f:
            return f.read() == SHIM
    except OSError:
        return False


def install(base=None):
    """Write the shim (atomically); returns its path."""
    path = shim_path(base)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(SHIM)
    os.replace(tmp, path)
    return path


def remove(base=None):
    """Remove the shim package; returns its path."""
    path = shim_path(base)
    folder = os.path.dirname(path)
    for name in ('__init__.py', '__init__.py.tmp'):
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    cache = os.path.join(folder, '__pycache__')
    if os.path.isdir(cache):
        for name in os.listdir(cache):
            os.unlink(os.path.join(cache, name))
        os.rmdir(cache)
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        pass
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='xsm-nova-shim',
        description='Install nova/virt/xsm/__init__.py so that nova-compute '
                    'loads compute_driver = xsm.XSMDriver.')
    parser.add_argument('action', choices=('install', 'check', 'remove'))
    args = parser.parse_args(argv)
    try:
        if args.action == 'install':
            print('xsm-nova-shim: installed %s' % install())
        elif args.action == 'remove':
            print('xsm-nova-shim: removed %s' % remove())
        elif is_installed():
            print('xsm-nova-shim: %s is current' % shim_path())
        else:
            print('xsm-nova-shim: %s is missing or stale; run "xsm-nova-shim '
                  'install"' % shim_path(), file=sys.stderr)
            return 1
    except (OSError, RuntimeError) as exc:
        print('xsm-nova-shim: error: %s' % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
