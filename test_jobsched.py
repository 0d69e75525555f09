"""Tests for jobsched: real sockets on port 0, real child processes, real TLS.

Run: python3 -m unittest -v test_jobsched
"""

import json
import os
import re
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


def readme_text():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def readme_python_block(marker):
    """The README's ```python block whose first line is marker."""
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", readme_text(), re.S | re.M)
              if b.startswith(marker)]
    if len(blocks) != 1:
        raise AssertionError("README.md has %d python blocks starting with %r" % (len(blocks), marker))
    return blocks[0]


def example_env(**extra):
    """The environment an example runs in: ours without jobsched settings, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSCHED_")}
    env.update(extra)
    return env


def run_example(argv, env=None, timeout=60):
    return subprocess.run(argv, cwd=HERE, env=env or example_env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


class DocsTest(ClusterTestCase):
    """The README's promises and the examples/ directory, run as a user would."""

    def test_readme_embedding_example_runs_as_written(self):
        code = readme_python_block("# embedding example")
        proc = run_example([sys.executable, "-c", code])
        self.assertEqual(proc.returncode, 0, proc.stderr.decode(errors="replace"))
        out = proc.stdout.decode()
        self.assertIn("hello\nfrom a job\n", out)  # stdout and stderr of the job, in order
        self.assertIn("state: succeeded exit_code: 0", out)

    def test_example_client_follows_a_job_and_exits_with_its_status(self):
        scheduler, _, client = self.cluster(1)
        # The scheduler comes from JOBSCHED_SCHEDULER when no argument is given.
        proc = run_example([sys.executable, os.path.join(HERE, "examples", "client.py")],
                           env=example_env(JOBSCHED_SCHEDULER=scheduler.address))
        self.assertEqual(proc.returncode, 0, proc.stderr.decode(errors="replace"))
        out = proc.stdout.decode()
        head, brace, struct_text = out.partition("\n{")
        job = json.loads(brace.strip() + struct_text)
        self.assertTrue(head.startswith("started job %s\n" % job["job_id"]), out)
        self.assertTrue(head.endswith("1\n2\n3\ndone"), out)
        self.assertEqual((job["state"], job["exit_code"], job["args"]), ("succeeded", 0, ["3"]))
        self.assertEqual(job["path"], os.path.join(HERE, "examples", "count.sh"))
        self.assertEqual(client.query(job["job_id"])["output_bytes"], len("1\n2\n3\ndone\n"))

    def test_example_client_reports_an_unreachable_scheduler(self):
        never_served = jobsched.Scheduler("127.0.0.1:0")  # a port that was just ours, now closed
        address = never_served.address
        never_served.server.server_close()  # not close(): shutdown() waits for a serve loop
        proc = run_example([sys.executable, os.path.join(HERE, "examples", "client.py"), address])
        self.assertEqual(proc.returncode, 1)
        err = proc.stderr.decode()
        self.assertIn("cannot reach %s" % address, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertNotIn("Traceback", err)

    def test_example_curl_drives_every_json_route_with_the_token(self):
        if shutil.which("curl") is None:
            self.skipTest("curl is not installed")
        token = "docs-test-token-1234"
        scheduler = self.scheduler(token=token)
        self.worker(scheduler, token=token)
        client = self.client(scheduler, token=token)
        wait_until(lambda: any(w["online"] for w in client.workers()), message="worker to register")
        curl_sh = os.path.join(HERE, "examples", "curl.sh")

        refused = run_example(["sh", curl_sh], env=example_env(JOBSCHED_SCHEDULER=scheduler.address))
        self.assertEqual(refused.returncode, 1)
        self.assertIn(b"GET /workers answered HTTP 401", refused.stderr)

        proc = run_example(["sh", curl_sh], env=example_env(JOBSCHED_SCHEDULER=scheduler.address,
                                                            JOBSCHED_TOKEN=token))
        self.assertEqual(proc.returncode, 0, proc.stderr.decode(errors="replace"))
        out = proc.stdout.decode()
        for route in ("GET /workers", "POST /start", "POST /query", "POST /stop", "GET /jobs"):
            self.assertIn("> %s" % route, out)
        self.assertIn('< 201 {"job_id": ', out)
        self.assertIn('< 200 {"success": true}', out)
        self.assertIn('"state": "stopped"', out)
        self.assertNotIn(token, out)
        jobs = {j["command"]: j for j in client.jobs()}
        self.assertEqual((jobs["sh"]["state"], jobs["sh"]["args"]), ("succeeded", ["3"]))
        self.assertEqual(client.output(jobs["sh"]["job_id"])["data"], b"1\n2\n3\ndone\n")
        self.assertEqual(jobs["sleep"]["state"], "stopped")

    def test_readme_documents_every_command_and_option(self):
        readme = readme_text()
        top = self.cli("--help")
        self.assertEqual(top.returncode, 0)
        commands = re.findall(r"^    ([a-z]+)\b", top.stdout.decode(), re.M)
        self.assertIn("scheduler", commands)
        self.assertIn("demo", commands)
        for command in commands:
            self.assertRegex(readme, r"(?m)^#+ .*`%s`" % command,
                             "README.md has no section heading for %s" % command)
            usage = self.cli(command, "--help")
            self.assertEqual(usage.returncode, 0, command)
            options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", usage.stdout.decode())) - {"--help"}
            for option in sorted(options):
                self.assertIn("`%s" % option, readme, "README.md does not document %s %s"
                              % (command, option))


if __name__ == "__main__":
    unittest.main()
