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

"""xsm-nbd: serve a VHD chain or a raw file over NBD, like qemu-nbd.

``serve`` runs until SIGINT or SIGTERM and then stops cleanly (exit 0).
Once it listens it prints one line saying where, so that a script can wait
for that line; with ``--port 0`` the line holds the port picked.
"""

import argparse
import logging
import os
import signal
import ssl
import sys
import time

from xsm_driver.cmd import common
from xsm_driver.core.block import backends
from xsm_driver.core import exception
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import format as fmt

PROG = 'xsm-nbd'
DEFAULT_PORT = 10809


class CommandError(Exception):
    """A failure to report in one line, without a traceback."""


class _Stop(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM."""


def _port(text):
    try:
        port = int(text, 10)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError('%r is no TCP port (0 to 65535)'
                                         % text)
    return port


def _bounded(kind, low, high):
    """An argparse type: a ``kind`` number from ``low`` to ``high``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                '%r is not a number from %s to %s' % (text, low, high))
        return value
    return parse


def is_vhd(path):
    """Whether ``path`` ends with a VHD footer (or starts with its copy)."""
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        if size < fmt.SECTOR:
            return False
        if os.pread(f.fileno(), 8, size - fmt.SECTOR) == fmt.FOOTER_COOKIE:
            return True
        # A dynamic image whose footer was cut off still has its copy.
        return os.pread(f.fileno(), 8, 0) == fmt.FOOTER_COOKIE


def open_device(path, writable):
    """A block device for a VHD chain or a raw file; returns (dev, kind)."""
    try:
        vhd = is_vhd(path)
    except OSError as exc:
        raise CommandError('cannot open image %s: %s'
                           % (path, exc.strerror or exc))
    if os.path.isdir(path):
        raise CommandError('image %s is a directory' % path)
    try:
        if vhd:
            return backends.VHDDevice(path, writable=writable), 'VHD'
        return backends.RawDevice(path, writable=writable), 'raw'
    except (exception.XSMError, OSError, ValueError) as exc:
        raise CommandError('cannot open %s image %s: %s'
                           % ('VHD' if vhd else 'raw', path, exc))


def tls_context(cert, key, ca):
    """A server context; names the file that cannot be used."""
    for what, path in (('certificate', cert), ('key', key),
                       ('CA certificate', ca)):
        if path is None:
            continue
        try:
            with open(path, 'rb'):
                pass
        except OSError as exc:
            raise CommandError('cannot read TLS %s %s: %s'
                               % (what, path, exc.strerror or exc))
    try:
        return tls.server_context(cert, key, ca)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise CommandError('cannot use TLS certificate %s with key %s%s: %s'
                           % (cert, key, ' and CA %s' % ca if ca else '',
                              exc))


def _url(host, port, name, secure):
    host = '[%s]' % host if ':' in host else host
    return '%s://%s:%d/%s' % ('nbds' if secure else 'nbd', host, port, name)


def _raise_stop(signum, _frame):
    raise _Stop(signum)


def _serve(args):
    if bool(args.tls_cert) != bool(args.tls_key):
        args.parser.error('--tls-cert and --tls-key go together')
    if args.tls_ca and not args.tls_cert:
        args.parser.error('--tls-ca needs --tls-cert and --tls-key')
    context = (tls_context(args.tls_cert, args.tls_key, args.tls_ca)
               if args.tls_cert else None)
    dev, kind = open_device(args.image, writable=not args.read_only)
    server = nbd_server.Server({args.export_name: dev}, host=args.bind,
                               port=args.port, tls_context=context,
                               max_connections=args.max_connections,
                               max_handshakes=args.max_handshakes,
                               handshake_timeout=args.handshake_timeout,
                               request_timeout=args.request_timeout)
    previous = {sig: signal.signal(sig, _raise_stop)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except OSError as exc:
            raise CommandError('cannot listen on %s port %d: %s'
                               % (args.bind, args.port,
                                  os.strerror(exc.errno) if exc.errno
                                  else exc))
        host, port = server.address
        if context is None:
            security = 'TLS off'
        elif args.tls_ca:
            security = 'TLS on, client certificates required'
        else:
            security = 'TLS on'
        print('%s: serving %s image %s (%s) on %s port %d, export %r, %s: '
              '%s' % (PROG, kind, args.image,
                      'read-only' if args.read_only else 'read-write', host,
                      port, args.export_name, security,
                      _url(host, port, args.export_name,
                           context is not None)),
              flush=True)
        while True:
            # not signal.pause(): see common.wait_until
            time.sleep(common.STOP_POLL)
    except _Stop as stop:
        logging.getLogger(__name__).info('stopping on signal %d',
                                         stop.args[0])
    finally:
        # A second signal must not cut the clean stop short.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            server.stop()
        finally:
            dev.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0


def _make_certs(args):
    hosts = tuple(args.host) if args.host else tls.DEFAULT_HOSTS
    try:
        paths = tls.make_credentials(args.dir, hosts)
    except FileExistsError as exc:
        raise CommandError('%s already exists; make-certs does not '
                           'overwrite credentials' % exc.filename)
    except OSError as exc:
        raise CommandError('cannot write credentials in %s: %s'
                           % (exc.filename or args.dir,
                              exc.strerror or exc))
    for name in sorted(paths):
        print(paths[name])
    print('server certificate for: %s' % ', '.join(hosts))


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description='Serve a VHD chain or a raw file over NBD, '
        'with or without TLS.')
    parser.add_argument('--debug', action='store_true',
                        help='log what is done')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func, parser=p)
        return p

    p = add('serve', _serve,
            'serve IMAGE (a VHD chain through its leaf, or a raw file) '
            'until SIGINT or SIGTERM')
    p.add_argument('image', metavar='IMAGE')
    p.add_argument('--bind', default='127.0.0.1', metavar='ADDR',
                   help='address to listen on (default: %(default)s)')
    p.add_argument('--port', type=_port, default=DEFAULT_PORT,
                   help='TCP port; 0 picks a free one (default: '
                   '%(default)s)')
    p.add_argument('--export-name', default='', metavar='NAME',
                   help="export name (default: '', as qemu-nbd)")
    p.add_argument('--read-only', action='store_true',
                   help='refuse writes')
    p.add_argument('--tls-cert', metavar='FILE',
                   help='server certificate (PEM); requires TLS')
    p.add_argument('--tls-key', metavar='FILE',
                   help='private key of --tls-cert (PEM)')
    p.add_argument('--tls-ca', metavar='FILE',
                   help='require client certificates signed by this CA')
    p.add_argument('--max-connections', metavar='N',
                   type=_bounded(int, 1, 65536),
                   default=nbd_server.MAX_CONNECTIONS,
                   help='connections at once; one more is closed at once '
                   '(default: %(default)s)')
    p.add_argument('--max-handshakes', metavar='N',
                   type=_bounded(int, 1, 65536),
                   default=nbd_server.MAX_HANDSHAKES,
                   help='connections at once still in their handshake; a '
                   'new one takes the place of the oldest (default: '
                   '%(default)s)')
    p.add_argument('--handshake-timeout', metavar='SECONDS',
                   type=_bounded(float, 1.0, 600.0),
                   default=nbd_server.HANDSHAKE_TIMEOUT,
                   help='time to finish the handshake, TLS included '
                   '(default: %(default)s)')
    p.add_argument('--request-timeout', metavar='SECONDS',
                   type=_bounded(float, 1.0, 3600.0),
                   default=nbd_server.REQUEST_TIMEOUT,
                   help='time for a request that has begun to arrive whole '
                   '(default: %(default)s)')
    p = add('make-certs', _make_certs,
            'write a CA, a server and a client certificate with their keys '
            'into DIR, named as qemu tls-creds-x509 expects')
    p.add_argument('dir', metavar='DIR')
    p.add_argument('--host', action='append', metavar='NAME',
                   help='name or address of the server (repeat; default: '
                   '%s)' % ' and '.join(tls.DEFAULT_HOSTS))
    return parser


def main(argv=None):
    return common.run(PROG, build_parser().parse_args(argv),
                      errors=(CommandError,))


if __name__ == '__main__':
    sys.exit(main())
