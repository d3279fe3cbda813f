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

"""A multi-process Nova deployment driven by ``openstack`` (nova 34).

These tests run only from ``tools/run-nova-deployment-tests.sh``, in
``.venv-nova``, and only when ``XSM_NOVA_DEPLOYMENT=1``: the main test run
(``stestr run`` over ``tests``) discovers this package but
:func:`load_tests` then returns nothing.
"""

import tests

ENABLE = 'XSM_NOVA_DEPLOYMENT'
load_tests = tests.gated_load_tests(__file__, ENABLE)
