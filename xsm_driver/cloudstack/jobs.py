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

"""CloudStack's asynchronous jobs, as ``queryAsyncJobResult`` shows them.

A job runs in a thread; ``jobstatus`` is 0 while it runs, 1 when it
succeeded (``jobresult`` is its answer), 2 when it failed (``jobresult`` is
``{"errorcode": N, "errortext": "..."}`` and ``jobresultcode`` N). Jobs
live in memory: a finished job is kept ``retention`` seconds, and the jobs
of a service that restarts are gone (CloudStack keeps them in its
database).
"""

import datetime
import logging
import threading
import uuid as uuidlib

LOG = logging.getLogger(__name__)

PENDING, SUCCEEDED, FAILED = 0, 1, 2

#: CloudStack's ApiErrorCode values used here
PARAM_ERROR = 431
UNSUPPORTED_ACTION_ERROR = 432
INTERNAL_ERROR = 530
INSUFFICIENT_CAPACITY_ERROR = 533
RESOURCE_UNAVAILABLE_ERROR = 534


class JobFailed(Exception):
    """Raised by a job's function to fail with a CloudStack error code."""

    def __init__(self, code, text):
        super().__init__(text)
        self.code = code
        self.text = text


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def cs_time(when):
    """CloudStack's time format: ``2026-11-26T01:02:03+0000``."""
    return when.strftime('%Y-%m-%dT%H:%M:%S%z') if when else None


class Job:

    def __init__(self, cmd, instance_type=None, instance_id=None):
        self.id = str(uuidlib.uuid4())
        self.cmd = cmd
        self.instance_type = instance_type
        self.instance_id = instance_id
        self.status = PENDING
        self.result = None
        self.result_code = 0
        self.created = _now()
        self.completed = None
        self.done = threading.Event()

    def to_response(self):
        out = {'jobid': self.id, 'cmd': self.cmd,
               'jobstatus': self.status, 'jobprocstatus': 0,
               'jobresultcode': self.result_code,
               'created': cs_time(self.created)}
        if self.instance_type:
            out['jobinstancetype'] = self.instance_type
            out['jobinstanceid'] = self.instance_id
        if self.status != PENDING:
            out['jobresulttype'] = 'object'
            out['jobresult'] = self.result
            out['completed'] = cs_time(self.completed)
        return out


class Jobs:
    """The asynchronous jobs of the service.

    :param retention: seconds a finished job stays queryable.
    """

    def __init__(self, retention=3600):
        self.retention = retention
        self._jobs = {}
        self._lock = threading.Lock()

    def submit(self, func, cmd, instance_type=None, instance_id=None):
        """Run ``func()`` in a thread as a new job; return the job.

        ``func`` returns the job's result (a dict) or raises
        :class:`JobFailed`; any other exception fails the job with
        INTERNAL_ERROR.
        """
        job = Job(cmd, instance_type, instance_id)
        with self._lock:
            self._purge()
            self._jobs[job.id] = job
        thread = threading.Thread(target=self._run, args=(job, func),
                                  name='cs-job-%s' % job.id[:8], daemon=True)
        thread.start()
        return job

    def _run(self, job, func):
        try:
            result = func()
        except JobFailed as exc:
            LOG.warning('job %s (%s) failed: %s', job.id, job.cmd, exc.text)
            self._finish(job, FAILED, {'errorcode': exc.code,
                                       'errortext': exc.text}, exc.code)
        except Exception as exc:
            LOG.exception('job %s (%s) failed', job.id, job.cmd)
            self._finish(job, FAILED, {'errorcode': INTERNAL_ERROR,
                                       'errortext': '%s: %s' % (
                                           type(exc).__name__, exc)},
                         INTERNAL_ERROR)
        else:
            LOG.info('job %s (%s) succeeded', job.id, job.cmd)
            self._finish(job, SUCCEEDED, result, 0)

    @staticmethod
    def _finish(job, status, result, code):
        job.result, job.result_code = result, code
        job.completed = _now()
        job.status = status
        job.done.set()

    def get(self, job_id):
        with self._lock:
            self._purge()
            return self._jobs.get(job_id)

    def _purge(self):
        horizon = _now() - datetime.timedelta(seconds=self.retention)
        for job_id in [j.id for j in self._jobs.values()
                       if j.completed is not None and j.completed < horizon]:
            del self._jobs[job_id]
