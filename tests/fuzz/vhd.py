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

"""Fuzz target: the VHD parser (footer, header, BAT, batmap, locators).

An input is a mutation program applied to a copy of one base image: the
vectors made by XenServer's tools (``tests/data/vhd``; their parents
are linked, not copied), images
made by :mod:`xsm_driver.core.vhd.ops`, or the input's own bytes as the
whole file. The program patches bytes at the structures (footer, its
copy, header, BAT, batmap, locators, a block bitmap), sets fields to
boundary values, points BAT entries anywhere, rewrites locator paths and
cuts the file; it may fix the checksums afterwards so that the deeper
checks are reached. Then the image is opened as a chain, mapped and
read (:class:`~xsm_driver.core.vhd.chain.Chain`), described
(:func:`~xsm_driver.core.vhd.ops.info`) and checked
(:func:`~xsm_driver.core.vhd.check.check`). Checked:

* opening fails only with a :class:`~xsm_driver.core.vhd.errors.VHDError`
  that names the file at fault (of the folder, or a parent a locator
  names elsewhere); ``check`` never raises, and finds a
  problem whenever opening failed;
* no input takes more than :data:`TIME_LIMIT` seconds or makes Python
  allocate more than :data:`MEMORY` bytes (a lying header must not
  become a huge read);
* nothing in the folder is written.

``python -m tests.fuzz.vhd [libFuzzer args]`` runs it under
atheris.
"""

import atexit
import os
import shutil
import struct
import tempfile

from tests import base as test_base
from tests.fuzz import common
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

TARGET = 'vhd'
MiB = 1024 * 1024
SECTOR = fmt.SECTOR
TIME_LIMIT = 20.0
MEMORY = 48 * MiB
READ_BUDGET = 8 * MiB                # bytes of the disk read per input
# (image opened, image mutated, where it comes from); 'input' is the
# input's own remaining bytes as the whole file.
BASES = (
    ('made-dyn.vhd', 'made-dyn.vhd', 'made'),
    ('made-leaf.vhd', 'made-leaf.vhd', 'made'),
    ('made-leaf.vhd', 'made-base.vhd', 'made'),
    ('made-fixed.vhd', 'made-fixed.vhd', 'made'),
    ('dyn-16m.vhd', 'dyn-16m.vhd', 'vectors'),
    ('fixed-4m.vhd', 'fixed-4m.vhd', 'vectors'),
    ('chain-leaf.vhd', 'chain-leaf.vhd', 'vectors'),
    ('chain-leaf.vhd', 'chain-mid.vhd', 'vectors'),
    ('chain-mid.vhd', 'chain-base.vhd', 'vectors'),
    ('empty-1g.vhd', 'empty-1g.vhd', 'vectors'),
    ('input.vhd', 'input.vhd', 'input'),
)
VECTORS = ('chain-base.vhd', 'chain-mid.vhd', 'chain-leaf.vhd',
           'dyn-16m.vhd', 'empty-1g.vhd', 'fixed-4m.vhd')
# Fields (offset in their structure, width) set to boundary values.
FOOTER_FIELDS = ((8, 4), (12, 4), (16, 8), (24, 4), (28, 4), (32, 4),
                 (40, 8), (48, 8), (56, 4), (60, 4), (68, 16), (84, 1),
                 (85, 1))
HEADER_FIELDS = ((8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (40, 16),
                 (56, 4), (64, 64)) + tuple(
    (576 + 24 * i + at, width) for i in range(8)
    for at, width in ((0, 4), (4, 4), (8, 4), (16, 8)))
BATMAP_FIELDS = ((8, 8), (16, 4), (20, 4), (24, 4))
VALUES = (0, 1, 2, 3, 4, 511, 512, 513, 1536, 4096, 2 ** 21, 2 ** 21 + 512,
          2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40, 2 ** 63, 2 ** 64 - 512,
          2 ** 64 - 1)
LOCATOR_TEXTS = ('../../../../etc/passwd', '/dev/zero', '.', '', '..',
                 '/proc/self/mem',
                 'made-base.vhd', 'chain-mid.vhd', './input.vhd',
                 'x' * 600, '\0', 'a\\..\\..\\b', '\udcff')
ANCHORS = ('footer', 'footer copy', 'header', 'bat', 'batmap header',
           'batmap', 'locator', 'bitmap', 'start', 'end')


def _patch(path, offset, data):
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(data)


def _read(path, offset, length):
    with open(path, 'rb') as f:
        f.seek(offset)
        return f.read(length)


def structures(path):
    """{anchor: [offsets]} of the structures of a valid image."""
    size = os.path.getsize(path)
    out = {'footer': [size - SECTOR], 'start': [0], 'end': [size]}
    img = vhd_image.Image(path)
    try:
        if img.header is not None:
            table = img.header.table_offset
            out.update({'footer copy': [0], 'header': [SECTOR],
                        'bat': [table]})
            if img.batmap_header is not None:
                out['batmap header'] = [table + fmt.bat_bytes(len(img.bat))]
                out['batmap'] = [img.batmap_header.offset]
            out['locator'] = [loc.data_offset for loc in img.header.locators
                              if loc.code]
            out['bitmap'] = [img.block_offset(b) - SECTOR
                             for b in img.allocated_blocks()[:4]]
    finally:
        img.close()
    return {k: v for k, v in out.items() if v}


class Workspace:
    """The base images, made once; a scratch folder for each input."""

    def __init__(self, vectors=None):
        self.root = tempfile.mkdtemp(prefix='xsm-fuzz-vhd-')
        self.vectors = vectors
        self.made = os.path.join(self.root, 'made')
        os.mkdir(self.made)
        p = self._made_path
        ops.create(p('made-dyn.vhd'), 6 * MiB)
        with vhd_chain.Chain(p('made-dyn.vhd'), writable=True) as c:
            c.pwrite(b'd' * 3000, fmt.BLOCK_SIZE - 1000)
            c.pwrite(b'f' * fmt.BLOCK_SIZE, 2 * fmt.BLOCK_SIZE)
        ops.create(p('made-base.vhd'), 4 * MiB)
        with vhd_chain.Chain(p('made-base.vhd'), writable=True) as c:
            c.pwrite(b'b' * 8192, 0)
        ops.snapshot(p('made-leaf.vhd'), p('made-base.vhd'))
        with vhd_chain.Chain(p('made-leaf.vhd'), writable=True) as c:
            c.pwrite(b'L' * 5000, 4096)
        ops.create(p('made-fixed.vhd'), 2 * MiB, fixed=True)
        for name in os.listdir(self.made):
            os.chmod(p(name), 0o444)
        self._structures = {}

    def _made_path(self, name):
        return os.path.join(self.made, name)

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def source(self, kind):
        """Folder of the base images of ``kind``, or None."""
        if kind == 'made':
            return self.made
        if kind == 'vectors' and self.vectors and all(
                os.path.isfile(os.path.join(self.vectors, n))
                for n in VECTORS):
            return self.vectors
        return None

    def prepare(self, kind, mutated):
        """A scratch folder: ``mutated`` copied, the rest linked."""
        folder = tempfile.mkdtemp(prefix='in-', dir=self.root)
        source = self.source(kind)
        if source is None:
            return folder
        for name in os.listdir(source):
            if not name.endswith('.vhd'):
                continue
            if name == mutated:
                shutil.copyfile(os.path.join(source, name),
                                os.path.join(folder, name))
                os.chmod(os.path.join(folder, name), 0o644)
            else:
                os.symlink(os.path.join(source, name),
                           os.path.join(folder, name))
        return folder

    def anchors(self, kind, name):
        key = (kind, name)
        if key not in self._structures:
            self._structures[key] = structures(
                os.path.join(self.source(kind), name))
        return self._structures[key]


def _fix_checksums(path, size):
    """Recompute the footers' and the header's checksum."""
    at = [size - SECTOR] if size >= SECTOR else []
    if size >= 3 * SECTOR:
        at.append(0)
    for offset in at:
        raw = bytearray(_read(path, offset, SECTOR))
        if raw[:8] == fmt.FOOTER_COOKIE:
            struct.pack_into('>I', raw, 64, fmt.checksum(raw, 64))
            _patch(path, offset, raw)
    if size >= SECTOR + 1024:
        raw = bytearray(_read(path, SECTOR, 1024))
        if raw[:8] == fmt.HEADER_COOKIE:
            struct.pack_into('>I', raw, 36, fmt.checksum(raw, 36))
            _patch(path, SECTOR, raw)


def _value(r, width):
    if r.int(1) & 1:
        return r.choice(VALUES) % 256 ** width
    return r.int(width)


def mutate(path, anchors, r):
    """Apply the mutation program read from ``r`` to ``path``."""
    fix = r.int(1)
    for _ in range(1 + r.below(6)):
        size = os.path.getsize(path)
        kind = r.below(7)
        if kind == 0:           # bytes somewhere in a structure
            name = r.choice(ANCHORS)
            base = r.choice(anchors.get(name, [0]))
            back = SECTOR if name == 'end' else 0
            offset = max(0, base + r.int(2) - back)
            _patch(path, min(offset, size), r.take(1 + r.below(16)))
        elif kind == 1:         # a footer field, both copies
            at, width = r.choice(FOOTER_FIELDS)
            value = _value(r, width).to_bytes(width, 'big')
            for offset in [size - SECTOR] + anchors.get('footer copy', []):
                if 0 <= offset + at and offset + at + width <= size:
                    _patch(path, offset + at, value)
        elif kind == 2:         # a header field
            at, width = r.choice(HEADER_FIELDS)
            if SECTOR + at + width <= size and 'header' in anchors:
                _patch(path, SECTOR + at, _value(r, width).to_bytes(width,
                                                                    'big'))
        elif kind == 3:         # a batmap header field
            at, width = r.choice(BATMAP_FIELDS)
            for offset in anchors.get('batmap header', []):
                _patch(path, offset + at, _value(r, width).to_bytes(width,
                                                                    'big'))
        elif kind == 4:         # a BAT entry
            for table in anchors.get('bat', []):
                entry = r.choice((r.below(4), r.below(64), r.int(2)))
                sector = r.choice((size // SECTOR - r.below(4200),
                                   r.below(16), r.int(4),
                                   fmt.UNALLOCATED)) % 2 ** 32
                _patch(path, table + 4 * entry, struct.pack('>I', sector))
        elif kind == 5:         # a locator's text
            text = r.choice(LOCATOR_TEXTS)
            for offset in anchors.get('locator', []):
                code = r.choice(fmt.LOCATOR_CODES)
                _patch(path, offset, fmt.encode_locator(
                    code, text).ljust(64, b'\0')[:SECTOR] if text !=
                    '\udcff' else b'\xff\xfe\x00\xd8\xff')
        else:                   # cut or grow the file
            os.truncate(path, size * r.int(2) // 0x8000)
    if fix & 1:
        _fix_checksums(path, os.path.getsize(path))


def _state(folder):
    """Names, sizes and modification times of a folder's files.

    (A write changes the modification time; hashing the images would
    cost more than the rest of an input.)
    """
    out = {}
    for name in sorted(os.listdir(folder)):
        st = os.stat(os.path.join(folder, name))
        out[name] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def exercise(folder, leaf):
    """Open, map, read, describe and check ``leaf``: the module's rules.

    :returns: True when the chain opened.
    """
    path = os.path.join(folder, leaf)
    before = _state(folder)
    opened = True
    with common.time_limit(TIME_LIMIT, 'opening %s' % leaf):
        with common.memory_limit(MEMORY, 'opening %s' % leaf):
            try:
                with vhd_chain.Chain(path) as chain:
                    budget = READ_BUDGET
                    for offset, length, allocated in chain.extents():
                        if allocated and budget > 0:
                            n = min(length, budget, 2 * MiB)
                            budget -= n
                            chain.pread(offset, n)
                    chain.pread(chain.size - SECTOR, SECTOR)
                ops.info(path)
            except errors.VHDError as exc:
                opened = False
                # The file at fault: in the folder, or a parent a locator
                # named elsewhere.
                named = exc.kwargs.get('path')
                assert folder in str(exc) or (named and named in str(exc)), (
                    'no file named in %r' % str(exc))
            problems = check.check(path, chain=True)
    assert isinstance(problems, list), problems
    for problem in problems:
        assert isinstance(problem, str) and folder in problem, problem
    if not opened:
        assert problems, 'opening failed but check found nothing'
    assert before == _state(folder), 'reading changed a file'
    return opened


def one_input_in(workspace, data):
    """Run one input in ``workspace``; False when its base is missing."""
    r = common.Reader(data)
    leaf, mutated, kind = r.choice(BASES)
    folder = workspace.prepare(kind, mutated)
    try:
        if kind == 'input':
            with open(os.path.join(folder, leaf), 'wb') as f:
                f.write(r.rest())
        elif workspace.source(kind) is None:
            return False
        else:
            mutate(os.path.join(folder, mutated),
                   workspace.anchors(kind, mutated), r)
        exercise(folder, leaf)
        return True
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def vectors_dir():
    return test_base.VECTORS_DIR


_WORKSPACE = []


def one_input(data):
    if not _WORKSPACE:
        _WORKSPACE.append(Workspace(vectors_dir()))
        atexit.register(_WORKSPACE[0].close)
    one_input_in(_WORKSPACE[0], data)


if __name__ == '__main__':
    common.atheris_main(one_input)
