"""Tests for jobsched: real sockets on port 0, real child processes, real TLS.

Run: python3 -m unittest -v test_jobsched
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
import xmlrpc.client

import jobsched

HERE = os.path.dirname(os.path.abspath(__file__))
JOBSCHED = os.path.join(HERE, "jobsched.py")
COUNT_SH = os.path.join(HERE, "examples", "count.sh")


def wait_until(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll predicate until it returns a true value; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, message))
        time.sleep(interval)


class ClusterTestCase(unittest.TestCase):
    """Starts in-process roles and real processes on port 0 and cleans all of them up."""

    def tempdir(self):
        path = tempfile.mkdtemp(prefix="jobsched-test-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def scheduler(self, **kwargs):
        kwargs.setdefault("rpc_timeout", 5.0)
        scheduler = jobsched.Scheduler("127.0.0.1:0", **kwargs).start_serving()
        self.addCleanup(scheduler.close)
        return scheduler

    def worker(self, scheduler=None, state_dir=None, **kwargs):
        kwargs.setdefault("heartbeat", 0.2)
        kwargs.setdefault("stop_grace", 2.0)
        kwargs.setdefault("slots", 4)
        address = scheduler.address if isinstance(scheduler, jobsched.Scheduler) else scheduler
        worker = jobsched.Worker("127.0.0.1:0", scheduler=address,
                                 state_dir=state_dir or self.tempdir(), **kwargs).start_serving()
        self.addCleanup(worker.close)
        return worker

    def client(self, role_or_address, **kwargs):
        address = getattr(role_or_address, "address", role_or_address)
        client = jobsched.Client(address, **kwargs)
        self.addCleanup(client.close)
        return client

    def cluster(self, workers=1, **worker_kwargs):
        """A scheduler and n workers, all registered; returns (scheduler, [workers], client)."""
        scheduler = self.scheduler()
        started = [self.worker(scheduler, **worker_kwargs) for _ in range(workers)]
        client = self.client(scheduler)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == workers,
                   message="workers to register")
        return scheduler, started, client

    def wait_done(self, client, job_id, timeout=15.0):
        return wait_until(lambda: (lambda j: j if j["done"] else None)(client.query(job_id)),
                          timeout=timeout, message="job %s to finish" % job_id)

    def cli(self, *args, env=None, timeout=30, input=None):
        """Run `python jobsched.py ARGS` as a user would; returns CompletedProcess (bytes)."""
        full_env = dict(os.environ)
        full_env.pop("JOBSCHED_TOKEN", None)
        full_env.update(env or {})
        return subprocess.run([sys.executable, JOBSCHED] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=full_env, timeout=timeout,
                              stdin=subprocess.DEVNULL if input is None else None, input=input)

    def spawn(self, *args, env=None):
        """Start a long-running role (scheduler/worker) as a real process; returns (proc, address).

        The address is read from its 'listening on HOST:PORT' line; its log (stderr) goes to
        the file proc.log_path."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        log_path = os.path.join(self.tempdir(), "stderr.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, JOBSCHED] + list(args), stdout=subprocess.PIPE,
                                    stderr=log_file, stdin=subprocess.DEVNULL, env=full_env)
        proc.log_path = log_path

        def cleanup():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
        self.addCleanup(cleanup)
        line = proc.stdout.readline().decode()
        if "listening on" not in line:
            proc.kill()
            with open(log_path) as f:
                raise AssertionError("%s did not start: %r %s" % (args[0], line, f.read()))
        return proc, line.split("listening on ")[1].split()[0]


if __name__ == "__main__":
    unittest.main()
