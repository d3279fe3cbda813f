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

"""The ``xsm-*`` commands (console-script entry points).

Importing this package makes the commands quiet about other packages:
their deprecation notices are not shown to operators nor written to agent
logs.  A deprecation notice is a ``DeprecationWarning``,
``PendingDeprecationWarning`` or ``FutureWarning``, or any warning whose
message speaks of deprecation: the classes packages make their own
(cryptography's ``CryptographyDeprecationWarning``, which dnspython sets
off when oslo.messaging imports it, eventlet's
``EventletDeprecationWarning``, which oslo.service sets off) derive from
``UserWarning`` or ``Warning`` and could only be named by importing them.
Warnings raised by xsm_driver's own modules, and every other warning of
other packages (``RuntimeWarning``, ``ResourceWarning``, a ``UserWarning``
about something else...), still show.  An operator who sets ``-W`` or
``PYTHONWARNINGS`` gets exactly what they asked for instead.

This lives here, in the entry points' package, and not in a library
module: nova-compute imports ``xsm_driver.nova``, never this package, and
its warnings are nova's business.
"""

import sys
import warnings

# A warning is attributed to the module its stack level names; ours are
# xsm_driver's modules and ``__main__`` (``python -m xsm_driver.cmd.agent``
# runs as ``__main__``; a console script's ``__main__`` is pip's wrapper,
# which warns about nothing), everything else is another package's.
NOT_OURS = r'(?!(xsm_driver(\.|$)|__main__$))'
DEPRECATION = r'(?is).*deprecat'


def quiet_dependencies(warnoptions=None):
    """Hide other packages' deprecation notices unless asked for them."""
    if sys.warnoptions if warnoptions is None else warnoptions:
        return
    for category in (DeprecationWarning, PendingDeprecationWarning,
                     FutureWarning):
        warnings.filterwarnings('ignore', category=category, module=NOT_OURS)
    warnings.filterwarnings('ignore', message=DEPRECATION, module=NOT_OURS)


quiet_dependencies()
