#!/usr/bin/env python3
"""Library use of jobsched: start a job through a scheduler, follow its output, report it.

    python3 examples/client.py [SCHEDULER]

SCHEDULER is HOST:PORT (or https://HOST:PORT); without it, $JOBSCHED_SCHEDULER, else
127.0.0.1:50000. Everything else comes from the environment variables jobsched's command line
reads (jobsched.Client.from_env): the token from $JOBSCHED_TOKEN_FILE or $JOBSCHED_TOKEN, the
TLS files from $JOBSCHED_TLS_CA, $JOBSCHED_TLS_CERT and $JOBSCHED_TLS_KEY.

The job is `sh <this directory>/count.sh 3`, so the chosen worker must have count.sh at the
same path (true when the worker runs on this host from the same checkout). The job's output is
copied to stdout as it is written, then its final struct is printed as JSON, and the script
exits with the job's status: its exit code, 128+N if a signal N killed it, 1 otherwise.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # jobsched.py lives one directory up

import jobsched  # noqa: E402


def exit_status(job):
    if "exit_code" in job:
        return job["exit_code"]
    if "signal" in job:
        return 128 + job["signal"]
    return 1  # lost, or no exit recorded


def main(argv):
    try:
        client = jobsched.Client.from_env(address=argv[1] if len(argv) > 1 else None)
    except jobsched.JobschedError as e:  # e.g. a token file others may read
        print("client.py: %s" % e, file=sys.stderr)
        return 2
    try:
        # worker_id "" lets the scheduler pick the online worker with the most free slots.
        job_id = client.start("", "sh", os.path.join(HERE, "count.sh"), {"args": ["3"]})
        print("started job %s" % job_id, flush=True)
        for chunk in client.follow(job_id):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        job = client.query(job_id)
    except jobsched.JobschedError as e:
        print("client.py: %s" % e, file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(job, indent=2, sort_keys=True))
    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
