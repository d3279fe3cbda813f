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
CloudStack's ExceptionResponse, ``{"uuidList": [], "errorcode": N,
"cserrorcode": C, "errortext": "..."}``, and ``jobresultcode`` N; the
text never carries a traceback). Jobs
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

_NS = uuidlib.UUID('0d6f3f4c-2f4e-5b8e-9a57-2c0a1c8d7e31')  # inventory's
ACCOUNT_ID = str(uuidlib.uuid5(_NS, 'account/admin'))
USER_ID = str(uuidlib.uuid5(_NS, 'user/admin'))

#: CloudStack's ApiErrorCode values used here (org.apache.cloudstack.api.
#: ApiErrorCode: the HTTP codes of its errors)
PARAM_ERROR = 431
UNSUPPORTED_ACTION_ERROR = 432
INTERNAL_ERROR = 530
INSUFFICIENT_CAPACITY_ERROR = 533
RESOURCE_UNAVAILABLE_ERROR = 534

#: CloudStack's CSExceptionErrorCode values used here (com.cloud.utils.
#: exception.CSExceptionErrorCode, by the exception's class)
CS_CLOUD_RUNTIME = 4250             # CloudRuntimeException
CS_INSUFFICIENT_CAPACITY = 4325     # InsufficientCapacityException
CS_INVALID_PARAMETER = 4350         # InvalidParameterValueException
CS_RESOURCE_UNAVAILABLE = 4380      # ResourceUnavailableException
CS_SERVER_API = 9999                # ServerApiException

_TRACEBACK = 'Traceback (most recent call last)'


def strip_traceback(text):
    """``text`` without any (remote) traceback, on one line.

    oslo.messaging appends the remote traceback to a rebuilt exception's
    message: it must never reach an API client.

    >>> strip_traceback('no room\\nTraceback (most recent call last):\\n  F')
    'no room'
    """
    text = str(text or '').split(_TRACEBACK)[0].strip()
    return ' '.join(line.strip() for line in text.splitlines())


def exception_response(code, text, cserrorcode):
    """CloudStack's ExceptionResponse (api.response.ExceptionResponse).

    ``uuidList`` (an empty list unless ids are attached), ``errorcode``,
    ``cserrorcode``, ``errortext``.
    """
    return {'uuidList': [], 'errorcode': code, 'cserrorcode': cserrorcode,
            'errortext': strip_traceback(text)}


class JobFailed(Exception):
    """Raised by a job's function to fail with a CloudStack error code."""

    def __init__(self, code, text, cserrorcode=CS_CLOUD_RUNTIME):
        super().__init__(text)
        self.code = code
        self.text = text
        self.cserrorcode = cserrorcode


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
        # AsyncJobResponse: accountid and userid of who ran it (the
        # service's one admin account, as inventory.OWNER)
        out = {'jobid': self.id, 'cmd': self.cmd,
               'accountid': ACCOUNT_ID, 'userid': USER_ID,
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
            self._finish(job, FAILED, exception_response(
                exc.code, exc.text, exc.cserrorcode), exc.code)
        except Exception as exc:
            LOG.exception('job %s (%s) failed', job.id, job.cmd)
            self._finish(job, FAILED, exception_response(
                INTERNAL_ERROR, '%s: %s' % (type(exc).__name__, exc),
                CS_CLOUD_RUNTIME), INTERNAL_ERROR)
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
