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

"""The Nova driver in Nova's own functional harness (needs nova 34).

These tests run only from ``tools/run-nova-tests.sh``, in ``.venv-nova``
with nova and its test requirements, and only when ``XSM_NOVA_TESTS=1``:
the main test run (``stestr run`` over ``tests``) discovers
this package but :func:`load_tests` then returns nothing, and nova is
never imported there.
"""

import os

import tests

ENABLE = 'XSM_NOVA_TESTS'

if os.environ.get(ENABLE) == '1':
    # nova.tests.functional applies eventlet patching, or forbids eventlet
    # (OS_NOVA_DISABLE_EVENTLET_PATCHING): it must come before any other
    # import of nova, whose dependencies (futurist) import eventlet.
    import nova.tests.functional  # noqa: F401


load_tests = tests.gated_load_tests(__file__, ENABLE)
