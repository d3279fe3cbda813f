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

import warnings

# oslo.messaging's dependencies (futurist, oslo.utils, oslo.service) import
# eventlet only to find out whether a process is monkey-patched; eventlet
# then warns that it is deprecated. Our commands never use eventlet (they
# run on native threads), so operators need not read that warning.
warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')
