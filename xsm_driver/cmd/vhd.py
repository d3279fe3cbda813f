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

"""xsm-vhd: create, inspect and change VHD images, like vhd-util."""

import argparse
import json
import sys

from xsm_driver.cmd import common
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check as vhd_check
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import ops

PROG = 'xsm-vhd'


def _size(text):
    try:
        return fmt.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _offset(text):
    return 0 if text.strip() == '0' else _size(text)


def _create(args):
    path = ops.create(args.path, args.size, fixed=args.fixed)
    print('created %s (%s, %d bytes)' % (path, 'fixed' if args.fixed
                                         else 'dynamic',
                                         fmt.round_size(args.size)))


def _snapshot(args):
    path = ops.snapshot(args.child, args.parent)
    print('created %s over %s (now read-only)' % (path, args.parent))


def _write(args):
    if args.input == '-':
        done = ops.write(args.path, args.offset, sys.stdin.buffer)
    else:
        with open(args.input, 'rb') as stream:
            done = ops.write(args.path, args.offset, stream)
    print('wrote %d bytes at offset %d' % (done, args.offset))


def _export(args):
    out = ops.export(args.path, args.output)
    print('exported %s to %s' % (args.path, out))


def _info(args):
    facts = ops.info(args.path)
    if args.json:
        print(json.dumps(facts, indent=2, sort_keys=True))
        return
    for key in ('path', 'type', 'virtual_size', 'file_size', 'uuid',
                'hidden', 'read_only', 'creator', 'allocated_blocks',
                'chain_allocated_bytes', 'chain_depth', 'parent'):
        print('%-22s %s' % (key + ':', facts[key]))


def _check(args):
    problems = vhd_check.check(args.path, chain=args.chain)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print('%s is valid%s' % (args.path, ' (whole chain)' if args.chain
                             else ''))


def _map(args):
    with vhd_chain.Chain(args.path) as chain:
        extents = chain.extents()
    if args.json:
        print(json.dumps([{'offset': o, 'length': n, 'allocated': a}
                          for o, n, a in extents], indent=1))
        return
    print('%-16s %-16s %s' % ('offset', 'length', 'state'))
    for offset, length, allocated in extents:
        print('%-16d %-16d %s' % (offset, length,
                                  'data' if allocated else 'hole'))


def _coalesce(args):
    parent = ops.coalesce(args.child)
    print('coalesced %s into %s' % (args.child, parent))


def _set_parent(args):
    ops.set_parent(args.child, args.parent)
    print('%s now has parent %s' % (args.child, args.parent))


def _set_hidden(args):
    ops.set_hidden(args.path, args.value)
    print('%s hidden=%d' % (args.path, args.value))


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description='Create, inspect and change VHD images as '
        'XenServer writes them.')
    parser.add_argument('--debug', action='store_true',
                        help='log what is done')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add('create', _create, 'create an empty dynamic (or fixed) image')
    p.add_argument('path', metavar='PATH')
    p.add_argument('--size', type=_size, required=True,
                   help='virtual size: bytes or a number with M, G or T; '
                   'rounded up to 2 MiB')
    p.add_argument('--fixed', action='store_true',
                   help='allocate the whole disk (type fixed)')
    p = add('snapshot', _snapshot,
            'create a differencing image over PARENT; PARENT becomes '
            'read-only')
    p.add_argument('child', metavar='CHILD')
    p.add_argument('--parent', required=True, metavar='PARENT')
    p = add('write', _write, 'write a file into the virtual disk')
    p.add_argument('path', metavar='PATH')
    p.add_argument('--offset', type=_offset, required=True,
                   help='byte offset in the virtual disk (M, G, T allowed)')
    p.add_argument('--input', required=True, metavar='FILE',
                   help="the data to write ('-' for standard input)")
    p = add('export', _export,
            'write the whole virtual disk to a sparse raw file')
    p.add_argument('path', metavar='PATH')
    p.add_argument('output', metavar='OUTPUT')
    p = add('info', _info, 'show facts about an image and its chain')
    p.add_argument('path', metavar='PATH')
    p.add_argument('--json', action='store_true', help='print JSON')
    p = add('check', _check, 'validate an image (exit 0 when valid)')
    p.add_argument('path', metavar='PATH')
    p.add_argument('--chain', action='store_true',
                   help='also validate every parent')
    p = add('map', _map, 'list allocated extents of the chain')
    p.add_argument('path', metavar='PATH')
    p.add_argument('--json', action='store_true', help='print JSON')
    p = add('coalesce', _coalesce,
            "merge CHILD's data into its parent (CHILD is left as is)")
    p.add_argument('child', metavar='CHILD')
    p = add('set-parent', _set_parent,
            'point a differencing image at a new parent')
    p.add_argument('child', metavar='CHILD')
    p.add_argument('parent', metavar='PARENT')
    p = add('set-hidden', _set_hidden, "set XenServer's hidden flag")
    p.add_argument('path', metavar='PATH')
    p.add_argument('value', type=int, choices=(0, 1))
    return parser


def main(argv=None):
    return common.run(PROG, build_parser().parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
