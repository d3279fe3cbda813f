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

"""TLS credentials and contexts for the NBD data channel.

:func:`make_credentials` makes a certificate authority, a server and a
client certificate (ECDSA P-256) -- for tests, for trying TLS by hand
(``xsm-nbd make-certs``) and for the credentials of one migration. The
files are named the way qemu's ``tls-creds-x509`` object reads a folder.
Contexts speak TLS 1.3 only; a server given a CA demands a client
certificate signed by it.
"""

import datetime
import hashlib
import ipaddress
import os
import ssl

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID

CA_CERT = 'ca-cert.pem'
SERVER_CERT = 'server-cert.pem'
SERVER_KEY = 'server-key.pem'
CLIENT_CERT = 'client-cert.pem'
CLIENT_KEY = 'client-key.pem'
DEFAULT_HOSTS = ('localhost', '127.0.0.1')


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                         'xsm-driver'),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts):
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _pem(cert, key):
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _build(subject, issuer, public_key, signing_key, days, extensions):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days)))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def make_ca(common_name='xsm-driver CA', days=365):
    """A self-signed certificate authority.

    :returns: ``(cert_pem, key_pem)``
    """
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build(_name(common_name), _name(common_name), key.public_key(),
                  key, days, [
                      (x509.BasicConstraints(ca=True, path_length=0), True),
                      (x509.KeyUsage(digital_signature=False,
                                     content_commitment=False,
                                     key_encipherment=False,
                                     data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False,
                                     decipher_only=False), True)])
    return _pem(cert, key)


def make_cert(ca_cert_pem, ca_key_pem, common_name, hosts=(), client=False,
              days=365):
    """A server (or client) certificate signed by the CA.

    :param hosts: host names and IP addresses the server answers as.
    :returns: ``(cert_pem, key_pem)``
    """
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = (ExtendedKeyUsageOID.CLIENT_AUTH if client
             else ExtendedKeyUsageOID.SERVER_AUTH)
    extensions = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, content_commitment=False,
                       key_encipherment=True, data_encipherment=False,
                       key_agreement=False, key_cert_sign=False,
                       crl_sign=False, encipher_only=False,
                       decipher_only=False), False),
        (x509.ExtendedKeyUsage([usage]), False),
    ]
    if hosts:
        extensions.append((x509.SubjectAlternativeName(_alt_names(hosts)),
                           False))
    cert = _build(_name(common_name), ca_cert.subject, key.public_key(),
                  ca_key, days, extensions)
    return _pem(cert, key)


def make_credentials(directory, hosts=DEFAULT_HOSTS, days=365):
    """Write a CA, a server and a client certificate with their keys.

    Keys are written with mode 0600. Existing files are not overwritten.

    :returns: a dict from the file names above to their paths.
    """
    ca_cert, ca_key = make_ca(days=days)
    server = make_cert(ca_cert, ca_key, hosts[0] if hosts else 'server',
                       hosts, days=days)
    client = make_cert(ca_cert, ca_key, 'xsm-driver client', client=True,
                       days=days)
    files = {CA_CERT: ca_cert, SERVER_CERT: server[0], SERVER_KEY: server[1],
             CLIENT_CERT: client[0], CLIENT_KEY: client[1],
             'ca-key.pem': ca_key}
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, data in files.items():
        path = os.path.join(directory, name)
        mode = 0o600 if name.endswith('key.pem') else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        paths[name] = path
    return paths


def fingerprint(cert_pem):
    """SHA-256 fingerprint of a certificate, ``AB:CD:...`` style."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(
        serialization.Encoding.DER)
    return ':'.join('%02X' % b for b in hashlib.sha256(der).digest())


def server_context(cert_file, key_file, ca_file=None):
    """A TLS 1.3 server context.

    With ``ca_file``, clients must present a certificate signed by that CA.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_file, key_file)
    if ca_file:
        ctx.load_verify_locations(ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca_file, cert_file=None, key_file=None):
    """A TLS 1.3 client context that trusts only ``ca_file``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx
