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

"""Errors of the VHD engine; each names the file and what is wrong."""

from xsm_driver.core import exception


class VHDError(exception.XSMError):
    msg_fmt = "%(path)s: %(reason)s"


class InvalidImage(VHDError):
    """The file is not a valid VHD image (bad cookie, checksum, layout)."""

    msg_fmt = "%(path)s: invalid VHD image: %(reason)s"


class ParentNotFound(VHDError):
    msg_fmt = ("%(path)s: parent image not found (tried %(tried)s); "
               "the differencing image cannot be read without it")


class ParentMismatch(VHDError):
    msg_fmt = "%(path)s: parent %(parent)s does not match: %(reason)s"


class ChainLoop(VHDError):
    msg_fmt = "%(path)s: the parent chain loops back to %(parent)s"


class ChainTooDeep(VHDError):
    msg_fmt = ("%(path)s: the chain would be %(depth)d images deep; the "
               "limit is %(limit)d (XenServer: SR_BACKEND_FAILURE_109, "
               "snapshot chain too long); coalesce the chain first")


class ReadOnlyImage(VHDError):
    msg_fmt = "%(path)s: image is open read-only; %(reason)s"


class InvalidRequest(VHDError):
    """The caller asked for something the image cannot do."""

    msg_fmt = "%(path)s: %(reason)s"
