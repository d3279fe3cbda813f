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

"""Pieces the commands share: one-line errors, option plumbing."""

import ctypes
import logging
import sys

from xsm_driver.core import exception


class CommandError(Exception):
    """A failure to report in one line, without a traceback."""


def first_line(exc):
    """An error's message without what oslo.messaging appends to it.

    An exception rebuilt from an RPC reply carries the agent's traceback
    after its message; the agent's log has it, the operator needs one line.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run(prog, args, errors=()):
    """Run ``args.func(args)``; report failures in one line.

    Expected failures (``errors`` and xsm-driver's own) print their
    message; anything else prints its type and message, and its traceback
    only with ``--debug``.

    :returns: the exit status.
    """
    debug = getattr(args, 'debug', False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format='%(levelname)s %(name)s %(message)s')
    try:
        return args.func(args) or 0
    except (CommandError, exception.XSMError, OSError, ValueError) + \
            tuple(errors) as exc:
        print('%s %s: error: %s' % (prog, args.command, first_line(exc)),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('%s %s: interrupted' % (prog, args.command), file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            logging.exception('%s %s failed', prog, args.command)
        print('%s %s: error: %s: %s' % (prog, args.command,
                                        type(exc).__name__, first_line(exc)),
              file=sys.stderr)
        return 1


def tune_malloc():
    """Keep a migrating agent's memory flat (glibc only; else nothing).

    Copies and mirrored writes pass through many threads in buffers of
    megabytes. glibc gives each thread an arena and raises its mmap
    threshold after every large free, so freed buffers stay in the heap:
    two arenas and a fixed 1 MiB threshold (large buffers come from mmap
    and go back to the kernel when freed) took the demo's peak from 193 to
    129 MB.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, 2)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: seconds between two looks of a daemon's main thread at its stop event
STOP_POLL = 0.5


def wait_until(stop):
    """Block the main thread until ``stop`` (set by a signal handler) is set.

    The kernel may hand a signal sent to the process to any of its
    threads. Python then only marks the handler as due: the main thread
    runs it the next time it runs Python code. Blocked in a plain
    ``stop.wait()`` (or ``signal.pause()``) it never does, and the daemon
    ignores SIGTERM. Waking up every :data:`STOP_POLL` seconds, it runs
    the handler then.
    """
    while not stop.wait(STOP_POLL):
        pass


def migration_options(conf):
    """Migration defaults from the ``[agent]`` options."""
    from xsm_driver.core.migration import manager
    mib = 1 << 20
    return manager.Options(
        address=conf.agent.migration_address,
        bandwidth=conf.agent.bandwidth_limit or None,
        max_concurrent=conf.agent.max_concurrent_migrations,
        leaf_headroom=conf.agent.leaf_headroom_mb * mib,
        pause_timeout=conf.agent.pause_timeout,
        mirror_timeout=conf.agent.mirror_timeout,
        chunk=conf.agent.copy_chunk_mb * mib,
        depth=conf.agent.copy_depth,
        copy_buffer=conf.agent.copy_buffer_mb * mib,
        connections=conf.agent.copy_connections,
        receive_lease_timeout=conf.agent.receive_lease_timeout,
        commit_timeout=conf.agent.commit_timeout)
