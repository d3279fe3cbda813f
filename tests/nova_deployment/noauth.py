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

"""A paste filter that stands in for Keystone: FOR TESTS AND TRIALS ONLY.

nova 34 has no ``noauth2`` strategy any more. The deployment of
tests/nova_deployment (and ``tools/nova-deployment.sh``) runs nova-api
without Keystone, with this filter in place of keystonemiddleware's
``authtoken`` in nova's paste pipeline: it believes every request and
sets the identity headers ``authtoken`` would set after checking a token
(``X-Identity-Status: Confirmed``, an admin user of one project with the
roles admin, member and reader), so that nova's own ``keystonecontext``
filter builds the request context from them. It checks nothing: anybody
who reaches the API is an administrator. Never put it in front of an API
that anything but a test or a trial on loopback reaches.

A token of the form ``USER:PROJECT`` (what placement's ``noauth2``
reads) names the user and project; without a token the user is
``admin`` in project ``admin``, and the context gets the token
``admin:admin`` so that nova's calls to other services on the user's
behalf carry one.
"""

import logging

LOG = logging.getLogger(__name__)

ROLES = 'admin,member,reader'


class NoAuthFilter:
    """WSGI middleware: trust the caller, set the Keystone headers."""

    def __init__(self, app, roles=ROLES):
        self.app = app
        self.roles = roles

    def __call__(self, environ, start_response):
        token = environ.get('HTTP_X_AUTH_TOKEN') or 'admin:admin'
        user, _, project = token.partition(':')
        project = project or user
        environ['HTTP_X_AUTH_TOKEN'] = token
        environ['HTTP_X_IDENTITY_STATUS'] = 'Confirmed'
        environ['HTTP_X_USER_ID'] = user
        environ['HTTP_X_USER_NAME'] = user
        environ['HTTP_X_PROJECT_ID'] = project
        environ['HTTP_X_PROJECT_NAME'] = project
        environ['HTTP_X_USER_DOMAIN_ID'] = 'default'
        environ['HTTP_X_PROJECT_DOMAIN_ID'] = 'default'
        environ['HTTP_X_ROLES'] = self.roles
        environ.pop('HTTP_X_SERVICE_CATALOG', None)
        return self.app(environ, start_response)


def filter_factory(global_conf, **local_conf):
    """The paste.deploy filter factory.

    ``paste.filter_factory = tests.nova_deployment.noauth:filter_factory``
    (optional ``roles = a,b``).
    """
    roles = local_conf.get('roles', ROLES)
    LOG.warning('nova-api runs WITHOUT authentication (tests.nova_deployment.'
                'noauth): every caller is an administrator; for tests and '
                'trials only')

    def make(app):
        return NoAuthFilter(app, roles)
    return make
