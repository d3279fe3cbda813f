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

"""Minimal image and network services: FOR TESTS AND TRIALS ONLY.

One WSGI application (run under gunicorn by the deployment) with two
parts, each the few calls of a real service's HTTP API that nova and
python-openstackclient make in the deployment's scenarios, so that nova's
own clients talk to them over HTTP exactly as to the real services:

``/image``: a read-only subset of Glance's images API v2 -- the version
    document, ``GET /v2/schemas/image``, ``GET /v2/images[/ID]`` and
    ``GET /v2/images/ID/file`` with the image's md5 ``checksum`` and
    sha512 ``os_hash_value`` (which python-glanceclient checks while nova
    downloads). The images are files of the folder ``XSM_STUB_IMAGES``:
    ``ID.img`` (the data) and ``ID.json`` (name, disk and container
    format). Chosen over glance-api because glance's own stack
    (glance-store, taskflow, WSME, ...) is not part of nova 34's pinned
    stack in .venv-nova and starting it costs the test time; nova-api and
    nova-compute still fetch every image with nova's real Glance client.
``/network``: an empty Neutron v2.0 API -- every collection is empty
    (``GET /v2.0/ports`` -> ``{"ports": []}``, no extensions), anything
    else 404. Servers boot with ``--nic none``; nova still asks Neutron
    for the ports of an instance while it builds, live-migrates and
    deletes it.

Every request is logged (gunicorn's access log).
"""

import hashlib
import json
import os
import re

_IMAGE = re.compile(r'^/v2/images/([0-9a-f-]{36})(/file)?$')
_NET_COLLECTION = re.compile(r'^/v2\.0/([a-z0-9_-]+)(?:\.json)?$')

#: the image schema python-glanceclient validates answers against
IMAGE_SCHEMA = {
    'name': 'image',
    'additionalProperties': {'type': 'string'},
    'links': [{'href': '{self}', 'rel': 'self'},
              {'href': '{file}', 'rel': 'enclosure'},
              {'href': '{schema}', 'rel': 'describedby'}],
    'properties': {
        'id': {'type': 'string'},
        'name': {'type': ['null', 'string']},
        'status': {'type': 'string'},
        'visibility': {'type': 'string'},
        'protected': {'type': 'boolean'},
        'os_hidden': {'type': 'boolean'},
        'checksum': {'type': ['null', 'string']},
        'os_hash_algo': {'type': ['null', 'string']},
        'os_hash_value': {'type': ['null', 'string']},
        'owner': {'type': ['null', 'string']},
        'size': {'type': ['null', 'integer']},
        'virtual_size': {'type': ['null', 'integer']},
        'min_ram': {'type': 'integer'},
        'min_disk': {'type': 'integer'},
        'disk_format': {'type': ['null', 'string']},
        'container_format': {'type': ['null', 'string']},
        'created_at': {'type': 'string'},
        'updated_at': {'type': 'string'},
        'tags': {'type': 'array', 'items': {'type': 'string'}},
        'direct_url': {'type': 'string'},
        'locations': {'type': 'array'},
        'self': {'type': 'string'},
        'file': {'type': 'string'},
        'schema': {'type': 'string'},
        'stores': {'type': 'string'},
    },
}


def add_image(folder, image_id, name, data, disk_format='raw',
              container_format='bare'):
    """Put an image into the image service's folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, image_id + '.img'), 'wb') as f:
        f.write(data)
    with open(os.path.join(folder, image_id + '.json'), 'w') as f:
        json.dump({'name': name, 'disk_format': disk_format,
                   'container_format': container_format,
                   'md5': hashlib.md5(data).hexdigest(),
                   'sha512': hashlib.sha512(data).hexdigest()}, f)


def _image(folder, image_id):
    try:
        with open(os.path.join(folder, image_id + '.json')) as f:
            meta = json.load(f)
        size = os.path.getsize(os.path.join(folder, image_id + '.img'))
    except (OSError, ValueError):
        return None
    stamp = '2026-01-01T00:00:00Z'
    return {
        'id': image_id, 'name': meta['name'], 'status': 'active',
        'visibility': 'public', 'protected': False, 'os_hidden': False,
        'checksum': meta['md5'], 'os_hash_algo': 'sha512',
        'os_hash_value': meta['sha512'], 'owner': 'admin', 'size': size,
        'virtual_size': None, 'min_ram': 0, 'min_disk': 0,
        'disk_format': meta['disk_format'],
        'container_format': meta['container_format'],
        'created_at': stamp, 'updated_at': stamp, 'tags': [],
        'self': '/v2/images/%s' % image_id,
        'file': '/v2/images/%s/file' % image_id,
        'schema': '/v2/schemas/image',
    }


def _json(start_response, status, body, extra=()):
    data = json.dumps(body).encode()
    start_response(status, [('Content-Type', 'application/json'),
                            ('Content-Length', str(len(data)))] + list(extra))
    return [data]


def _not_found(start_response, what):
    return _json(start_response, '404 Not Found',
                 {'error': {'code': 404, 'message': '%s not found' % what}})


def image_app(environ, start_response, folder):
    path = environ.get('PATH_INFO') or '/'
    method = environ['REQUEST_METHOD']
    base = '%s://%s%s' % (environ['wsgi.url_scheme'], environ['HTTP_HOST'],
                          environ.get('SCRIPT_NAME', ''))
    if method not in ('GET', 'HEAD'):
        return _json(start_response, '405 Method Not Allowed',
                     {'error': {'code': 405, 'message': 'this image service '
                                'is read-only (tests and trials only)'}})
    if path in ('/', '/versions', '/v2', '/v2/'):
        version = {'id': 'v2.16', 'status': 'CURRENT',
                   'links': [{'rel': 'self', 'href': base + '/v2/'}]}
        if path.startswith('/v2'):
            return _json(start_response, '200 OK', {'version': version})
        return _json(start_response, '300 Multiple Choices',
                     {'versions': [version]})
    if path == '/v2/schemas/image':
        return _json(start_response, '200 OK', IMAGE_SCHEMA)
    if path == '/v2/images':
        images = [_image(folder, n[:-5]) for n in sorted(os.listdir(folder))
                  if n.endswith('.json')]
        return _json(start_response, '200 OK', {
            'images': [i for i in images if i], 'schema': '/v2/schemas/images',
            'first': '/v2/images'})
    match = _IMAGE.match(path)
    if not match:
        return _not_found(start_response, path)
    image = _image(folder, match.group(1))
    if image is None:
        return _not_found(start_response, 'image %s' % match.group(1))
    if not match.group(2):
        return _json(start_response, '200 OK', image)
    data_path = os.path.join(folder, image['id'] + '.img')
    start_response('200 OK', [
        ('Content-Type', 'application/octet-stream'),
        ('Content-Length', str(image['size'])),
        ('Content-MD5', image['checksum'])])
    if method == 'HEAD':
        return [b'']
    with open(data_path, 'rb') as f:
        return [f.read()]


def network_app(environ, start_response):
    path = environ.get('PATH_INFO') or '/'
    if environ['REQUEST_METHOD'] == 'GET':
        if path in ('/', ''):
            return _json(start_response, '200 OK', {'versions': [
                {'id': 'v2.0', 'status': 'CURRENT', 'links': []}]})
        match = _NET_COLLECTION.match(path)
        if match:
            return _json(start_response, '200 OK', {match.group(1): []})
    return _json(start_response, '404 Not Found', {'NeutronError': {
        'type': 'HTTPNotFound', 'detail': '',
        'message': 'not in this empty network service (tests only): %s %s'
                   % (environ['REQUEST_METHOD'], path)}})


def application(environ, start_response):
    path = environ.get('PATH_INFO') or '/'
    for prefix in ('/image', '/network'):
        if path == prefix or path.startswith(prefix + '/'):
            environ['SCRIPT_NAME'] = environ.get('SCRIPT_NAME', '') + prefix
            environ['PATH_INFO'] = path[len(prefix):] or '/'
            if prefix == '/image':
                return image_app(environ, start_response,
                                 os.environ['XSM_STUB_IMAGES'])
            return network_app(environ, start_response)
    return _not_found(start_response, path)
