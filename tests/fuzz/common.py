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

"""What the fuzz targets share: profiles, corpus, limits, atheris.

Hypothesis profiles (``XSM_FUZZ_PROFILE``; default ``ci`` when
``CI=true``, else ``dev``):

* ``ci``: derandomized, no example database -- every CI run tries the
  same examples, so a failure reproduces;
* ``dev``: random, with the local example database;
* ``long``: random, 20 times the examples of each test, no deadline --
  for a longer hunt by hand (``XSM_FUZZ_PROFILE=long``).

The profiles are used as the parent of each fuzz test's own settings
(:func:`fuzz_settings`), never loaded globally, so that the other
hypothesis tests of a test process keep their own defaults.
"""

import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import tracemalloc

from hypothesis import HealthCheck
from hypothesis import settings

LOG = logging.getLogger(__name__)

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus')
PROFILE_ENV = 'XSM_FUZZ_PROFILE'
_SCALE = {'ci': 1, 'dev': 1, 'long': 20}

settings.register_profile('xsm-fuzz-ci', derandomize=True, database=None,
                          print_blob=True)
settings.register_profile('xsm-fuzz-dev')
settings.register_profile('xsm-fuzz-long', deadline=None)


def profile_name():
    name = os.environ.get(PROFILE_ENV) or (
        'ci' if os.environ.get('CI') == 'true' else 'dev')
    if name not in _SCALE:
        raise ValueError('%s=%r: use one of %s' % (
            PROFILE_ENV, name, ', '.join(sorted(_SCALE))))
    return name


def fuzz_settings(max_examples, deadline):
    """Settings of one fuzz test under the chosen profile.

    :param max_examples: examples in the ``ci`` and ``dev`` profiles.
    :param deadline: milliseconds one example may take (generous: the
        machine is shared; a real hang is caught by :func:`time_limit`).
    """
    name = profile_name()
    parent = settings.get_profile('xsm-fuzz-' + name)
    return settings(
        parent, max_examples=max_examples * _SCALE[name],
        deadline=None if name == 'long' else deadline,
        suppress_health_check=[HealthCheck.too_slow,
                               HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture])


# -- corpus -----------------------------------------------------------------

def corpus_dir(target):
    return os.path.join(CORPUS, target)


def corpus_files(target):
    """Paths of the seed inputs of ``target``, sorted."""
    folder = corpus_dir(target)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if not name.startswith('.'))


def save_input(target, data, name=None):
    """Keep ``data`` in the corpus of ``target`` (a found crash)."""
    name = name or hashlib.sha1(data).hexdigest()[:16]
    path = os.path.join(corpus_dir(target), name)
    with open(path, 'wb') as f:
        f.write(data)
    return path


# -- limits -----------------------------------------------------------------

class Hang(BaseException):
    """One input ran past its time limit (raised by :func:`time_limit`)."""


@contextlib.contextmanager
def time_limit(seconds, what='input'):
    """Raise :class:`Hang` in the main thread after ``seconds``.

    Outside the main thread (no signals there) it only measures, and
    raises AssertionError afterwards.
    """
    start = time.monotonic()
    if threading.current_thread() is not threading.main_thread():
        yield
    else:
        def alarm(_sig, _frame):
            raise Hang('%s still running after %.1f s' % (what, seconds))
        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    took = time.monotonic() - start
    if took > seconds:
        raise AssertionError('%s took %.1f s, the limit is %.1f s'
                             % (what, took, seconds))


# Whether tracemalloc stays on between inputs: starting and stopping it
# for every input leaks a little memory (harmless in a bounded test run,
# not in hours of atheris), while tracing all the time slows down
# everything else in the process (hypothesis itself, in a test run).
KEEP_TRACING = False


@contextlib.contextmanager
def memory_limit(limit, what='input'):
    """Fail when Python allocations peak ``limit`` bytes above the start.

    tracemalloc sees every thread, so a server thread that believed a
    lying length counts too.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        yield
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started and not KEEP_TRACING:
            tracemalloc.stop()
    if peak > limit:
        raise AssertionError('%s made Python allocate %d bytes at its peak; '
                             'the limit is %d' % (what, peak, limit))


def stop_tracing():
    tracemalloc.stop()


def settle(probe, timeout=10.0):
    """Poll ``probe`` until it returns a true value or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.005)


class ErrorLog(logging.Handler):
    """Keeps the ERROR records of ``xsm_driver``.

    A caught internal error (``LOG.exception``) is a crash the code under
    test hid.
    """

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append('%s: %s' % (record.name, record.getMessage()))

    def since(self, mark):
        return self.records[mark:]


_ERROR_LOG = []


def error_log():
    """The :class:`ErrorLog` of this process (installed on first use).

    It also stops Python's last-resort handler from printing the
    warnings of thousands of hostile sessions.
    """
    if not _ERROR_LOG:
        _ERROR_LOG.append(ErrorLog())
        logging.getLogger('xsm_driver').addHandler(_ERROR_LOG[0])
    return _ERROR_LOG[0]


def thread_names():
    return sorted(t.name for t in threading.enumerate())


# -- bytes to values ----------------------------------------------------------

class Reader:
    """Draw values from fuzzer bytes; past the end everything is 0.

    Like atheris' FuzzedDataProvider, but available without atheris so
    that hypothesis and the corpus replay decode inputs the same way.
    """

    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0

    def __len__(self):
        return len(self.data) - self.pos

    def take(self, n):
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def int(self, nbytes):
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b'\0'), 'big')

    def below(self, n):
        """An integer in [0, n)."""
        return self.int(1 if n <= 256 else 2 if n <= 65536 else 4) % n

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def rest(self):
        return self.take(len(self))


# -- atheris ------------------------------------------------------------------

def atheris_main(one_input, argv=None):
    """Run ``one_input`` under atheris (libFuzzer arguments in ``argv``).

    Every module loaded so far is instrumented for coverage, so call this
    after importing the code under test.
    """
    try:
        import atheris
    except ImportError:
        sys.exit('atheris is not installed: pip install atheris (the '
                 'bounded hypothesis runs of the same targets are the '
                 'test_* modules beside this one)')
    global KEEP_TRACING
    KEEP_TRACING = True
    atheris.instrument_all()
    atheris.Setup(list(argv or sys.argv), one_input)
    atheris.Fuzz()
