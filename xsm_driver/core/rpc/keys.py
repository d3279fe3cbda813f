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

"""Key files and trust lists from the configuration (the IO edge of
:mod:`xsm_driver.core.rpc.auth`).

The options (``identity_key_file``, ``trusted_hosts``,
``trusted_hosts_file``, ``trusted_operators``, ``operator_key_file``,
``operator_name``, ``clock_skew``, ``replay_cache_size``) are those of
:data:`xsm_driver.conf.agent.auth_opts`, in the ``[agent]`` group of
xsm-driver.conf or the ``[xsm]`` group of nova.conf.
"""

import logging
import os
import stat

from xsm_driver.core import exception
from xsm_driver.core.rpc import auth

LOG = logging.getLogger(__name__)

IDENTITY_FILE = 'identity.key'


class KeyFileError(exception.XSMError):
    """A key file or trust list that cannot be used."""

    msg_fmt = '%(path)s: %(reason)s'


def create_key_file(path):
    """Write a new Ed25519 private key to ``path`` (mode 0600).

    :raises FileExistsError: when ``path`` exists (a key is never
        overwritten).
    :returns: the key.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    key = auth.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, auth.private_pem(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load_key_file(path):
    """The Ed25519 private key of ``path``.

    :raises KeyFileError: when it cannot be read, is no such key, or other
        users may read it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise KeyFileError(path=path, reason=exc.strerror or str(exc))
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(path=path, reason='other users may read this '
                               'private key (mode %o); chmod 600 it'
                               % stat.S_IMODE(mode))
        with os.fdopen(fd, 'rb') as f:
            fd = None
            data = f.read()
    finally:
        if fd is not None:
            os.close(fd)
    try:
        return auth.load_private_pem(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(path=path, reason='not an Ed25519 private key '
                           '(%s)' % exc)


def identity_path(group):
    return group.identity_key_file or os.path.join(group.state_path,
                                                   IDENTITY_FILE)


def ensure_identity_key(group):
    """This host's key, created when missing: ``(key, path, created)``."""
    path = identity_path(group)
    try:
        return create_key_file(path), path, True
    except FileExistsError:
        return load_key_file(path), path, False
    except OSError as exc:
        raise KeyFileError(path=path, reason=exc.strerror or str(exc))


def read_trusted_hosts_file(path):
    """``{host: public key text}`` of a peers file.

    One ``host-name public-key`` pair a line; blank lines and what follows
    ``#`` are ignored.
    """
    hosts = {}
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as exc:
        raise KeyFileError(path=path, reason=exc.strerror or str(exc))
    for number, line in enumerate(lines, 1):
        words = line.split('#', 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise KeyFileError(path=path, reason='line %d is not "host-name '
                               'public-key"' % number)
        hosts[words[0]] = words[1]
    return hosts


def trust(group):
    """:class:`auth.Trust` of the options of ``group``."""
    hosts = {}
    if group.trusted_hosts_file:
        hosts.update(read_trusted_hosts_file(group.trusted_hosts_file))
    hosts.update(group.trusted_hosts or {})
    try:
        return auth.Trust(hosts, group.trusted_operators or {})
    except ValueError as exc:
        raise KeyFileError(path='trusted_hosts/trusted_operators',
                           reason=str(exc))


def identity(group, name):
    """The :class:`auth.Identity` of host ``name``.

    Its key is made when missing (and its public key logged then).
    """
    key, path, created = ensure_identity_key(group)
    if created:
        LOG.warning('created the identity key of host %s in %s; the other '
                    'agents must trust it: add "%s:%s" to their '
                    '[agent]trusted_hosts', name, path, name,
                    auth.public_text(key))
    return auth.Identity(name, key, trust(group), skew=group.clock_skew,
                         cache_size=group.replay_cache_size)


def operator_credential(group):
    """The operator :class:`auth.Credential` of ``group``, or None."""
    if not group.operator_key_file:
        return None
    return auth.Credential(auth.OPERATOR, group.operator_name,
                           load_key_file(group.operator_key_file))


def _auth_group(conf):
    from xsm_driver.conf import agent as agent_conf
    if 'agent' not in conf:
        agent_conf.register_opts(conf)
    elif 'operator_key_file' not in conf.agent:
        conf.register_opts(agent_conf.auth_opts, group='agent')
    return conf.agent


def client_settings(conf):
    """``(credential, trust)`` of a tool's configuration (``[agent]``).

    The options are registered on ``conf`` when it has not got them yet
    (e.g. a bare ConfigOpts of a transport).
    """
    group = _auth_group(conf)
    return operator_credential(group), trust(group)
