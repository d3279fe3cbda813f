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

"""Socket side shared by the NBD client and server."""

#: the reusable buffer a connection receives into (headers, small replies
#: and requests; a large payload goes straight into a buffer of its own):
#: receiving into a new buffer of that size each time costs an mmap and
#: an munmap, which in a process of many threads is also a TLB shootdown
RECV_BUFFER = 64 * 1024
