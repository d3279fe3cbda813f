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

"""A multi-process Nova deployment on this machine: tests and trials only.

Separate processes, as an operator runs them (all from .venv-nova):

* ``placement-api`` and ``nova-api`` under gunicorn (nova-api with
  :mod:`tests.nova_deployment.noauth` in place of keystonemiddleware:
  no Keystone, every caller is an administrator);
* ``nova-conductor`` and ``nova-scheduler`` (nova's stock services);
* two ``nova-compute`` (``nc-alpha``, ``nc-beta``) with ``compute_driver =
  xsm.XSMDriver``, each with its own ``host``, state folders and VHD SR;
  ``[xsm]agent = auto`` on RabbitMQ: each starts its host's ``xsm-agent``
  as a process of its own, which outlives nova-compute;
* a minimal image and network service (:mod:`tests.nova_deployment.stubs`)
  under gunicorn, which nova reaches with its real Glance and Neutron
  clients over HTTP;
* this machine's MariaDB (four databases of this deployment's own, named
  ``xsmdep_<pid>_<random>_*``) and RabbitMQ (a virtual host of its own,
  same name).

:meth:`Deployment.stop` stops every process it started and the agents,
drops the databases and deletes the virtual host; :func:`sweep` removes
what a deployment whose process died (SIGKILL) left in MariaDB and
RabbitMQ. ``python -m tests.nova_deployment.deployment`` (what
``tools/nova-deployment.sh`` runs) starts and stops one for a person.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
HOSTS = ('nc-alpha', 'nc-beta')
SR = 'local'
PREFIX = 'xsmdep_'
TRIAL_PREFIX = 'xsmtry_'
RABBIT = ('127.0.0.1', 5672)
MYSQL = ('127.0.0.1', 3306)
FLAVOR = 'xsm.small'
#: the flavor of QEMU guests (disk 0: the root disk is the image's size)
QEMU_FLAVOR = 'xsm.qemu'
#: a raw image of recognisable data, 2 MiB
IMAGE_ID = '8e6c2f0a-6b3e-4d2c-9a51-0c5e4a7b2d11'
IMAGE_NAME = 'xsm-raw'
IMAGE_DATA = b''.join(b'xsm-deployment-image block %08d\n' % i
                      for i in range((2 << 20) // 32))[:2 << 20]
#: a raw image of 1 MiB of zeros: downloaded and checked like any image,
#: it leaves the root disk as empty as the agent's model guest (which
#: verifies every block of its disks against what it wrote) needs
ZERO_IMAGE_ID = '3b0d7c52-91a4-4f6e-8c2d-5a7e1f09b634'
ZERO_IMAGE_NAME = 'xsm-zero'
MiB = 1 << 20
#: a raw image for QEMU guests, 16 MiB: a MiB of recognisable data, then
#: zeros (a flavor of disk 0 makes it the root disk's size, as in
#: tests/nova_functional/test_qemu_guests.py)
QEMU_IMAGE_ID = '5d2a9e7c-0f3b-4c1e-b6a8-2e9d4f7a1c03'
QEMU_IMAGE_NAME = 'xsm-qemu'
QEMU_IMAGE_DATA = IMAGE_DATA[:MiB] + bytes(15 * MiB)
#: the guest kit QEMU guests boot (tools/setup.sh builds it)
GUEST_KIT = os.environ.get('XSM_GUEST_KIT', os.path.join(TOP, '.guest-kit'))
QEMU = 'qemu-system-x86_64'
#: RAM of a QEMU guest (flavor QEMU_FLAVOR)
QEMU_MEMORY_MB = 128


class DeploymentError(Exception):
    """Something the deployment needs is missing or did not start."""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _reachable(address, timeout=1.0):
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def _pid_alive(pid):
    """Whether ``pid`` runs (a zombie, which has exited, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open('/proc/%d/stat' % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(')') + 2:][:1] != 'Z'


def problems(hypervisor='model'):
    """What this machine lacks for a deployment; [] when nothing."""
    found = []
    if hypervisor == 'qemu':
        from xsm_driver.testing import harness
        found += harness.qemu_guest_problems(GUEST_KIT, QEMU)
    if not _reachable(MYSQL):
        found.append('MariaDB is not reachable at %s:%d (root, empty '
                     'password)' % MYSQL)
    if not _reachable(RABBIT):
        found.append('RabbitMQ is not reachable at %s:%d' % RABBIT)
    if shutil.which('rabbitmqctl') is None:
        found.append('rabbitmqctl is not installed (it creates the '
                     'deployment\'s virtual host)')
    bindir = os.path.dirname(sys.executable)
    for tool in ('gunicorn', 'nova-compute', 'nova-manage',
                 'placement-manage', 'openstack'):
        if not os.path.exists(os.path.join(bindir, tool)):
            found.append('%s is not installed next to %s (run '
                         'tools/run-nova-deployment-tests.sh, which '
                         'installs tests/nova_deployment/requirements.txt '
                         'into .venv-nova)' % (tool, sys.executable))
    try:
        import nova.virt.xsm  # noqa: F401
    except ImportError:
        found.append('nova.virt.xsm is missing: run xsm-nova-shim install')
    return found


def _sql(statement):
    import pymysql
    conn = pymysql.connect(host=MYSQL[0], port=MYSQL[1], user='root',
                           password='', autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall()
    finally:
        conn.close()


def _rabbitmqctl(*args, check=True):
    proc = subprocess.run(['rabbitmqctl', '-q'] + list(args),
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        raise DeploymentError('rabbitmqctl %s: %s' % (
            ' '.join(args), (proc.stderr or proc.stdout).strip()))
    return proc.stdout


def _owner_pid(name):
    try:
        return int(name[len(PREFIX):].split('_')[0])
    except ValueError:
        return None


def sweep(log=print):
    """End what dead deployments left: processes, databases, vhosts.

    A name carries the pid of the process that made it (the databases and
    virtual host ``xsmdep_PID_*``, gunicorn's process titles, the
    temporary folder ``xsm-deployment-PID-*`` in every other process's
    command line); what belongs to a process that no longer runs is left
    over from a killed run.
    """
    me = os.getpid()
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == me:
            continue
        line = _cmdline(int(entry))
        for pattern in ('/xsm-deployment-', '[%s' % PREFIX, '-%s' % PREFIX):
            at = line.find(pattern)
            if at < 0:
                continue
            digits = line[at + len(pattern):].split('-')[0].split('_')[0]
            if digits.isdigit() and not _pid_alive(int(digits)):
                log('killing process %s of a dead deployment: %s'
                    % (entry, line[:120]))
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
    for (name,) in _sql('SHOW DATABASES'):
        pid = _owner_pid(name) if name.startswith(PREFIX) else None
        if pid is not None and not _pid_alive(pid):
            log('dropping database %s, left by process %d' % (name, pid))
            _sql('DROP DATABASE IF EXISTS `%s`' % name)
    for name in _rabbitmqctl('list_vhosts', 'name', check=False).split():
        pid = _owner_pid(name) if name.startswith(PREFIX) else None
        if pid is not None and not _pid_alive(pid):
            log('deleting RabbitMQ virtual host %s, left by process %d'
                % (name, pid))
            _rabbitmqctl('delete_vhost', name, check=False)


class Process:
    """One service of the deployment, in a session of its own."""

    def __init__(self, name, argv, log, env):
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.proc = None

    def start(self):
        with open(self.log, 'ab') as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=self.env, cwd=TOP,
                start_new_session=True)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Stop its process group; SIGKILL after ``timeout`` s.

        :returns: the seconds it took.
        """
        if self.proc is None:
            return 0.0
        start = time.monotonic()
        _kill_group(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        _kill_group(self.proc.pid, signal.SIGKILL)  # workers left behind
        self.proc = None
        return time.monotonic() - start


def _kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Deployment:
    """The deployment in folder ``root`` (made when None).

    :param bandwidth_limit: ``[xsm]bandwidth_limit`` of both computes
        (MiB/s; 0: none), so that a test can catch a migration running.
    :param log: called with a line of progress.
    :param hypervisor: ``[hypervisor]driver`` of both computes: ``model``
        (the agent's model guests) or ``qemu`` (each server a QEMU
        process, TCG, booting the guest kit: boot them with flavor
        :data:`QEMU_FLAVOR` and image :data:`QEMU_IMAGE_NAME`); see
        :meth:`switch_hypervisor`.
    """

    def __init__(self, root=None, bandwidth_limit=0, log=None,
                 prefix=PREFIX, hypervisor='model'):
        if hypervisor not in ('model', 'qemu'):
            raise DeploymentError('hypervisor must be model or qemu, not %r'
                                  % (hypervisor,))
        self.hypervisor = hypervisor
        # (a test's: the owner's pid in the folder's name too, see sweep)
        self.root = root or tempfile.mkdtemp(
            prefix='xsm-deployment-%d-' % os.getpid() if prefix == PREFIX
            else 'xsm-trial-')
        # PREFIX names carry the owner's pid (see sweep); a trial's
        # (TRIAL_PREFIX) outlives the command that started it
        self.name = '%s%d_%s' % (prefix, os.getpid(), secrets.token_hex(4))
        self.bandwidth_limit = bandwidth_limit
        self.log = log or (lambda line: None)
        self.bindir = os.path.dirname(sys.executable)
        self.etc = os.path.join(self.root, 'etc')
        self.logs = os.path.join(self.root, 'logs')
        self.ports = {}
        self.procs = {}
        #: xsm-agent processes :meth:`restart_agent` started
        self.agents = []
        self.databases = []
        self.vhost = None

    # -- layout -------------------------------------------------------------

    def db_url(self, db):
        return 'mysql+pymysql://root@%s:%d/%s?charset=utf8' % (
            MYSQL[0], MYSQL[1], db)

    @property
    def transport_url(self):
        return 'rabbit://guest:guest@%s:%d/%s' % (
            RABBIT[0], RABBIT[1], self.vhost or self.name)

    def url(self, service):
        port = self.ports[service]
        return {'nova-api': 'http://127.0.0.1:%d/v2.1' % port,
                'placement-api': 'http://127.0.0.1:%d' % port,
                'image': 'http://127.0.0.1:%d/image' % port,
                'network': 'http://127.0.0.1:%d/network' % port}[service]

    def host_dir(self, host, *parts):
        return os.path.join(self.root, host, *parts)

    def sr_path(self, host):
        return self.host_dir(host, 'sr')

    def xsm_state(self, host):
        return self.host_dir(host, 'xsm')

    def env(self):
        """The environment of the ``openstack`` client for this cloud."""
        return {'OS_CLIENT_CONFIG_FILE': os.path.join(self.root,
                                                      'clouds.yaml'),
                'OS_CLOUD': 'xsm-deployment'}

    def _proc_env(self, **extra):
        env = dict(os.environ)
        env.update(PYTHONPATH=TOP, OS_NOVA_DISABLE_EVENTLET_PATCHING='True',
                   PATH='%s:%s' % (self.bindir, env.get('PATH', '')))
        env.update(extra)
        return env

    # -- configuration -------------------------------------------------------

    def _keys(self):
        from xsm_driver.core.rpc import auth
        from xsm_driver.core.rpc import keys
        hosts = {}
        for host in HOSTS:
            key = keys.create_key_file(os.path.join(self.xsm_state(host),
                                                    keys.IDENTITY_FILE))
            hosts[host] = auth.public_text(key)
        self.operator_key = os.path.join(self.etc, 'operator.key')
        key = keys.create_key_file(self.operator_key)
        self.trusted_hosts = ','.join('%s:%s' % i for i in
                                      sorted(hosts.items()))
        self.trusted_operators = 'operator:%s' % auth.public_text(key)

    def _write(self, path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(text)
        return path

    def _xsm_client_lines(self):
        return ['trusted_hosts = %s' % self.trusted_hosts,
                'trusted_operators = %s' % self.trusted_operators,
                'operator_key_file = %s' % self.operator_key,
                'operator_name = operator']

    def write_config(self):
        placement = '\n'.join([
            '[DEFAULT]', 'debug = False', '',
            '[api]', 'auth_strategy = noauth2', '',
            '[placement_database]',
            'connection = %s' % self.db_url(self.name + '_placement'), ''])
        self._write(os.path.join(self.etc, 'placement', 'placement.conf'),
                    placement)
        paste = os.path.join(sys.prefix, 'etc', 'nova', 'api-paste.ini')
        with open(paste) as f:
            text = f.read()
        # keystonemiddleware's authtoken -> the test filter (no Keystone)
        text = text.replace(
            'paste.filter_factory = keystonemiddleware.auth_token:'
            'filter_factory',
            '# tests and trials only: no authentication at all\n'
            'paste.filter_factory = tests.nova_deployment.noauth:'
            'filter_factory')
        if 'tests.nova_deployment.noauth' not in text:
            raise DeploymentError('%s has no authtoken filter to replace'
                                  % paste)
        self._write(os.path.join(self.etc, 'nova', 'api-paste.ini'), text)
        nova = [
            '[DEFAULT]', 'debug = True',
            'transport_url = %s' % self.transport_url,
            'state_path = %s' % os.path.join(self.root, 'nova'),
            'my_ip = 127.0.0.1',
            'compute_driver = xsm.XSMDriver',
            'report_interval = 5',
            'graceful_shutdown_timeout = 30',
            'instance_name_template = instance-%08x',
            '',
            '[api]', 'response_validation = error', '',
            '[wsgi]', 'api_paste_config = %s' % os.path.join(
                self.etc, 'nova', 'api-paste.ini'), '',
            '[placement]', 'auth_type = admin_token', 'token = admin:admin',
            'endpoint = %s' % self.url('placement-api'),
            'endpoint_override = %s' % self.url('placement-api'), '',
            '[glance]', 'endpoint_override = %s' % self.url('image'),
            'num_retries = 1', '',
            '[neutron]', 'auth_type = admin_token', 'token = admin:admin',
            'endpoint = %s' % self.url('network'),
            'endpoint_override = %s' % self.url('network'), '',
            '[scheduler]', 'discover_hosts_in_cells_interval = 2',
            'workers = 1', '',
            '[conductor]', 'workers = 1', '',
            '[vnc]', 'enabled = False', '',
            '[oslo_concurrency]', 'lock_path = %s' % os.path.join(
                self.root, 'nova', 'locks'), '',
            '[xsm]', 'agent = auto', 'progress_interval = 0.5',
            'leaf_headroom_mb = 8', 'rpc_timeout = 60',
            'bandwidth_limit = %d' % self.bandwidth_limit,
        ] + self._xsm_client_lines()
        if self.hypervisor == 'qemu':
            # (nova-compute passes [hypervisor] to the agent it starts)
            nova += ['', '[hypervisor]', 'driver = qemu', 'accel = tcg',
                     'guest_kit = %s' % GUEST_KIT,
                     'default_memory_mib = %d' % QEMU_MEMORY_MB,
                     'shutdown_timeout = 15']
        self._write(os.path.join(self.etc, 'nova', 'nova.conf'),
                    '\n'.join(nova) + '\n')
        # the databases: for every service but nova-compute
        self._write(os.path.join(self.etc, 'nova', 'nova-db.conf'),
                    '\n'.join([
                        '[api_database]', 'connection = %s' % self.db_url(
                            self.name + '_nova_api'), '',
                        '[database]', 'connection = %s' % self.db_url(
                            self.name + '_nova'), '']))
        for host in HOSTS:
            self._write(os.path.join(self.etc, 'nova', '%s.conf' % host),
                        '\n'.join([
                            '[DEFAULT]', 'host = %s' % host,
                            'state_path = %s' % self.host_dir(host, 'nova'),
                            'instances_path = %s' % self.host_dir(
                                host, 'instances'), '',
                            '[xsm]',
                            'state_path = %s' % self.xsm_state(host),
                            'sr_repositories = %s:vhd:%s' % (
                                SR, self.sr_path(host)), '']))
            for path in (self.sr_path(host), self.host_dir(host, 'nova'),
                         self.host_dir(host, 'instances')):
                os.makedirs(path, exist_ok=True)
        os.makedirs(os.path.join(self.root, 'nova', 'locks'), exist_ok=True)
        # what the test (or a person) reaches the agents with
        self._write(os.path.join(self.etc, 'xsm-client.conf'), '\n'.join([
            '[DEFAULT]', 'transport_url = %s' % self.transport_url,
            'control_exchange = nova', '', '[xsm]'] +
            self._xsm_client_lines() + ['']))
        self._write(os.path.join(self.root, 'clouds.yaml'), '\n'.join([
            'clouds:', '  xsm-deployment:', '    auth_type: none',
            '    auth:', '      endpoint: %s' % self.url('nova-api'),
            '    compute_endpoint_override: %s' % self.url('nova-api'),
            '    image_endpoint_override: %s' % self.url('image'),
            '    network_endpoint_override: %s' % self.url('network'),
            '    placement_endpoint_override: %s'
            % self.url('placement-api'), '']))

    # -- life cycle ---------------------------------------------------------

    def _run(self, name, *argv, timeout=300):
        """Run a command to its end; its output goes to logs/NAME.log."""
        path = os.path.join(self.logs, '%s.log' % name)
        with open(path, 'ab') as out:
            proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT,
                                  env=self._proc_env(), cwd=TOP,
                                  timeout=timeout)
        if proc.returncode:
            raise DeploymentError('%s failed (status %d); see %s' % (
                ' '.join(argv), proc.returncode, path))

    def _run_all(self, commands, timeout=600):
        """Run commands side by side; each one's output in logs/NAME.log."""
        running = []
        for name, argv in commands:
            with open(os.path.join(self.logs, '%s.log' % name), 'ab') as out:
                running.append((name, argv, subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, env=self._proc_env(),
                    cwd=TOP)))
        failed = []
        for name, argv, proc in running:
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            if rc:
                failed.append('%s (status %d; see %s/%s.log)' % (
                    ' '.join(argv[-3:]), rc, self.logs, name))
        if failed:
            raise DeploymentError('failed: %s' % ', '.join(failed))

    def _nova_manage(self, *args):
        self._run('nova-manage', os.path.join(self.bindir, 'nova-manage'),
                  '--config-file', os.path.join(self.etc, 'nova',
                                                'nova.conf'),
                  '--config-file', os.path.join(self.etc, 'nova',
                                                'nova-db.conf'), *args)

    def _spawn(self, name, argv, **env):
        proc = Process(name, argv, os.path.join(self.logs, '%s.log' % name),
                       self._proc_env(**env)).start()
        self.procs[name] = proc
        self._save()
        self.log('started %s (pid %d)' % (name, proc.pid))
        return proc

    def _gunicorn(self, name, app, **env):
        return self._spawn(name, [
            os.path.join(self.bindir, 'gunicorn'), '--bind',
            '127.0.0.1:%d' % self.ports[name], '--workers', '1',
            '--worker-class', 'gthread', '--threads', '8', '--timeout',
            '300', '--graceful-timeout', '10',
            # (gunicorn's 2 s keep-alive is the poll interval of
            # "openstack ... --wait": the server closed the idle
            # connection as the client sent on it, RemoteDisconnected)
            '--keep-alive', '75', '--access-logfile', '-',
            '--no-control-socket', '--name', '%s-%s' % (name, self.name),
            app], **env)

    def _service(self, name, binary, *conf):
        files = [os.path.join(self.etc, 'nova', 'nova.conf')] + list(conf)
        argv = [os.path.join(self.bindir, binary)]
        for path in files:
            argv += ['--config-file', path]
        argv += ['--log-file', os.path.join(self.logs, '%s.log' % name)]
        return self._spawn(name, argv)

    def start_compute(self, host):
        return self._service(host, 'nova-compute', os.path.join(
            self.etc, 'nova', '%s.conf' % host))

    def stop_compute(self, host, sig=signal.SIGTERM):
        """Stop nova-compute ``host``; the seconds it took."""
        if host not in self.procs:
            raise DeploymentError('nova-compute %s does not run' % host)
        took = self.procs.pop(host).stop(sig)
        self._save()
        return took

    def start(self):
        missing = problems(self.hypervisor)
        if missing:
            raise DeploymentError('; '.join(missing))
        os.makedirs(self.logs, exist_ok=True)
        t0 = time.monotonic()
        sweep(self.log)
        for name in ('nova-api', 'placement-api', 'stubs'):
            self.ports[name] = _free_port()
        self.ports['image'] = self.ports['network'] = self.ports['stubs']
        self.vhost = self.name
        _rabbitmqctl('add_vhost', self.vhost)
        self._save()
        _rabbitmqctl('set_permissions', '-p', self.vhost, 'guest', '.*',
                     '.*', '.*')
        for suffix in ('placement', 'nova_api', 'nova_cell0', 'nova'):
            db = '%s_%s' % (self.name, suffix)
            _sql('CREATE DATABASE `%s` CHARACTER SET utf8' % db)
            self.databases.append(db)
            self._save()
        self.log('MariaDB databases %s_*, RabbitMQ virtual host %s'
                 % (self.name, self.vhost))
        self._keys()
        self.write_config()
        from tests.nova_deployment import stubs
        stubs.add_image(os.path.join(self.root, 'images'), IMAGE_ID,
                        IMAGE_NAME, IMAGE_DATA)
        stubs.add_image(os.path.join(self.root, 'images'), ZERO_IMAGE_ID,
                        ZERO_IMAGE_NAME, bytes(MiB))
        stubs.add_image(os.path.join(self.root, 'images'), QEMU_IMAGE_ID,
                        QEMU_IMAGE_NAME, QEMU_IMAGE_DATA)
        # the schemas, side by side: placement's, nova's API database and
        # both cells' (each alone: "db sync --local_cell"), then the cells
        cell0 = self._write(os.path.join(self.etc, 'nova', 'cell0.conf'),
                            '[database]\nconnection = %s\n' % self.db_url(
                                self.name + '_nova_cell0'))
        manage = os.path.join(self.bindir, 'nova-manage')
        nova_conf = ['--config-file', os.path.join(self.etc, 'nova',
                                                   'nova.conf'),
                     '--config-file', os.path.join(self.etc, 'nova',
                                                   'nova-db.conf')]
        self._run_all([
            ('placement-manage', [
                os.path.join(self.bindir, 'placement-manage'),
                '--config-file', os.path.join(self.etc, 'placement',
                                              'placement.conf'),
                'db', 'sync']),
            ('nova-manage-api', [manage] + nova_conf + ['api_db', 'sync']),
            ('nova-manage-cell0', [manage] + nova_conf + [
                '--config-file', cell0, 'db', 'sync', '--local_cell']),
            ('nova-manage-cell1', [manage] + nova_conf + [
                'db', 'sync', '--local_cell'])])
        self._nova_manage('cell_v2', 'map_cell0', '--database_connection',
                          self.db_url(self.name + '_nova_cell0'))
        self._nova_manage('cell_v2', 'create_cell', '--name', 'cell1')
        self.log('databases ready (%.0f s)' % (time.monotonic() - t0))
        self._gunicorn('stubs', 'tests.nova_deployment.stubs:application',
                       XSM_STUB_IMAGES=os.path.join(self.root, 'images'))
        self._gunicorn('placement-api', 'placement.wsgi.api:application',
                       OS_PLACEMENT_CONFIG_DIR=os.path.join(self.etc,
                                                            'placement'))
        self._gunicorn('nova-api',
                       'tests.nova_deployment.wsgi_nova:application',
                       OS_NOVA_CONFIG_DIR=os.path.join(self.etc, 'nova'),
                       OS_NOVA_CONFIG_FILES='api-paste.ini;nova.conf;'
                                            'nova-db.conf')
        db_conf = os.path.join(self.etc, 'nova', 'nova-db.conf')
        self._service('nova-conductor', 'nova-conductor', db_conf)
        self._service('nova-scheduler', 'nova-scheduler', db_conf)
        for host in HOSTS:
            self.start_compute(host)
        self.wait_ready()
        self.log('deployment up in %.0f s' % (time.monotonic() - t0))
        return self

    def check_running(self):
        """Fail when a service of the deployment exited."""
        dead = ['%s (status %s; see %s)' % (name, p.proc.returncode, p.log)
                for name, p in self.procs.items() if not p.running()]
        if dead:
            raise DeploymentError('exited: %s' % ', '.join(dead))

    def wait_for(self, what, predicate, timeout=180, interval=1.0):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            self.check_running()
            try:
                value = predicate()
                if value:
                    return value
            except AssertionError:          # a test's check failed
                raise
            except Exception as exc:        # not up yet: keep asking
                last = exc
            if time.monotonic() > deadline:
                raise DeploymentError('timed out after %d s waiting for %s%s'
                                      % (timeout, what, ' (last error: %s)'
                                         % last if last else ''))
            time.sleep(interval)

    def wait_ready(self, timeout=300):
        import requests
        for name, path in (('stubs', '/image/v2/images'),
                           ('placement-api', '/'), ('nova-api', '/')):
            url = 'http://127.0.0.1:%d%s' % (self.ports[name], path)
            self.wait_for('%s at %s' % (name, url),
                          lambda: requests.get(url, timeout=10).status_code
                          < 500, timeout)
        self.wait_computes_up(timeout)
        # (not "openstack flavor create": it asks Keystone for projects)
        self.flavors = {}
        for name, ram, disk in ((FLAVOR, 256, 1),
                                (QEMU_FLAVOR, QEMU_MEMORY_MB, 0)):
            resp = requests.post(self.url('nova-api') + '/flavors', json={
                'flavor': {'name': name, 'ram': ram, 'vcpus': 1,
                           'disk': disk}}, timeout=60)
            if resp.status_code != 200:
                raise DeploymentError('POST /flavors: %s %s' % (
                    resp.status_code, resp.text))
            self.flavors[name] = resp.json()['flavor']
        self.flavor = self.flavors[FLAVOR]

    def wait_computes_up(self, timeout=300):
        import requests

        def computes_up():
            services = self.openstack('compute', 'service', 'list',
                                      '--service', 'nova-compute')
            up = {s['Host'] for s in services
                  if s['State'] == 'up' and s['Status'] == 'enabled'}
            # (not "openstack hypervisor list": at 2.88 and later nova-api
            # asks each compute its uptime, which this driver does not
            # implement: an ERROR in nova-compute's log each time)
            resp = requests.get(self.url('nova-api') + '/os-hypervisors',
                                headers={'OpenStack-API-Version':
                                         'compute 2.53'}, timeout=60)
            hypervisors = {h['hypervisor_hostname'] for h in
                           resp.json()['hypervisors'] if h['state'] == 'up'}
            return set(HOSTS) <= up and set(HOSTS) <= hypervisors
        self.wait_for('both nova-compute services up, with hypervisors',
                      computes_up, timeout, interval=2)

    def switch_hypervisor(self, hypervisor, timeout=300):
        """Run both computes with another ``[hypervisor]driver``.

        Stops both nova-compute and both xsm-agents, writes nova.conf with
        the new ``[hypervisor]``, starts both nova-compute again (each
        starts a new agent with it) and waits until both agents answer
        and both services are up. (For a deployment with no server left:
        an agent that stops leaves its QEMU guests running, and the new
        driver would not know them.)
        """
        if hypervisor not in ('model', 'qemu'):
            raise DeploymentError('hypervisor must be model or qemu, not %r'
                                  % (hypervisor,))
        for host in HOSTS:
            if host in self.procs:
                self.stop_compute(host)
        old = {host: self.agent_pid(host) for host in HOSTS}
        found = _stop_by_pid_files(self.root, self.log)
        for proc in self.agents:
            proc.poll()
        self.agents = []
        if found:
            raise DeploymentError('; '.join(found))
        self.hypervisor = hypervisor
        self.write_config()
        for host in HOSTS:
            self.start_compute(host)

        def new_agents():
            for host in HOSTS:
                pid = self.agent_pid(host)
                if pid is None or pid == old[host] or not _pid_alive(pid):
                    return False
                self.agent_api(host, timeout=5).host_info()
            return True
        self.wait_for('new xsm-agents of both computes', new_agents,
                      timeout)
        self.wait_computes_up(timeout)
        self.log('computes run %s guests' % hypervisor)

    def openstack(self, *args, parse=True, check=True, timeout=120):
        """Run the ``openstack`` client; its JSON output, parsed.

        :raises DeploymentError: when it fails and ``check``.
        """
        argv = [os.path.join(self.bindir, 'openstack')] + list(args)
        if parse:
            argv += ['-f', 'json']
        env = dict(os.environ, **self.env())
        env.pop('OS_AUTH_URL', None)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=self.root)
        if proc.returncode:
            if not check:
                return proc
            raise DeploymentError('openstack %s: status %d: %s' % (
                ' '.join(args), proc.returncode,
                (proc.stderr.strip() or proc.stdout.strip())[-2000:]))
        if not check:
            return proc
        return json.loads(proc.stdout) if parse and proc.stdout.strip() \
            else proc.stdout

    def agent_api(self, host, timeout=60):
        """The RPC client of ``host``'s xsm agent, as the operator."""
        from oslo_config import cfg

        from xsm_driver.conf import nova as xsm_nova_conf
        from xsm_driver.core.rpc import api as rpc_api
        from xsm_driver.core.rpc import keys
        if not hasattr(self, '_client_conf'):
            conf = cfg.ConfigOpts()
            xsm_nova_conf.register_opts(conf)
            conf(['--config-file', os.path.join(self.etc, 'xsm-client.conf')],
                 project='xsm-deployment', default_config_files=[],
                 default_config_dirs=[])
            self._client_conf = conf
            self._transport = rpc_api.get_transport(conf)
        conf = self._client_conf
        return rpc_api.AgentAPI(self._transport, host, timeout=timeout,
                                credential=keys.operator_credential(conf.xsm),
                                trust=keys.trust(conf.xsm))

    def agent_pid(self, host):
        try:
            with open(os.path.join(self.xsm_state(host),
                                   'xsm-agent.pid')) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def restart_agent(self, host, timeout=120):
        """Stop ``host``'s xsm-agent (SIGTERM) and start it again.

        As an operator restarts (or upgrades) the agent: the same command
        and configuration file nova-compute started it with, a session of
        its own, its pid in the pid file nova-compute reads. Its QEMU
        guests run on meanwhile; the new agent adopts them.

        :returns: ``(seconds the old one took to stop, seconds until the
            new one answered)``.
        """
        state = self.xsm_state(host)
        pid = self.agent_pid(host)
        if pid is None or not _pid_alive(pid) or \
                self.root not in _cmdline(pid):
            raise DeploymentError('xsm-agent of %s does not run (pid file '
                                  '%s)' % (host, pid))
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while _pid_alive(pid):
            if time.monotonic() - t0 > 30:
                raise DeploymentError('xsm-agent %d of %s ignored SIGTERM '
                                      'for 30 s' % (pid, host))
            time.sleep(0.1)
        stopped = time.monotonic() - t0
        t1 = time.monotonic()
        with open(os.path.join(state, 'xsm-agent.log'), 'ab') as log:
            proc = subprocess.Popen(
                [sys.executable, '-m', 'xsm_driver.cmd.agent',
                 '--config-file', os.path.join(state, 'xsm-agent.conf')],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=self._proc_env(), cwd=TOP, start_new_session=True)
        with open(os.path.join(state, 'xsm-agent.pid'), 'w') as f:
            f.write('%d\n' % proc.pid)
        self.log('restarted xsm-agent of %s: pid %d -> %d'
                 % (host, pid, proc.pid))

        def answers():
            if proc.poll() is not None:
                raise DeploymentError('the new xsm-agent of %s exited with '
                                      'status %s; see %s/xsm-agent.log'
                                      % (host, proc.returncode, state))
            return self.agent_api(host, timeout=5).host_info()
        self.wait_for('the new xsm-agent of %s to answer' % host, answers,
                      timeout)
        # (it runs on its own, like the one nova-compute started; the
        # deployment's stop ends it by its pid file and reaps it here)
        self.agents.append(proc)
        return stopped, time.monotonic() - t1

    def guest_folder(self, host, vm_uuid):
        """The folder of the QEMU guest of VM ``vm_uuid`` on ``host``."""
        return os.path.join(self.xsm_state(host), 'guests', vm_uuid)

    def qemu_process(self, host, vm_uuid):
        """``(pid, start time)`` of the VM's QEMU, from its pid file.

        None when the pid file is missing or names no running QEMU of
        that folder; the start time is field 22 of ``/proc/PID/stat``
        (clock ticks since boot): a pid used again has another.
        """
        folder = self.guest_folder(host, vm_uuid)
        try:
            with open(os.path.join(folder, 'qemu.pid')) as f:
                pid = int(f.read().strip())
            with open('/proc/%d/stat' % pid) as f:
                stat = f.read()
        except (OSError, ValueError):
            return None
        if folder + '/' not in _cmdline(pid):
            return None
        # (the command name, field 2, is in parentheses and may hold
        # spaces: count from the last one)
        return pid, int(stat[stat.rindex(')') + 2:].split()[19])

    def _save(self):
        """What :func:`stop_saved` needs to end it from another process."""
        state = {'name': self.name, 'root': self.root, 'vhost': self.vhost,
                 'databases': self.databases, 'ports': self.ports,
                 'pids': {n: p.pid for n, p in self.procs.items() if p.pid}}
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, 'deployment.json'), 'w') as f:
            json.dump(state, f, indent=1)

    def stop(self, remove=True):
        """Stop everything, drop the databases and the virtual host.

        Never raises: it goes on through every step and returns the
        problems it met (lines).
        """
        found = []
        transport = getattr(self, '_transport', None)
        if transport is not None:
            try:
                transport.cleanup()
            except Exception as exc:
                found.append('RPC transport cleanup: %s' % exc)
            self._transport = None
        # the computes first (their agents after), the API last
        order = [h for h in HOSTS if h in self.procs] + [
            n for n in ('nova-scheduler', 'nova-conductor', 'nova-api',
                        'placement-api', 'stubs') if n in self.procs]
        for name in order:
            try:
                took = self.procs.pop(name).stop()
                self.log('stopped %s (%.1f s)' % (name, took))
            except Exception as exc:
                found.append('stopping %s: %s' % (name, exc))
        found += _stop_by_pid_files(self.root, self.log)
        for proc in self.agents:
            proc.poll()                     # (stopped: reaped)
        self.agents = []
        found += _kill_strays(self.root, self.log, self.name)
        found += _drop(self.databases, self.vhost, self.log)
        self.databases, self.vhost = [], None
        if remove and not found:
            shutil.rmtree(self.root, ignore_errors=True)
        return found


def _stop_by_pid_files(root, log):
    """SIGTERM, then SIGKILL, every xsm-agent of the deployment."""
    found = []
    for host in HOSTS:
        path = os.path.join(root, host, 'xsm', 'xsm-agent.pid')
        try:
            with open(path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid) or root not in _cmdline(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(pid):
            found.append('xsm-agent %d of %s ignored SIGTERM' % (pid, host))
            _kill_group(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        log('stopped xsm-agent of %s (pid %d)' % (host, pid))
    return found


def _cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def _kill_strays(root, log, name):
    """Kill what still runs with this deployment's folder in its command.

    (Processes the deployment's services started -- a QEMU guest, an
    agent whose pid file is gone -- name files of ``root``, and gunicorn
    names its processes after the deployment's ``name``; no other process
    does: ``root`` is a fresh temporary folder, ``name`` has a random
    part.)
    """
    found = []
    me = os.getpid()
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        line = _cmdline(pid)
        if root + '/' in line or '-%s]' % name in line:
            found.append('killed a stray process %d: %s' % (pid, line[:200]))
            log(found[-1])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return [f for f in found if 'xsm-agent' not in f and 'qemu' not in f]


def _drop(databases, vhost, log):
    found = []
    for db in databases:
        try:
            _sql('DROP DATABASE IF EXISTS `%s`' % db)
        except Exception as exc:
            found.append('dropping database %s: %s' % (db, exc))
    if databases:
        log('dropped databases %s' % ', '.join(databases))
    if vhost:
        try:
            _rabbitmqctl('delete_vhost', vhost)
            log('deleted RabbitMQ virtual host %s' % vhost)
        except Exception as exc:
            found.append('deleting virtual host %s: %s' % (vhost, exc))
    return found


def stop_saved(root, log=print):
    """End the deployment described by ``root``/deployment.json."""
    with open(os.path.join(root, 'deployment.json')) as f:
        state = json.load(f)
    found = []
    for name, pid in sorted(state['pids'].items()):
        line = _cmdline(pid)
        # (gunicorn names its processes after the deployment)
        if _pid_alive(pid) and (root in line or state['name'] in line):
            _kill_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            _kill_group(pid, signal.SIGKILL)
            log('stopped %s (pid %d)' % (name, pid))
    found += _stop_by_pid_files(root, log)
    found += _kill_strays(root, log, state['name'])
    found += _drop(state['databases'], state['vhost'], log)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='nova-deployment',
        description='A multi-process Nova deployment with two xsm computes '
                    'on this machine, without Keystone: for tests and '
                    'trials only.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('start', help='start one; print how to use it')
    p.add_argument('--root', help='its folder (default: a new temporary '
                   'one)')
    p.add_argument('--bandwidth-limit', type=int, default=0,
                   help='[xsm]bandwidth_limit of the computes, MiB/s')
    p.add_argument('--hypervisor', choices=('model', 'qemu'),
                   default='model', help='[hypervisor]driver of the '
                   'computes: model guests, or QEMU guests (TCG) booting '
                   'the guest kit (default: model)')
    p = sub.add_parser('stop', help='stop one, drop its databases and '
                       'virtual host, remove its folder')
    p.add_argument('root', help='its folder')
    args = parser.parse_args(argv)
    if args.command == 'stop':
        try:
            found = stop_saved(os.path.abspath(args.root))
        except (OSError, ValueError) as exc:
            print('nova-deployment: error: %s' % exc, file=sys.stderr)
            return 2
        for line in found:
            print('problem: %s' % line, file=sys.stderr)
        if not found:
            shutil.rmtree(os.path.abspath(args.root), ignore_errors=True)
        return 1 if found else 0
    if args.root and os.path.exists(os.path.join(args.root,
                                                 'deployment.json')):
        print('nova-deployment: error: %s holds a deployment already; stop '
              'it first' % args.root, file=sys.stderr)
        return 2
    dep = Deployment(os.path.abspath(args.root) if args.root else None,
                     bandwidth_limit=args.bandwidth_limit, log=print,
                     prefix=TRIAL_PREFIX, hypervisor=args.hypervisor)
    try:
        dep.start()
    except Exception as exc:
        print('nova-deployment: error: %s' % exc, file=sys.stderr)
        print('logs kept in %s; cleaning up' % dep.logs, file=sys.stderr)
        for line in dep.stop(remove=False):
            print('problem: %s' % line, file=sys.stderr)
        return 1
    for proc in dep.procs.values():     # they outlive this command
        proc.proc = None
    env = dict(dep.env(), PATH='%s:$PATH' % dep.bindir)
    print()
    print('The deployment runs (no Keystone: every caller is an admin; '
          'tests and trials only).')
    print('  export %s' % ' '.join('%s=%s' % i for i in sorted(env.items())))
    print('  openstack server create --flavor %s --image %s --nic none '
          '--wait vm1' % ((QEMU_FLAVOR, QEMU_IMAGE_NAME)
                          if dep.hypervisor == 'qemu' else
                          (FLAVOR, IMAGE_NAME)))
    if dep.hypervisor == 'qemu':
        print('  openstack console log show vm1')
    print('  openstack --os-compute-api-version 2.30 server migrate '
          '--live-migration --block-migration --host nc-beta --wait vm1')
    print('  curl -s -H "OpenStack-API-Version: compute latest" '
          '%s/servers/ID/migrations' % dep.url('nova-api'))
    print('("openstack server migration list" and "flavor create" ask '
          'Keystone, which this deployment has not)')
    print('nova-api: %s   placement: %s' % (dep.url('nova-api'),
                                            dep.url('placement-api')))
    print('logs: %s, and xsm-agent.log in %s' % (dep.logs, ', '.join(
        dep.xsm_state(h) for h in HOSTS)))
    print('the agents, as the operator: %s (transport, key)' % os.path.join(
        dep.etc, 'xsm-client.conf'))
    print('stop it: tools/nova-deployment.sh stop %s' % dep.root)
    return 0


if __name__ == '__main__':
    sys.exit(main())
