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

"""Fuzz targets for hostile input, and their bounded CI runs.

Each target module (``nbd_protocol``, ``nbd_server``, ``vhd``, ``rpc``)
has ``one_input(data)``, which turns arbitrary bytes into one hostile
session (a stream of NBD bytes, a mutated VHD image, an RPC call) and
raises ``AssertionError`` when the code under test misbehaves: any
exception that is not the project's own clear error, a hang, unbounded
memory, a thread or file left behind, another client disturbed.

* Coverage-guided, with atheris (``tools/fuzz.sh`` or
  ``python -m tests.fuzz.<target> -runs=N corpus-dir``).
* Bounded, in the default test suite: ``test_<target>`` modules drive the
  same targets with hypothesis (a fixed, derandomized profile in CI) and
  replay the seed corpus in ``corpus/<target>/``, where every crashing
  input found so far is kept as a regression.
"""
