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

"""Who may call an agent: signed RPC calls and signed answers (sans-IO).

Every agent has an Ed25519 key pair of its own; every operator tool
(xsm-migrate, the Nova driver, the CloudStack API service) signs with an
operator key pair. An agent knows the public keys of the hosts it trusts
(``[agent]trusted_hosts``) and of the operators it obeys
(``[agent]trusted_operators``).

A call carries, in its RPC context (key :data:`CONTEXT_KEY`), an
*envelope*: protocol version, the caller's role (``agent`` or
``operator``) and name, the target host, the method, the SHA-256 of the
canonical encoding of its arguments, a timestamp in milliseconds, a random
nonce, and the Ed25519 signature of all of these. The agent accepts it
only when every one of the small decisions below says so
(:meth:`Guard.admit`): a well-formed envelope, addressed to this host, for
this method and these very arguments, within ``clock_skew`` seconds of
this host's clock, signed by a key this host trusts for that role, a
method that role may call, arguments that name only trusted hosts, and a
nonce not seen before (:class:`ReplayCache`, bounded in entries and in
time: a nonce is kept until its call would be stale anyway) in a call
signed after this agent started (the cache does not outlive a restart).

An agent answers an admitted call with ``{REPLY_KEY: seal, 'result':
result}``, or ``{REPLY_KEY: seal, 'error': error}`` when the method
raised (the error as oslo.messaging serialises exceptions); the seal
binds its host name, the caller, the method, the call's nonce and the
SHA-256 of the canonical ``{'result': result}`` or ``{'error': error}``,
signed by the agent's key. A caller that has the called host's public key
checks it (:func:`open_reply`), so a forged or replayed answer, result or
error, is refused too. What cannot be sealed is a refusal (the agent does
not sign answers to calls it did not admit) and the errors oslo.messaging
raises before the agent's code runs (no such method or version).

Everything here is pure but for the clock :class:`Guard` reads and the
log line it writes when it refuses a call; key files are read and written
by :mod:`xsm_driver.core.rpc.keys`.
"""

import base64
import binascii
import collections
import hashlib
import json
import logging
import os
import threading
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives import serialization
from oslo_serialization import jsonutils

from xsm_driver.core import exception

LOG = logging.getLogger(__name__)

#: the key of the RPC context that carries a call's envelope
CONTEXT_KEY = 'xsm_auth'
#: the key of an answer that carries its seal
REPLY_KEY = 'xsm_reply'

AGENT = 'agent'
OPERATOR = 'operator'
ROLES = (AGENT, OPERATOR)

PROTOCOL = 1
_CALL_DOMAIN = b'xsm-driver rpc call 1\n'
_REPLY_DOMAIN = b'xsm-driver rpc reply 1\n'

#: default seconds a call's timestamp may differ from the receiver's clock
DEFAULT_SKEW = 60.0
#: default number of nonces an agent remembers
DEFAULT_CACHE_SIZE = 100000

_ENVELOPE_FIELDS = {'v': int, 'role': str, 'sender': str, 'target': str,
                    'method': str, 'digest': str, 'ts': int, 'nonce': str,
                    'sig': str}
_SEAL_FIELDS = {'v': int, 'sender': str, 'caller': str, 'method': str,
                'nonce': str, 'digest': str, 'sig': str}


class NotAuthorized(exception.XSMError):
    """An agent refused a call: unknown caller, or not one it allows."""

    msg_fmt = 'host %(host)s refused %(method)s: %(reason)s'


class UntrustedAnswer(exception.XSMError):
    """The answer to a call is not one the called host signed."""

    msg_fmt = ('the answer of host %(host)s to %(method)s is refused: '
               '%(reason)s')


class UntrustedHost(exception.XSMError):
    """A caller will not call (or send a migration to) an unknown host."""

    msg_fmt = ('host %(host)s is not a trusted host (add it to '
               '[agent]trusted_hosts with its public key)')


# -- keys --------------------------------------------------------------------

def generate_key():
    """A new Ed25519 private key."""
    return ed25519.Ed25519PrivateKey.generate()


def private_pem(key):
    """The PKCS#8 PEM bytes of a private key (not encrypted)."""
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_pem(data):
    """The Ed25519 private key of PEM bytes; ValueError otherwise."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError('not an Ed25519 private key')
    return key


def public_text(key):
    """How configuration files spell a key's public half (base64).

    :param key: an Ed25519 private or public key.
    """
    if isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    return base64.b64encode(key.public_bytes(
        serialization.Encoding.Raw,
        serialization.PublicFormat.Raw)).decode('ascii')


def parse_public(text):
    """The Ed25519 public key of :func:`public_text`'s spelling.

    :raises ValueError: naming what is wrong with it.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError('%r is not base64' % text)
    if len(raw) != 32:
        raise ValueError('%r is not an Ed25519 public key (32 bytes, '
                         'base64)' % text)
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


class Trust:
    """The public keys a party trusts: ``{name: key}`` per role.

    :param hosts: ``{host name: Ed25519PublicKey or its base64 text}``.
    :param operators: the same, of operators.
    """

    def __init__(self, hosts=None, operators=None):
        self.hosts = _keys(hosts)
        self.operators = _keys(operators)

    def key(self, role, name):
        """The public key of ``name`` in ``role``, or None."""
        keys = self.hosts if role == AGENT else self.operators
        return keys.get(name)

    def __bool__(self):
        return bool(self.hosts or self.operators)


def _keys(mapping):
    keys = {}
    for name, key in (mapping or {}).items():
        if isinstance(key, str):
            try:
                key = parse_public(key)
            except ValueError as exc:
                raise ValueError('trusted key of %s: %s' % (name, exc))
        keys[name] = key
    return keys


# -- canonical encoding -------------------------------------------------------

def canonical(value):
    """The bytes a signature covers for a value.

    The value is first made what oslo.messaging's JSON serialisation makes
    of it (tuples become lists, dates strings, ...), so that the sender and
    the receiver encode the same thing.

    >>> canonical({'b': (1, 2.5), 'a': None})
    b'{"a":null,"b":[1,2.5]}'
    """
    primitive = json.loads(jsonutils.dumps(value))
    return json.dumps(primitive, sort_keys=True, separators=(',', ':'),
                      ensure_ascii=True).encode('ascii')


def digest(value):
    """SHA-256 (hex) of :func:`canonical` ``value``."""
    return hashlib.sha256(canonical(value)).hexdigest()


def call_message(envelope):
    """The bytes a call's signature covers (every field but ``sig``)."""
    return _CALL_DOMAIN + canonical(
        [envelope['v'], envelope['role'], envelope['sender'],
         envelope['target'], envelope['method'], envelope['digest'],
         envelope['ts'], envelope['nonce']])


def reply_message(seal):
    """The bytes an answer's signature covers (every field but ``sig``)."""
    return _REPLY_DOMAIN + canonical(
        [seal['v'], seal['sender'], seal['caller'], seal['method'],
         seal['nonce'], seal['digest']])


def _sign(key, message):
    return base64.b64encode(key.sign(message)).decode('ascii')


def new_nonce():
    """128 random bits, hex."""
    return os.urandom(16).hex()


def sign_call(key, role, sender, target, method, args, now, nonce):
    """The envelope of a call.

    :param key: the caller's Ed25519 private key.
    :param role: :data:`AGENT` or :data:`OPERATOR`.
    :param args: the call's keyword arguments.
    :param now: the caller's clock (seconds since the epoch).
    """
    envelope = {'v': PROTOCOL, 'role': role, 'sender': sender,
                'target': target, 'method': method, 'digest': digest(args),
                'ts': int(round(now * 1000)), 'nonce': nonce}
    envelope['sig'] = _sign(key, call_message(envelope))
    return envelope


def seal_reply(key, host, envelope, result=None, error=None):
    """An admitted call's answer, sealed by the answering ``host``.

    :param error: when not None, the answer is this error (a string: the
        serialised exception), not ``result``.
    """
    answer = {'result': result} if error is None else {'error': error}
    seal = {'v': PROTOCOL, 'sender': host, 'caller': envelope['sender'],
            'method': envelope['method'], 'nonce': envelope['nonce'],
            'digest': digest(answer)}
    seal['sig'] = _sign(key, reply_message(seal))
    return dict(answer, **{REPLY_KEY: seal})


# -- decisions (each returns why not, or None) --------------------------------

def _shape_problem(value, fields, what):
    if not isinstance(value, dict):
        return 'the %s is not a mapping' % what
    for name, kind in fields.items():
        if name not in value:
            return 'the %s has no %s' % (what, name)
        if not isinstance(value[name], kind) or isinstance(
                value[name], bool):
            return 'the %s\'s %s is not a %s' % (what, name, kind.__name__)
    if value['v'] != PROTOCOL:
        return 'the %s is of protocol %s, not %s' % (what, value['v'],
                                                     PROTOCOL)
    return None


def envelope_problem(envelope):
    """Why ``envelope`` is not a well-formed call envelope, or None."""
    if envelope is None:
        return 'the call is not signed'
    problem = _shape_problem(envelope, _ENVELOPE_FIELDS, 'signature')
    if problem:
        return problem
    if envelope['role'] not in ROLES:
        return 'unknown role %r' % envelope['role']
    return None


def target_problem(envelope, me):
    """Why a call is not for host ``me`` (signed for another host)."""
    if envelope['target'] != me:
        return 'the call was signed for host %r, not this one' % (
            envelope['target'],)
    return None


def freshness_problem(ts_ms, now, skew):
    """Why a call made at ``ts_ms`` is not acceptable at ``now``.

    >>> freshness_problem(1000000, 1030.0, 60) is None
    True
    >>> freshness_problem(1000000, 1100.0, 60)
    'the call is 100.0 s old (more than the 60 s allowed clock skew)'
    """
    age = now - ts_ms / 1000.0
    if age > skew:
        return 'the call is %.1f s old (more than the %g s allowed clock ' \
               'skew)' % (age, skew)
    if -age > skew:
        return 'the call is %.1f s in the future (more than the %g s ' \
               'allowed clock skew)' % (-age, skew)
    return None


def restart_problem(ts_ms, started_ms):
    """Why a call signed before this agent started is refused.

    The replay cache lives in memory: a restarted agent has forgotten the
    nonces it admitted, so a call signed before it started cannot be told
    from a replay of one it already ran. The caller signs the call anew
    (a caller whose clock is behind this host's by ``d`` seconds is refused
    for the first ``d`` seconds after a restart).

    >>> restart_problem(1000500, 1000000) is None
    True
    >>> restart_problem(1000000, 1000500)
    'the call was signed 0.500 s before this agent started (it cannot be \
told from a replay)'
    """
    if ts_ms < started_ms:
        return ('the call was signed %.3f s before this agent started (it '
                'cannot be told from a replay)'
                % ((started_ms - ts_ms) / 1000.0))
    return None


def call_problem(envelope, method, args):
    """Why a signed envelope is not the one of this method and arguments.

    (A valid signature over another method's or other arguments' digest
    must not let them through.)
    """
    if envelope['method'] != method:
        return 'the call was signed for method %r' % (envelope['method'],)
    if envelope['digest'] != digest(args):
        return 'the arguments are not the ones that were signed'
    return None


def signature_problem(public_key, message, signature):
    """Why ``signature`` (base64) is not ``public_key``'s on ``message``."""
    try:
        raw = base64.b64decode(signature, validate=True)
        public_key.verify(raw, message)
    except (binascii.Error, ValueError, InvalidSignature):
        return 'the signature is not valid'
    return None


def permission_problem(role, method, peer_calls):
    """Why a caller in ``role`` may not call ``method``.

    Operators may call everything; other agents only what a migration
    between two hosts needs of the destination (``receive_*``) and the
    methods ``peer_calls`` names.

    >>> permission_problem('agent', 'vm_destroy', ()) is None
    False
    >>> permission_problem('agent', 'receive_abort', ()) is None
    True
    """
    if role == OPERATOR:
        return None
    if method.startswith('receive_') or method in peer_calls:
        return None
    return 'agents may not call %s (only operators may)' % method


def argument_problem(role, sender, method, args, trust, destinations=()):
    """Why a call's arguments are not acceptable from this caller.

    A migration may only go to a trusted host (or one of ``destinations``,
    those the agent's engine reaches by itself, e.g. the XenServer pools
    of ``[xenapi]destination_pools``); a receive may only come from a
    trusted host -- and, asked by an agent, from that agent.
    """
    dest = args.get('dest_host')
    if method in ('migrate_vm', 'migrate_vm_begin'):
        if not isinstance(dest, str) or (trust.key(AGENT, dest) is None
                                         and dest not in destinations):
            return 'destination host %r is not a trusted host' % (dest,)
    spec = args.get('spec')
    source = args.get('source_host')
    if source is None and isinstance(spec, dict):
        source = spec.get('source_host')
    if method.startswith('receive_') and source is not None:
        if not isinstance(source, str) or trust.key(AGENT, source) is None:
            return 'source host %r is not a trusted host' % (source,)
        if role == AGENT and source != sender:
            return 'agent %s may not act for source host %r' % (
                sender, source)
    return None


def owner_problem(role, sender, method, source):
    """Why a caller may not act on a receive whose source is ``source``.

    An agent may act on the receives it is the source of only (an
    operator on any; ``source`` None: no receive of that id is known).

    >>> owner_problem('agent', 'h2', 'receive_complete', 'h1')
    "agent h2 may not act on a receive from host 'h1'"
    >>> owner_problem('agent', 'h1', 'receive_complete', 'h1') is None
    True
    """
    if role != AGENT or source is None or not method.startswith('receive_'):
        return None
    if source != sender:
        return 'agent %s may not act on a receive from host %r' % (sender,
                                                                   source)
    return None


class ReplayCache:
    """The nonces of admitted calls, until their calls would be stale.

    Bounded: at most ``size`` nonces; when full, forgotten are the stale
    ones, and a call that still finds no room is refused (only callers
    with a trusted key get this far).
    """

    def __init__(self, size=DEFAULT_CACHE_SIZE):
        self.size = size
        self._expiry = {}
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._expiry)

    def admit(self, key, expires, now):
        """Remember ``key`` until ``expires``; why not, or None."""
        with self._lock:
            seen = self._expiry.get(key)
            if seen is not None and seen >= now:
                return 'the call was already made (a replay)'
            if len(self._expiry) >= self.size:
                self._expiry = {k: e for k, e in self._expiry.items()
                                if e >= now}
                if len(self._expiry) >= self.size:
                    return 'too many calls within the clock skew window'
            self._expiry[key] = expires
            return None


# -- the parties --------------------------------------------------------------

class Credential:
    """What a caller signs its calls with.

    :param role: :data:`AGENT` (an agent calling another) or
        :data:`OPERATOR` (an operator's tool).
    :param name: the caller's host or operator name.
    :param key: its Ed25519 private key.
    """

    def __init__(self, role, name, key):
        if role not in ROLES:
            raise ValueError('unknown role %r' % (role,))
        self.role = role
        self.name = name
        self.key = key

    def sign(self, target, method, args, now=None, nonce=None):
        return sign_call(self.key, self.role, self.name, target, method,
                         args, time.time() if now is None else now,
                         nonce or new_nonce())

    def __repr__(self):
        return '<Credential %s %s %s>' % (self.role, self.name,
                                          public_text(self.key))


def open_reply(reply, host, envelope, public_key, rebuild=None):
    """The result of a sealed answer, checked; UntrustedAnswer otherwise.

    :param host: the host called.
    :param envelope: the call's envelope.
    :param public_key: ``host``'s public key.
    :param rebuild: ``rebuild(error)`` makes the exception a sealed error
        answer stands for; it is raised (default: a RuntimeError).
    """
    method = envelope['method']

    def refuse(reason):
        raise UntrustedAnswer(host=host, method=method, reason=reason)
    if not isinstance(reply, dict) or REPLY_KEY not in reply:
        refuse('it is not signed')
    seal = reply[REPLY_KEY]
    problem = _shape_problem(seal, _SEAL_FIELDS, 'answer seal')
    if problem:
        refuse(problem)
    if set(reply) not in ({REPLY_KEY, 'result'}, {REPLY_KEY, 'error'}):
        refuse('it holds %s' % ', '.join(sorted(set(reply) - {REPLY_KEY})))
    answer = {k: v for k, v in reply.items() if k != REPLY_KEY}
    for field, wanted in (('sender', host), ('caller', envelope['sender']),
                          ('method', method), ('nonce', envelope['nonce'])):
        if seal[field] != wanted:
            refuse('it is sealed for %s %r, not %r' % (field, seal[field],
                                                       wanted))
    if seal['digest'] != digest(answer):
        refuse('the %s is not the one that was signed' % ''.join(answer))
    problem = signature_problem(public_key, reply_message(seal), seal['sig'])
    if problem:
        refuse(problem)
    if 'error' in answer:
        raise (rebuild or RuntimeError)(answer['error'])
    return answer['result']


Caller = collections.namedtuple('Caller', 'role name envelope')


class Guard:
    """An agent's gate: admits signed calls of trusted callers only.

    :param host: this agent's host name.
    :param key: its Ed25519 private key (seals the answers).
    :param trust: :class:`Trust`.
    :param skew: seconds a call's timestamp may differ from this clock.
    :param cache_size: nonces remembered at most.
    :param peer_calls: methods other than ``receive_*`` agents may call.
    :param destinations: hosts besides the trusted ones a migration may
        go to (see :func:`argument_problem`).
    :param clock: ``time.time`` (tests pass their own).
    """

    def __init__(self, host, key, trust, skew=DEFAULT_SKEW,
                 cache_size=DEFAULT_CACHE_SIZE, peer_calls=(),
                 clock=time.time, destinations=()):
        self.host = host
        self.key = key
        self.trust = trust
        self.skew = skew
        self.peer_calls = frozenset(peer_calls)
        self.destinations = frozenset(destinations)
        self.replays = ReplayCache(cache_size)
        self._clock = clock
        # calls signed before this moment may be replays of calls an
        # earlier run of this agent admitted (restart_problem)
        self.started_ms = int(clock() * 1000)

    def decide(self, method, context, args):
        """``(Caller, None)`` if admitted, else ``(who, why not)``.

        A nonce is remembered only when its call is admitted.
        """
        envelope = context.get(CONTEXT_KEY) if isinstance(
            context, dict) else None
        problem = envelope_problem(envelope)
        if problem:
            return 'an unsigned caller', problem
        who = '%s %s' % (envelope['role'], envelope['sender'])
        now = self._clock()
        problem = (target_problem(envelope, self.host) or
                   freshness_problem(envelope['ts'], now, self.skew) or
                   restart_problem(envelope['ts'], self.started_ms))
        if problem:
            return who, problem
        public_key = self.trust.key(envelope['role'], envelope['sender'])
        if public_key is None:
            return who, 'no trusted key for %s' % who
        problem = (call_problem(envelope, method, args) or
                   signature_problem(public_key, call_message(envelope),
                                     envelope['sig']) or
                   permission_problem(envelope['role'], method,
                                      self.peer_calls) or
                   argument_problem(envelope['role'], envelope['sender'],
                                    method, args, self.trust,
                                    self.destinations) or
                   self.replays.admit(
                       (envelope['role'], envelope['sender'],
                        envelope['nonce']),
                       envelope['ts'] / 1000.0 + self.skew, now))
        if problem:
            return who, problem
        return Caller(envelope['role'], envelope['sender'], envelope), None

    def admit(self, method, context, args):
        """The :class:`Caller`; NotAuthorized (logged once) otherwise."""
        caller, problem = self.decide(method, context, args)
        if problem is None:
            return caller
        LOG.warning('refused call %s from %s: %s', method, caller, problem)
        raise NotAuthorized(host=self.host, method=method, reason=problem)

    def seal(self, caller, result=None, error=None):
        return seal_reply(self.key, self.host, caller.envelope, result,
                          error)


class Identity:
    """An agent's own key, what it trusts, and how strictly.

    :param name: the agent's host name.
    :param key: its Ed25519 private key.
    :param trust: :class:`Trust`.
    """

    def __init__(self, name, key, trust, skew=DEFAULT_SKEW,
                 cache_size=DEFAULT_CACHE_SIZE):
        self.name = name
        self.key = key
        self.trust = trust
        # an agent trusts itself (a migration between two SRs of one host)
        trust.hosts.setdefault(name, key.public_key())
        self.skew = skew
        self.cache_size = cache_size

    def credential(self):
        """What this agent signs its calls to other agents with."""
        return Credential(AGENT, self.name, self.key)

    def guard(self, peer_calls=(), destinations=()):
        return Guard(self.name, self.key, self.trust, self.skew,
                     self.cache_size, peer_calls,
                     destinations=destinations)

    @property
    def public_text(self):
        return public_text(self.key)
