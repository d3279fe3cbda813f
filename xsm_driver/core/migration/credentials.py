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

"""Throwaway TLS credentials of one migration.

Each side of a migration makes its own certificate authority and one
certificate signed by it -- a server certificate on the destination,
which exports the disk, a client certificate on the source -- then sends
only its CA certificate (public) to the peer over the control plane. Each
side trusts only the peer's CA: mutual TLS 1.3, per migration.

The CA's private key is never written anywhere and is dropped as soon as
the one certificate is signed, so a CA can vouch for exactly one
certificate: trusting the peer's CA is as strict as pinning the peer's
certificate, and credentials of another migration are refused.
"""

import logging
import os
import secrets
import shutil
import ssl

from xsm_driver.core.nbd import tls

LOG = logging.getLogger(__name__)

ROLES = ('server', 'client')
CA_CERT = 'ca-cert.pem'
CERT = 'cert.pem'
KEY = 'key.pem'
DAYS = 7


def _write(directory, name, data, mode):
    path = os.path.join(directory, name)
    tmp = path + '.tmp'
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 mode)
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def _as_text(pem):
    return pem.decode('ascii') if isinstance(pem, bytes) else pem


class Credentials:
    """The TLS identity of one side of one migration.

    Use :meth:`make` (new credentials) or :meth:`load` (from the
    directory, e.g. when an agent restarts); :meth:`destroy` when the
    migration has ended.

    :ivar role: ``server`` (exports the disk) or ``client``.
    :ivar ca_pem: this side's CA certificate (str, PEM): send it to the
        peer.
    :ivar fingerprint: SHA-256 fingerprint of this side's certificate, the
        one the peer sees in the handshake (``AB:CD:...``).
    :ivar directory: where the certificate and key are.
    """

    def __init__(self, directory, role, ca_pem, cert_pem):
        if role not in ROLES:
            raise ValueError('role must be one of %s, not %r'
                             % (', '.join(ROLES), role))
        self.directory = directory
        self.role = role
        self.ca_pem = _as_text(ca_pem)
        self.cert_pem = _as_text(cert_pem)
        self.fingerprint = tls.fingerprint(self.cert_pem.encode('ascii'))
        self.cert_file = os.path.join(directory, CERT)
        self.key_file = os.path.join(directory, KEY)

    @classmethod
    def make(cls, directory, role, hosts=(), days=DAYS):
        """Make a CA and a certificate for ``role``; write them.

        :param directory: created with mode 0700 (made 0700 if it exists);
            the key is written with mode 0600.
        :param role: ``server`` or ``client``.
        :param hosts: names and addresses the server answers as (its
            subject alternative names).
        :param days: validity; the certificates start 5 minutes in the
            past to allow for clock skew between the hosts.
        """
        if role not in ROLES:
            raise ValueError('role must be one of %s, not %r'
                             % (', '.join(ROLES), role))
        hosts = tuple(hosts or ())
        tag = secrets.token_hex(4)
        ca_pem, ca_key = tls.make_ca('xsm-driver migration CA %s' % tag,
                                     days=days)
        if role == 'server':
            cert_pem, key_pem = tls.make_cert(
                ca_pem, ca_key, hosts[0] if hosts else 'xsm-migration-%s'
                % tag, hosts, days=days)
        else:
            cert_pem, key_pem = tls.make_cert(
                ca_pem, ca_key, 'xsm-migration client %s' % tag,
                client=True, days=days)
        del ca_key
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        _write(directory, KEY, key_pem, 0o600)
        _write(directory, CERT, cert_pem, 0o644)
        _write(directory, CA_CERT, ca_pem, 0o644)
        _write(directory, 'role', role.encode('ascii'), 0o644)
        LOG.debug('made TLS %s credentials in %s (certificate %s)', role,
                  directory, tls.fingerprint(cert_pem))
        return cls(directory, role, ca_pem, cert_pem)

    @classmethod
    def load(cls, directory):
        """Credentials :meth:`make` wrote in ``directory``."""
        def read(name):
            with open(os.path.join(directory, name), 'rb') as f:
                return f.read()
        return cls(directory, read('role').decode('ascii').strip(),
                   read(CA_CERT), read(CERT))

    def _require(self, role, what):
        if self.role != role:
            raise ValueError('%s credentials cannot make a %s context; '
                             'make %s credentials for that side'
                             % (self.role, what, role))

    def server_context(self, peer_ca_pem):
        """A TLS 1.3 server context that accepts only the peer's client.

        :param peer_ca_pem: the client's CA certificate (PEM).
        """
        self._require('server', 'server')
        ctx = tls.server_context(self.cert_file, self.key_file)
        ctx.load_verify_locations(cadata=_as_text(peer_ca_pem))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, peer_ca_pem):
        """A TLS 1.3 client context that trusts only the peer's server.

        :param peer_ca_pem: the server's CA certificate (PEM).
        """
        self._require('client', 'client')
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # No host name check: the migration network's address may be any
        # interface the operator chose, and the server's certificate is
        # the only one its per-migration CA ever signed (the CA key is
        # gone), so trusting that CA alone already pins the peer. The
        # chain itself is still verified (CERT_REQUIRED).
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=_as_text(peer_ca_pem))
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def destroy(self):
        """Remove the directory and everything in it (idempotent)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        if os.path.exists(self.directory):
            # Something (permissions, a mount) kept it: say so.
            LOG.warning('could not remove TLS credentials in %s',
                        self.directory)
