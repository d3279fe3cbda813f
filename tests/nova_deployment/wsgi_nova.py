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

"""nova-api's WSGI application for gunicorn.

nova 34's ``nova.wsgi.osapi_compute`` parses ``sys.argv`` as its own
command line (uwsgi passes it ``--pyargv``); under gunicorn that is
gunicorn's command line, which nova refuses. Its configuration comes
from ``OS_NOVA_CONFIG_DIR`` / ``OS_NOVA_CONFIG_FILES`` instead.
"""

import sys

sys.argv = sys.argv[:1]

from nova.wsgi.osapi_compute import application  # noqa: E402,F401,H306
