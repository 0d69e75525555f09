"""Tests for jobsched: real sockets on port 0, real child processes, real TLS.

Run: python3 -m unittest -v test_jobsched
"""

import base64
import fcntl
import hashlib
import functools
import gc
import http.client
import http.server
import json
import logging
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid
import warnings
import xmlrpc.client

import jobsched

HERE = os.path.dirname(os.path.abspath(__file__))
JOBSCHED = os.path.join(HERE, "jobsched.py")
COUNT_SH = os.path.join(HERE, "examples", "count.sh")

# The roles log through the "jobsched" logger; keep Python's last-resort handler from printing
# their warnings (e.g. "running as root") into the test report.
logging.getLogger("jobsched").addHandler(logging.NullHandler())

# A suite started in the background of a script (or under nohup) inherits SIGINT (or SIGHUP)
# ignored, and so would each process it starts, which keeps it ignored as it should: the tests
# that send those signals need them at their defaults.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


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

    def scheduler(self, kind=jobsched.Scheduler, **kwargs):
        kwargs.setdefault("rpc_timeout", 5.0)
        scheduler = kind("127.0.0.1:0", **kwargs).start_serving()
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

    def with_state_dir(self, args):
        """A scheduler's arguments with a state dir of its own: schedulers started by tests
        must not share (and lock) the default one."""
        if args and args[0] == "scheduler" and "--state-dir" not in args:
            return list(args) + ["--state-dir", self.tempdir()]
        return list(args)

    def cli(self, *args, env=None, timeout=30, input=None):
        """Run `python jobsched.py ARGS` as a user would; returns CompletedProcess (bytes)."""
        args = self.with_state_dir(args)
        full_env = dict(os.environ)
        full_env.pop("JOBSCHED_TOKEN", None)
        full_env.update(env or {})
        stdin = {"stdin": subprocess.DEVNULL} if input is None else {"input": input}  # 3.6: not both
        return subprocess.run([sys.executable, JOBSCHED] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=full_env, timeout=timeout, **stdin)

    def spawn(self, *args, env=None):
        """Start a long-running role (scheduler/worker) as a real process; returns (proc, address).

        The address is read from its 'listening on HOST:PORT' line; its log (stderr) goes to
        the file proc.log_path. A scheduler gets a state dir of its own unless args give one."""
        args = self.with_state_dir(args)
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


def free_port():
    """A port that was free a moment ago (the tiny race is accepted: a test then fails loudly)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_alive(pid):
    """True while pid exists and is not a zombie (an orphan that init has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return True


def kill_if_same(pid, start_token):
    """Cleanup for a job process that only a test failure could leave behind (guards pid reuse)."""
    if start_token is not None and jobsched.process_start_time(pid) == start_token:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def fault_of(call, *args):
    """The JobschedError a call raises (None if it succeeds)."""
    try:
        call(*args)
    except jobsched.JobschedError as e:
        return e
    return None


def worker_args(scheduler, state_dir, *extra):
    return ("worker", "--listen", "127.0.0.1:0", "--scheduler", scheduler, "--state-dir",
            state_dir, "--heartbeat", "0.2", "--stop-grace", "1") + extra


def popen_jobsched(case, args, env=None, preexec_fn=None, stdout=subprocess.PIPE):
    """`python jobsched.py ARGS` with stdout (unless given) and stderr piped; ended (SIGTERM,
    then SIGKILL) and reaped at cleanup."""
    proc = subprocess.Popen([sys.executable, JOBSCHED] + list(args), stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=subprocess.PIPE, env=env,
                            preexec_fn=preexec_fn)

    def cleanup():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    case.addCleanup(cleanup)
    return proc


def full_pipe(case):
    """A pipe full before anyone writes, that nobody reads: (read end, write end, blocking)."""
    read_end, write_end = os.pipe()
    case.addCleanup(os.close, read_end)
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    return read_end, write_end


def run_limited(case, max_file_size, *args):
    """Start `jobsched.py ARGS` with RLIMIT_FSIZE: every write past max_file_size bytes fails
    with EFBIG, as on a full disk. Returns (proc, address) once listening, or the proc if it
    exited. Its log goes nowhere: it could not be written either."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))
    proc = popen_jobsched(case, args, preexec_fn=limit)
    line = proc.stdout.readline().decode()
    if "listening on" not in line:
        return proc, None
    # Drain the log so the worker never blocks on a full pipe.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, line.split("listening on ")[1].split()[0]


class ResilienceTest(ClusterTestCase):
    """Fault injection with real processes: kill -9, restarts, SIGSTOP, full disk, retention."""

    def spawn_worker(self, scheduler, state_dir, *extra):
        """A real worker; stopped with SIGTERM at cleanup so its jobs are stopped, not orphaned."""
        proc, address = self.spawn(*worker_args(scheduler, state_dir, *extra))

        def terminate():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # in case a test stopped it
                proc.terminate()
                proc.wait(timeout=15)
        self.addCleanup(terminate)
        worker_id = self.client(address).info()["worker_id"]
        return proc, address, worker_id

    def online_ids(self, client):
        return sorted(w["worker_id"] for w in client.workers() if w["online"])

    def output_of(self, client, job_id):
        return client.output(job_id, 0, 1 << 20)["data"]

    def test_killed_worker_goes_offline_and_restart_brings_back_finished_and_lost_jobs(self):
        _, scheduler = self.spawn("scheduler", "--listen", "127.0.0.1:0", "--rpc-timeout", "2")
        state_dir = self.tempdir()
        proc, address, worker_id = self.spawn_worker(scheduler, state_dir)
        client = self.client(scheduler)
        wait_until(lambda: self.online_ids(client) == [worker_id], message="worker to register")
        finished = client.start(worker_id, "sh", "", {"args": ["-c", "echo finished; exit 3"]})
        running = client.start(worker_id, "sh", "", {
            "args": ["-c", "echo started; sleep 60 & echo $!; wait"]})
        self.wait_done(client, finished)
        # killed before its record is written, the ended job would come back lost
        wait_until(lambda: os.path.exists(os.path.join(state_dir, finished + ".json")),
                   message="the finished job's record")
        lines = wait_until(lambda: (lambda lines: len(lines) == 2 and lines)(
            self.output_of(client, running).split()), message="the job's two lines")
        leader, grandchild = client.query(running)["pid"], int(lines[1])
        for pid in (leader, grandchild):
            self.addCleanup(kill_if_same, pid, jobsched.process_start_time(pid))

        proc.kill()
        proc.wait(timeout=10)
        wait_until(lambda: not client.workers()[0]["online"], message="worker shown offline")
        self.assertEqual(client.workers()[0]["worker_id"], worker_id)
        for error in (fault_of(client.query, running), fault_of(client.stop, running),
                      fault_of(self.output_of, client, running)):
            self.assertIs(type(error), jobsched.Unavailable)  # fault 3, not our own timeout
            self.assertRegex(str(error), r"^job %s: worker %s \(%s, last seen \d+ s ago\) is offline$"
                             % (running, worker_id, re.escape(address)))
        self.assertTrue(pid_alive(leader) and pid_alive(grandchild), "orphans outlive the worker")

        _, new_address, same_id = self.spawn_worker(scheduler, state_dir)
        self.assertEqual(same_id, worker_id)
        wait_until(lambda: [(w["worker_id"], w["online"], w["address"]) for w in client.workers()]
                   == [(worker_id, True, new_address)], message="worker back at its new address")
        job = client.query(finished)
        self.assertEqual((job["state"], job["exit_code"], job["error_text"]),
                         ("failed", 3, "exit status 3"))
        self.assertEqual(self.output_of(client, finished), b"finished\n")
        job = client.query(running)
        self.assertEqual((job["state"], job["done"], job["error"]), ("lost", True, True))
        self.assertIn("worker restarted", job["error_text"])
        reply = client.output(running, 0, 1 << 20)
        self.assertEqual((reply["data"], reply["eof"]), (b"started\n%d\n" % grandchild, True))
        self.assertEqual(job["output_bytes"], len(reply["data"]))
        wait_until(lambda: not pid_alive(leader) and not pid_alive(grandchild),
                   message="the restarted worker to kill the orphaned job's process group")

    def test_restarted_scheduler_gets_workers_back_and_routes_old_jobs(self):
        scheduler_proc, scheduler = self.spawn("scheduler", "--listen", "127.0.0.1:0")
        workers = [self.spawn_worker(scheduler, self.tempdir()) for _ in range(2)]
        ids = sorted(worker_id for _, _, worker_id in workers)
        client = self.client(scheduler)
        wait_until(lambda: self.online_ids(client) == ids, message="workers to register")
        old = client.start(workers[0][2], "sleep", "", {"args": ["60"]})
        done = client.start(workers[1][2], "sh", "", {"args": ["-c", "echo old"]})
        self.wait_done(client, done)

        scheduler_proc.kill()
        scheduler_proc.wait(timeout=10)
        self.assertIsInstance(fault_of(client.workers), jobsched.Unreachable)
        self.spawn("scheduler", "--listen", scheduler)  # the same address, a new process
        wait_until(lambda: fault_of(client.workers) is None and self.online_ids(client) == ids,
                   timeout=20, message="workers to re-register with the new scheduler")
        self.assertEqual(len(client.workers()), 2)  # the same ids, no new ones
        self.assertEqual(client.query(old)["state"], "running")
        self.assertEqual(client.query(done)["state"], "succeeded")
        self.assertEqual(self.output_of(client, done), b"old\n")
        self.assertTrue(client.stop(old))
        job = client.query(old)
        self.assertEqual((job["state"], job["worker_id"]), ("stopped", workers[0][2]))
        self.assertLessEqual({old, done}, {j["job_id"] for j in client.jobs()})

    def test_worker_without_scheduler_keeps_serving_and_registers_when_it_appears(self):
        scheduler = "127.0.0.1:%d" % free_port()
        proc, address, worker_id = self.spawn_worker(scheduler, self.tempdir())
        worker = self.client(address)
        job = worker.start("sh", "", {"args": ["-c", "echo alone"]})
        self.assertEqual(self.wait_done(worker, job)["state"], "succeeded")

        def log_text():
            with open(proc.log_path) as f:
                return f.read()
        wait_until(lambda: "cannot reach scheduler" in log_text(), message="a failed attempt")
        self.assertIsNone(proc.poll())
        self.assertEqual(worker.info()["worker_id"], worker_id)

        self.spawn("scheduler", "--listen", scheduler)
        client = self.client(scheduler)
        wait_until(lambda: self.online_ids(client) == [worker_id], timeout=20,
                   message="the worker to register once the scheduler is up")
        self.assertEqual(client.query(job)["state"], "succeeded")  # found by asking the workers

    def test_stopped_worker_costs_only_its_own_requests(self):
        _, scheduler = self.spawn("scheduler", "--listen", "127.0.0.1:0", "--rpc-timeout", "1.5")
        _, healthy_address, healthy_id = self.spawn_worker(scheduler, self.tempdir())
        # A long heartbeat keeps the hung worker "online", so requests really go to it.
        hung, hung_address, hung_id = self.spawn_worker(scheduler, self.tempdir(),
                                                        "--heartbeat", "5")
        client = self.client(scheduler)
        wait_until(lambda: self.online_ids(client) == sorted([healthy_id, hung_id]),
                   message="workers to register")
        healthy_job = client.start(healthy_id, "sh", "", {"args": ["-c", "echo healthy"]})
        hung_job = client.start(hung_id, "sh", "", {"args": ["-c", "echo hung"]})
        self.wait_done(client, healthy_job)
        self.wait_done(client, hung_job)

        hung.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: hung.poll() is None and hung.send_signal(signal.SIGCONT))
        # A scheduler that knows no job ids yet (as after a restart) asks every worker.
        fresh = self.scheduler(rpc_timeout=1.5)
        for address, worker_id in ((healthy_address, healthy_id), (hung_address, hung_id)):
            fresh.register(address, {"worker_id": worker_id})
        outcome = {}
        request = threading.Thread(target=lambda: outcome.update(
            error=fault_of(client.query, hung_job),
            unknown=fault_of(self.client(fresh).query, "no-such-job")))
        request.start()
        # Shorter than the scheduler's --rpc-timeout: would time out if the hung worker held a
        # lock or a connection that these requests need.
        self.assertEqual(self.client(fresh, timeout=1.0).query(healthy_job)["state"], "succeeded")
        quick = self.client(scheduler, timeout=1.0)
        calls = 0
        deadline = time.monotonic() + 20
        while request.is_alive() and time.monotonic() < deadline:
            self.assertEqual(quick.query(healthy_job)["state"], "succeeded")
            self.assertIn(hung_id, [w["worker_id"] for w in quick.workers()])
            self.assertEqual(self.output_of(quick, healthy_job), b"healthy\n")
            calls += 1
        request.join(timeout=20)
        self.assertGreater(calls, 0)
        self.assertIs(type(outcome["error"]), jobsched.Unavailable)  # fault 3 from the scheduler
        self.assertIn("timed out", str(outcome["error"]))
        # Not "not found": the job may be on the worker that did not answer.
        self.assertIs(type(outcome["unknown"]), jobsched.Unavailable)
        self.assertIn("did not", str(outcome["unknown"]))

        hung.send_signal(signal.SIGCONT)
        wait_until(lambda: fault_of(client.query, hung_job) is None, message="recovery")
        self.assertEqual(client.query(hung_job)["state"], "succeeded")
        self.assertEqual(self.output_of(client, hung_job), b"hung\n")

    def test_keep_jobs_removes_oldest_records_and_output(self):
        state_dir = self.tempdir()
        _, address, _ = self.spawn_worker("", state_dir, "--keep-jobs", "3")
        worker = self.client(address)
        ids = []
        for i in range(5):
            ids.append(worker.start("sh", "", {"args": ["-c", "echo job %d" % i]}))
            self.wait_done(worker, ids[-1])
            # Retention goes by the order records are written: the next job must not end first.
            wait_until(lambda: os.path.exists(os.path.join(state_dir, ids[-1] + ".json")),
                       message="the record of job %d" % i)
        wait_until(lambda: all(isinstance(fault_of(worker.query, j), jobsched.NotFound)
                               for j in ids[:2]), message="the oldest two to expire")
        for i, job_id in enumerate(ids[2:], 2):
            self.assertEqual(worker.query(job_id)["state"], "succeeded")
            self.assertEqual(self.output_of(worker, job_id), b"job %d\n" % i)
        self.assertIs(type(fault_of(self.output_of, worker, ids[0])), jobsched.NotFound)
        expected = {j + ext for j in ids[2:] for ext in (".json", ".out")}
        # retention forgets a job first, then removes its output, then its record
        wait_until(lambda: {name for name in os.listdir(state_dir)
                            if name.endswith((".json", ".out"))} == expected,
                   message="the files of the expired jobs to go")
        self.assertEqual([j["job_id"] for j in worker.jobs()], ids[2:])

    def test_full_disk_fails_start_cleanly_and_worker_keeps_serving(self):
        _, scheduler = self.spawn("scheduler", "--listen", "127.0.0.1:0")
        state_dir = self.tempdir()
        # Room for the 37-byte worker_id file, not for a job record.
        full, address = run_limited(self, 100, *worker_args(scheduler, state_dir))
        self.assertIsNotNone(address, full.stderr.read().decode() if full.poll() else "")
        full_id = self.client(address).info()["worker_id"]
        _, _, ok_id = self.spawn_worker(scheduler, self.tempdir())
        client = self.client(scheduler)
        wait_until(lambda: self.online_ids(client) == sorted([full_id, ok_id]),
                   message="workers to register")

        error = fault_of(client.start, full_id, "sleep", "", {"args": ["30"]})
        self.assertIs(type(error), jobsched.Unavailable)
        self.assertIn("cannot write job", str(error))
        self.assertIn(state_dir, str(error))
        self.assertEqual(sorted(os.listdir(state_dir)), ["journal", "lock", "worker_id"])
        self.assertEqual(os.path.getsize(os.path.join(state_dir, "journal")), 0)  # no half line
        self.assertEqual(self.client(address).jobs(), [])
        since = time.time()
        wait_until(lambda: [w["last_seen"] for w in client.workers()
                            if w["worker_id"] == full_id][0] > since and
                   self.online_ids(client) == sorted([full_id, ok_id]),
                   message="the full worker to keep heartbeating")
        for _ in range(3):  # placement skips the refusing worker
            job_id = client.start("", "sh", "", {"args": ["-c", "exit 0"]})
            self.assertEqual(self.wait_done(client, job_id)["worker_id"], ok_id)

    def test_unwritable_state_dir_refuses_start_then_recovers(self):
        state_dir = self.tempdir()
        worker = self.worker(None, state_dir=state_dir)
        client = self.client(worker)
        os.rename(state_dir, state_dir + ".gone")  # e.g. removed by a tmp cleaner
        self.addCleanup(lambda: os.path.isdir(state_dir + ".gone") and os.rename(
            state_dir + ".gone", state_dir))
        error = fault_of(client.start, "sh", "", {"args": ["-c", "exit 0"]})
        self.assertIs(type(error), jobsched.Unavailable)
        self.assertIn("cannot write job output in %s" % state_dir, str(error))
        self.assertEqual(client.jobs(), [])
        self.assertEqual(client.info()["running"], 0)  # the slot was given back
        os.rename(state_dir + ".gone", state_dir)
        job_id = client.start("sh", "", {"args": ["-c", "exit 0"]})
        self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")

    def test_worker_on_unwritable_state_dir_exits_2_with_a_message(self):
        state_dir = self.tempdir()
        proc, address = run_limited(self, 10, *worker_args("", state_dir))  # worker_id won't fit
        self.assertIsNone(address)
        stderr = proc.communicate(timeout=15)[1].decode()
        self.assertEqual(proc.returncode, 2, stderr)
        self.assertIn("cannot use state dir %s" % state_dir, stderr)
        self.assertNotIn("Traceback", stderr)


def job_keys(*extra):
    """The keys of a job struct: those every job has, plus extra."""
    return {"job_id", "worker_id", "command", "path", "args", "state", "done", "error",
            "error_text", "pid", "started_at", "output_bytes"} | set(extra)


def worker_keys():
    return {"worker_id", "address", "online", "slots", "running", "last_seen", "hostname", "version"}


def py_args(code, *args):
    """start() options that run `python -c code args...`."""
    return {"args": ["-c", code] + list(args)}


def sh_args(script, *args):
    """start() options that run `sh -c script sh args...` (the command is "sh")."""
    return {"args": ["-c", script, "sh"] + list(args)}


def read_pidfile(path):
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") and text.strip().isdigit() else None


def raw_fault(address, method, *params):
    """(faultCode, faultString) of a raw XML-RPC call that must fault."""
    proxy = xmlrpc.client.ServerProxy("http://%s/RPC2" % address)
    try:
        getattr(proxy, method)(*params)
    except xmlrpc.client.Fault as fault:
        return fault.faultCode, fault.faultString
    finally:
        proxy("close")()
    raise AssertionError("%s%r did not fault" % (method, params))


def no_proxy_open(request):
    """urlopen, ignoring any http_proxy in the environment: the servers are on loopback."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30)


def http_call(address, method, path, body=None):
    """(status, decoded JSON reply) of one request; body is a dict (sent as JSON) or bytes."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
    request = urllib.request.Request("http://%s%s" % (address, path), data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with no_proxy_open(request) as reply:
            return reply.status, json.loads(reply.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read().decode("utf-8"))
        finally:
            e.close()


def raw_xmlrpc(address, method, *params, path="/RPC2"):
    """The raw body of an XML-RPC response, as any other language's client would see it."""
    body = xmlrpc.client.dumps(params, method).encode("utf-8")
    request = urllib.request.Request("http://%s%s" % (address, path), data=body, method="POST",
                                     headers={"Content-Type": "text/xml"})
    with no_proxy_open(request) as reply:
        return reply.read()


def read_until(proc, marker, timeout=20.0):
    """Read proc.stdout (unbuffered, from its fd) until marker shows up; returns what was read."""
    fd, data = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for %r; got %r" % (marker, data))
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError("EOF before %r; got %r" % (marker, data))
            data += chunk
    return data


def job_files(state_dir):
    return sorted(n for n in os.listdir(state_dir) if n not in ("journal", "lock", "worker_id"))


class WorkerRPCTest(ClusterTestCase):
    """The worker's RPCs called directly on a standalone worker (scheduler=None), one for the
    class; each test stops the jobs it leaves running."""

    @classmethod
    def setUpClass(cls):
        cls.state_dir = tempfile.mkdtemp(prefix="jobsched-test-")
        try:
            cls.w = jobsched.Worker("127.0.0.1:0", scheduler=None, state_dir=cls.state_dir, slots=16,
                                    stop_grace=1.0).start_serving()
        except BaseException:
            shutil.rmtree(cls.state_dir, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.w.close()
        shutil.rmtree(cls.state_dir, ignore_errors=True)

    def setUp(self):
        self.c = self.client(self.w)

    def start_running(self, command, options=None, path=""):
        job_id = self.c.start(command, path, options or {})
        self.addCleanup(self.c.stop, job_id)
        return job_id

    def start_done(self, command, options=None, path=""):
        return self.wait_done(self.c, self.c.start(command, path, options or {}))

    def test_success_struct_and_go_wording(self):
        job = self.start_done("sh", sh_args("printf hi"))
        self.assertEqual(set(job), job_keys("exit_code", "finished_at"))
        self.assertEqual((job["state"], job["done"], job["error"], job["error_text"], job["exit_code"]),
                         ("succeeded", True, False, "", 0))
        self.assertEqual(job["worker_id"], self.w.worker_id)
        self.assertEqual((job["command"], job["path"], job["args"]), ("sh", "", sh_args("printf hi")["args"]))
        self.assertEqual(job["output_bytes"], 2)
        self.assertIsInstance(job["pid"], int)
        self.assertLessEqual(job["started_at"], job["finished_at"])
        self.assertLess(abs(job["finished_at"] - time.time()), 3600)  # seconds since the epoch
        uuid.UUID(job["job_id"])

    def test_exit_status(self):
        job = self.start_done("sh", sh_args("exit 3"))
        self.assertEqual((job["state"], job["error"], job["error_text"], job["exit_code"]),
                         ("failed", True, "exit status 3", 3))
        self.assertNotIn("signal", job)

    def test_killed_by_signal(self):
        job = self.start_done("sh", sh_args("kill -9 $$"))
        self.assertEqual((job["state"], job["error"], job["error_text"], job["signal"]),
                         ("failed", True, "signal: killed", 9))
        self.assertNotIn("exit_code", job)

    def test_running_struct_then_stop(self):
        job_id = self.start_running("sleep", {"args": ["300"]})
        running = self.c.query(job_id)
        self.assertEqual((running["state"], running["done"], running["error"], running["error_text"]),
                         ("running", False, False, ""))
        self.assertEqual(set(running), job_keys("stop_grace"))
        self.assertTrue(pid_alive(running["pid"]))
        self.assertIs(self.c.stop(job_id), True)
        job = self.c.query(job_id)  # stop returns once the job has ended
        self.assertEqual((job["state"], job["done"], job["error"], job["error_text"], job["signal"]),
                         ("stopped", True, True, "signal: terminated", signal.SIGTERM))
        self.assertEqual(set(job), job_keys("signal", "finished_at"))
        self.assertIs(self.c.stop(job_id), True)  # finished: a no-op returning true
        self.assertEqual(self.c.query(job_id), job)

    def test_timeout(self):
        job = self.start_done("sleep", {"args": ["300"], "timeout": 0.2})
        self.assertEqual((job["state"], job["error_text"], job["signal"]),
                         ("timeout", "signal: terminated", signal.SIGTERM))

    def test_argv_is_command_path_args_without_shell(self):
        script = os.path.join(self.tempdir(), "argv.py")
        with open(script, "w") as f:
            f.write("import json, sys\nsys.stdout.write(json.dumps(sys.argv))\n")
        args = ["a b", "$HOME", "*", ";echo x", "", "'\""]
        job = self.start_done(sys.executable, {"args": args}, path=script)
        self.assertEqual(job["path"], script)
        self.assertEqual(json.loads(self.c.output(job["job_id"])["data"].decode()), [script] + args)
        job = self.start_done(sys.executable, py_args("import json,sys; print(json.dumps(sys.argv[1:]))", *args))
        self.assertEqual(json.loads(self.c.output(job["job_id"])["data"].decode()), args)

    def test_env_added_and_cwd(self):
        cwd = os.path.realpath(self.tempdir())
        job = self.start_done("sh", dict(sh_args('printf "%s|%s|%s" "$JOBSCHED_T_VAR" "$(pwd)" "${PATH:+set}"'),
                                         env={"JOBSCHED_T_VAR": "a b=c"}, cwd=cwd))
        self.assertEqual(self.c.output(job["job_id"])["data"].decode(), "a b=c|%s|set" % cwd)

    def test_stdout_and_stderr_in_order(self):
        job = self.start_done("sh", sh_args("echo out1; echo err1 >&2; echo out2; echo err2 >&2"))
        self.assertEqual(self.c.output(job["job_id"])["data"], b"out1\nerr1\nout2\nerr2\n")
        with open(os.path.join(self.state_dir, job["job_id"] + ".out"), "rb") as f:
            self.assertEqual(f.read(), b"out1\nerr1\nout2\nerr2\n")

    def test_output_offset_max_bytes_eof(self):
        job_id = self.start_done("sh", sh_args("printf 0123456789"))["job_id"]
        out = self.c.output(job_id, 0, 4)
        self.assertEqual((out["data"], out["offset"], out["eof"]), (b"0123", 4, False))
        out = self.c.output(job_id, 4, 100)
        self.assertEqual((out["data"], out["offset"], out["eof"]), (b"456789", 10, True))
        out = self.c.output(job_id, 10, 100)
        self.assertEqual((out["data"], out["offset"], out["eof"]), (b"", 10, True))
        out = self.c.output(job_id, 3, 0)
        self.assertEqual((out["data"], out["offset"], out["eof"]), (b"", 3, False))
        # Any number of readers, from any offset, after the end: a second client agrees.
        self.assertEqual(self.client(self.w).output(job_id, 7, 2)["data"], b"78")

    def test_output_max_bytes_capped_at_1_mib(self):
        job_id = self.start_done(sys.executable, py_args(
            "import sys; sys.stdout.buffer.write(b'x' * (3 * 1024 * 1024 // 2))"))["job_id"]
        out = self.c.output(job_id, 0, 8 * 1024 * 1024)
        self.assertEqual((len(out["data"]), out["offset"], out["eof"]), (1024 * 1024, 1024 * 1024, False))
        out = self.c.output(job_id, out["offset"], 8 * 1024 * 1024)
        self.assertEqual((len(out["data"]), out["eof"]), (512 * 1024, True))

    def test_binary_output_survives(self):
        payload = bytes(range(256)) + b"\xff\xfe\xc3(\x00\r\n\x1b[31m]]>"
        job_id = self.start_done(sys.executable, py_args(
            "import sys; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1]))", payload.hex()))["job_id"]
        self.assertEqual(self.c.output(job_id)["data"], payload)
        self.assertEqual(self.c.query(job_id)["output_bytes"], len(payload))

    def test_long_poll_returns_when_bytes_arrive(self):
        # The job prints "ready", then one line per SIGUSR1; it ends on SIGTERM.
        job_id = self.start_running(sys.executable, py_args(
            "import signal, sys\n"
            "signal.signal(signal.SIGUSR1, lambda *a: (sys.stdout.write('hello\\n'), sys.stdout.flush()))\n"
            "print('ready', flush=True)\n"
            "while True: signal.pause()\n"))
        wait_until(lambda: self.c.output(job_id)["data"] == b"ready\n", message="ready")
        quiet = self.c.output(job_id, 6, 100, 0.2)  # no new bytes: waits, then answers empty
        self.assertEqual((quiet["data"], quiet["offset"], quiet["eof"]), (b"", 6, False))
        replies = []
        poller = threading.Thread(target=lambda: replies.append(self.c.output(job_id, 6, 100, 60)))
        poller.start()
        self.addCleanup(poller.join, 70)
        os.kill(self.c.query(job_id)["pid"], signal.SIGUSR1)
        poller.join(20)  # far below wait_seconds=60: it answered because bytes came
        self.assertFalse(poller.is_alive(), "output() kept waiting after bytes arrived")
        self.assertEqual((replies[0]["data"], replies[0]["offset"], replies[0]["eof"]),
                         (b"hello\n", 12, False))
        # And a long-poll with nothing to read ends when the job ends.
        poller = threading.Thread(target=lambda: replies.append(self.c.output(job_id, 12, 100, 60)))
        poller.start()
        self.addCleanup(poller.join, 70)
        self.c.stop(job_id)
        poller.join(20)
        self.assertFalse(poller.is_alive(), "output() kept waiting after the job ended")
        self.assertEqual((replies[1]["data"], replies[1]["eof"]), (b"", True))

    def test_stop_kills_grandchild(self):
        pidfile = os.path.join(self.tempdir(), "pid")
        # The grandchild ignores SIGTERM; its parent dies of it: only the group KILL can get it.
        job_id = self.start_running("sh", sh_args('(trap "" TERM; exec sleep 300) & echo $! > "$1"; wait', pidfile))
        grandchild = wait_until(lambda: read_pidfile(pidfile), message="grandchild pid")
        self.addCleanup(lambda: pid_alive(grandchild) and os.kill(grandchild, signal.SIGKILL))
        self.assertTrue(pid_alive(grandchild))
        self.assertIs(self.c.stop(job_id), True)
        wait_until(lambda: not pid_alive(grandchild), message="grandchild to die")
        self.assertEqual(self.c.query(job_id)["state"], "stopped")

    def test_stop_kills_after_grace(self):
        pidfile = os.path.join(self.tempdir(), "pid")
        c = self.client(self.worker(None, stop_grace=0.3))
        job_id = c.start("sh", "", sh_args('trap "" TERM; sleep 300 & echo $! > "$1"; wait', pidfile))
        grandchild = wait_until(lambda: read_pidfile(pidfile), message="grandchild pid")
        self.addCleanup(lambda: pid_alive(grandchild) and os.kill(grandchild, signal.SIGKILL))
        self.assertIs(c.stop(job_id), True)
        job = c.query(job_id)
        self.assertEqual((job["state"], job["error_text"], job["signal"]),
                         ("stopped", "signal: killed", signal.SIGKILL))
        wait_until(lambda: not pid_alive(grandchild), message="grandchild to die")

    def test_cannot_start_is_fault_2_without_files(self):
        jobs_before = self.c.jobs()
        # An ended job's record is written just after its end is seen (earlier tests' jobs).
        wait_until(lambda: all(os.path.exists(os.path.join(self.state_dir, j["job_id"] + ".json"))
                               for j in jobs_before if j["done"]), message="earlier records")
        before = job_files(self.state_dir)
        plain = os.path.join(self.tempdir(), "not-executable")
        with open(plain, "w") as f:
            f.write("#!/bin/sh\necho hi\n")
        os.chmod(plain, 0o644)
        cases = [("/nonexistent/jobsched-cmd", {}, "No such file"),
                 ("jobsched-no-such-command-%s" % uuid.uuid4().hex[:8], {}, "No such file"),
                 (plain, {}, "Permission denied"),
                 ("sh", dict(sh_args("true"), cwd="/nonexistent/jobsched-dir"), "No such file")]
        for command, options, reason in cases:
            with self.subTest(command=command, options=options):
                code, message = raw_fault(self.w.address, "start", command, "", options)
                self.assertEqual(code, 2)
                self.assertIn(reason, message)
                self.assertNotIn("\n", message)
                with self.assertRaises(jobsched.BadRequest):
                    self.c.start(command, "", options)
        self.assertEqual(job_files(self.state_dir), before)
        self.assertEqual(len(self.c.jobs()), len(jobs_before))
        self.assertEqual(self.c.info()["running"], sum(not j["done"] for j in jobs_before))

    def test_bad_requests_are_fault_2_unknown_job_fault_1(self):
        address = self.w.address
        for method, params in [("start", ("sh", "", {"bogus": 1})), ("start", (5, "")),
                               ("start", ("sh", "", {"args": "notalist"})),
                               ("start", ("sh", "", {"env": {"A": 1}})),
                               ("start", ("sh", "", {"timeout": "soon"})),
                               ("start", ("", "")), ("query", (5,)), ("query", ("a", "b")),
                               ("output", ("x", "a", 10)), ("output", ("x", -1, 10)),
                               ("no_such_method", ()), ("_get", ("x",))]:
            with self.subTest(method=method, params=params):
                self.assertEqual(raw_fault(address, method, *params)[0], 2)
        for method, params in [("query", ("nope",)), ("stop", ("nope",)), ("output", ("nope", 0, 10))]:
            with self.subTest(method=method):
                self.assertEqual(raw_fault(address, method, *params)[0], 1)

    def test_jobs_and_info(self):
        first = self.start_done("sh", sh_args("true"))
        second = self.start_running("sleep", {"args": ["300"]})
        jobs = self.c.jobs()
        self.assertEqual([j["job_id"] for j in jobs][-2:], [first["job_id"], second])  # oldest first
        self.assertEqual(jobs[-2], first)
        info = self.c.info()
        self.assertLessEqual(worker_keys(), set(info))
        self.assertEqual((info["worker_id"], info["address"], info["online"], info["slots"], info["running"],
                          info["version"]), (self.w.worker_id, self.w.address, True, 16,
                                             sum(not j["done"] for j in jobs), jobsched.__version__))
        self.assertNotEqual(self.w.address.rsplit(":", 1)[1], "0")

    def test_full_worker_refuses_with_fault_3(self):
        w = self.worker(None, slots=1)
        c = self.client(w)
        job_id = c.start("sleep", "", {"args": ["300"]})
        self.assertEqual(raw_fault(w.address, "start", "sleep", "", {"args": ["1"]})[0], 3)
        c.stop(job_id)
        self.wait_done(c, c.start("true", ""))  # the slot is free again

    def test_no_nil_in_responses(self):
        job_id = self.start_running("sleep", {"args": ["300"]})
        for path in ("/RPC2", "/"):
            for method, params in [("query", (job_id,)), ("jobs", ()), ("info", ()),
                                   ("output", (job_id, 0, 10)), ("query", ("nope",))]:
                body = raw_xmlrpc(self.w.address, method, *params, path=path)
                self.assertNotIn(b"<nil", body)
                self.assertIn(b"<methodResponse>", body)


class WorkerStateDirTest(ClusterTestCase):

    def test_restart_keeps_worker_id_and_finished_jobs(self):
        state_dir = self.tempdir()
        first = self.worker(None, state_dir=state_dir)
        c = self.client(first)
        job_id = c.start("sh", "", sh_args("echo out; echo err >&2; exit 3"))
        job = self.wait_done(c, job_id)
        first.close()
        second = self.worker(None, state_dir=state_dir)
        self.assertEqual(second.worker_id, first.worker_id)
        c = self.client(second)
        self.assertEqual(c.query(job_id), job)
        self.assertEqual(c.output(job_id, 0, 100)["data"], b"out\nerr\n")
        self.assertEqual(c.output(job_id, 4, 100), {"data": b"err\n", "offset": 8, "eof": True})
        self.assertEqual(c.jobs(), [job])
        self.assertEqual(c.stop(job_id), True)

    def test_keep_jobs_holds_on_disk_and_across_a_restart(self):
        state_dir = self.tempdir()
        c = self.client(self.worker(None, state_dir=state_dir, keep_jobs=1))
        ids = [c.start("sh", "", sh_args("exit %d" % (n % 3))) for n in range(30)]
        for job_id in ids:
            wait_until(lambda: fault_of(c.query, job_id) or c.query(job_id)["done"],
                       message="job %s to end or be removed" % job_id)
        def kept():  # the job that finished last: not always the last one started
            files = job_files(state_dir)
            return len(files) == 2 and files[0][:-5] == files[1][:-4] and files[1][:-4]
        job_id = wait_until(kept, message="only the files of the job that finished last")
        c2 = self.client(self.worker(None, state_dir=self.restart_copy(state_dir), keep_jobs=1))
        self.assertEqual([(j["job_id"], j["exit_code"]) for j in c2.jobs()],
                         [(job_id, ids.index(job_id) % 3)])

    def restart_copy(self, state_dir):
        """The state dir as a worker restarted on it would find it (the original stays locked)."""
        copy = os.path.join(self.tempdir(), "copy")
        shutil.copytree(state_dir, copy)
        return copy

    def test_journal_is_rewritten_with_the_running_jobs_only(self):
        self.addCleanup(setattr, jobsched, "JOURNAL_LIMIT", jobsched.JOURNAL_LIMIT)
        jobsched.JOURNAL_LIMIT = 1  # rewrite before every start
        state_dir = self.tempdir()
        worker = self.worker(None, state_dir=state_dir)
        c = self.client(worker)
        running = c.start("sleep", "", {"args": ["300"]})
        self.addCleanup(c.stop, running)
        finished = [c.start("sh", "", sh_args("exit %d" % n)) for n in (0, 3)]
        for job_id in finished:
            self.wait_done(c, job_id)
        # A record counts once its file is written and its journal line let go (just after).
        def recorded():
            with worker.state.lock:
                return set(finished) <= set(worker.state._finished)
        wait_until(recorded, message="the records of the ended jobs")
        last = c.start("true", "")  # its rewrite drops the lines of the jobs that have ended
        self.wait_done(c, last)
        records = [os.path.join(state_dir, job_id + ".json") for job_id in finished + [last]]
        wait_until(lambda: all(map(os.path.exists, records)),
                   message="the final records")  # nothing writes during the copy
        with open(os.path.join(state_dir, "journal"), "rb") as f:
            ids = [json.loads(line.decode())["job_id"] for line in f]
        self.assertIn(running, ids)
        self.assertFalse(set(finished) & set(ids))
        # A copy of the state dir is what a crash would leave: the ended jobs are intact and the
        # running one is lost (and its process killed, being the same process).
        crashed = os.path.join(self.tempdir(), "copy")
        shutil.copytree(state_dir, crashed)
        c2 = self.client(self.worker(None, state_dir=crashed))
        self.assertEqual([c2.query(j)["exit_code"] for j in finished], [0, 3])
        self.assertEqual(c2.query(running)["state"], "lost")
        self.assertEqual(self.wait_done(c, running)["signal"], signal.SIGKILL)

    def test_jobs_running_when_the_worker_died_come_back_lost_and_killed(self):
        state_dir, pidfile = self.tempdir(), os.path.join(self.tempdir(), "pid")
        proc, address = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", "",
                                   "--state-dir", state_dir)
        c = self.client(address)
        job_id = c.start("sh", "", sh_args('sleep 300 & echo $! > "$1"; wait', pidfile))
        leader = c.query(job_id)["pid"]
        grandchild = wait_until(lambda: read_pidfile(pidfile), message="grandchild pid")
        for pid in (leader, grandchild):
            self.addCleanup(lambda pid=pid: pid_alive(pid) and os.kill(pid, signal.SIGKILL))
        proc.kill()  # no chance to stop its jobs
        proc.wait(timeout=10)
        self.assertTrue(pid_alive(grandchild))
        c = self.client(self.worker(None, state_dir=state_dir))
        job = c.query(job_id)
        self.assertEqual((job["state"], job["done"], job["error"]), ("lost", True, True))
        wait_until(lambda: not pid_alive(leader) and not pid_alive(grandchild),
                   message="the lost job's processes to be killed")

    def test_second_worker_on_state_dir_exits_2(self):
        state_dir = self.tempdir()
        self.worker(None, state_dir=state_dir)
        result = self.cli("worker", "--listen", "127.0.0.1:0", "--scheduler", "", "--state-dir", state_dir)
        self.assertEqual(result.returncode, 2, result.stderr)
        stderr = result.stderr.decode()
        self.assertIn(state_dir, stderr)
        self.assertIn("in use", stderr)
        self.assertNotIn("Traceback", stderr)
        with self.assertRaises(jobsched.ConfigError):
            jobsched.Worker("127.0.0.1:0", scheduler=None, state_dir=state_dir)


class SchedulerTest(ClusterTestCase):

    def one_running_one_ended(self, kind, **worker_kwargs):
        """A scheduler of this kind, a worker, a job running on it and one that has ended;
        returns (client, worker)."""
        scheduler = self.scheduler(kind)
        worker = self.worker(scheduler, **worker_kwargs)
        c = self.client(scheduler)
        wait_until(lambda: c.workers(), message="the worker to register")
        running = c.start("", "sleep", "", {"args": ["30"]})
        self.addCleanup(c.stop, running)
        self.wait_done(c, c.start("", "true", ""))
        return c, worker

    def test_a_late_end_report_does_not_take_a_running_job_off_the_count(self):
        class SlowReports(jobsched.Scheduler):
            def job_ended(self, worker_id, jobs):
                time.sleep(0.6)  # heartbeats sent after the end arrive first
                return super().job_ended(worker_id, jobs)
        c, _ = self.one_running_one_ended(SlowReports)
        counts = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # through the report, and heartbeats on either side
            counts.append(c.workers()[0]["running"])
            time.sleep(0.01)
        self.assertNotIn(0, counts)
        self.assertEqual(counts[-1], 1)

    def test_a_heartbeat_that_crossed_an_end_report_is_followed_by_another(self):
        worker = None
        class SlowAnswers(jobsched.Scheduler):
            def job_ended(self, worker_id, jobs):
                answer = super().job_ended(worker_id, jobs)
                worker._beat_now.set()  # a heartbeat now still counts the ended job
                time.sleep(0.6)
                return answer
        c, worker = self.one_running_one_ended(SlowAnswers, heartbeat=5.0)
        wait_until(lambda: c.workers()[0]["running"] == 2, message="the crossing heartbeat")
        # Without another heartbeat once the report is answered, 2 would stay for 5 s.
        wait_until(lambda: c.workers()[0]["running"] == 1, timeout=2.5,
                   message="a heartbeat after the report")

    def test_a_refused_end_report_is_sent_again(self):
        refused = []
        class RefusesOnce(jobsched.Scheduler):
            def job_ended(self, worker_id, jobs):
                if not refused:  # as a scheduler shutting down refuses it
                    refused.append(jobs)
                    raise jobsched.Unavailable(jobsched.SCHEDULER_SHUTTING_DOWN)
                return super().job_ended(worker_id, jobs)
        scheduler = self.scheduler(RefusesOnce, state_dir=self.tempdir())
        self.worker(scheduler, heartbeat=30.0)
        c = self.client(scheduler)
        wait_until(lambda: c.workers(), message="the worker to register")
        (job_id,) = c.submit([{"command": "true"}])
        # wait() answers from the queue, which learns the end only from the report.
        self.assertEqual(c.wait([job_id], 20), [{"job_id": job_id, "state": "succeeded"}])
        self.assertEqual([job["job_id"] for job in refused[0]], [job_id])

    def test_job_index_packs_ids_keeps_the_newest_and_forgets_the_oldest(self):
        for name, value in (("JOB_INDEX_SEGMENT", 4), ("JOB_INDEX_LIMIT", 12)):
            self.addCleanup(setattr, jobsched, name, getattr(jobsched, name))
            setattr(jobsched, name, value)
        index = jobsched.JobIndex()
        ids = [str(uuid.uuid4()) for _ in range(13)]
        for n, job_id in enumerate(ids):
            index.add(job_id, "worker-%d" % (n % 3))
        index.add("NOT-A-UUID", "worker-x")   # kept as a string, packed all the same
        index.add(ids[5], "worker-moved")      # the newest entry for an id wins
        self.assertEqual(len(index._segments), 3)  # 3 x 4 ids; 3 in the dict
        self.assertEqual(len(index), 15)
        self.assertEqual([index.get(job_id) for job_id in ids],
                         ["worker-%d" % (n % 3) if n != 5 else "worker-moved" for n in range(13)])
        self.assertEqual(index.get("NOT-A-UUID"), "worker-x")
        for job_id in ids[4:]:  # a listing again: known ids take no room
            index.add(job_id, index.get(job_id))
        self.assertEqual((len(index._segments), len(index)), (3, 15))
        self.assertEqual(index.get(ids[4].upper(), "?"), "?")  # ids are looked up as given
        for _ in range(4):
            index.add(str(uuid.uuid4()), "worker-0")  # packs a 4th segment: 16 > 12 drops the 1st
        self.assertEqual((len(index._segments), len(index)), (3, 15))
        self.assertEqual([index.get(job_id) for job_id in ids[:4]], [None] * 4)
        self.assertEqual(index.get(ids[5]), "worker-moved")
        self.assertEqual(index.get(str(uuid.uuid4()), "unknown"), "unknown")
        # A scheduler still knows where a packed job was placed: another worker is refused.
        jobsched.JOB_INDEX_SEGMENT = 2
        scheduler, (a, b), c = self.cluster(2)
        placed = [c.start(a.worker_id, "true", "") for _ in range(3)]
        for job_id in placed:
            with self.assertRaises(jobsched.BadRequest) as caught:
                c.start(b.worker_id, "true", "", {"job_id": job_id})
            self.assertIn("was placed on worker %s" % a.worker_id, str(caught.exception))
            self.assertEqual(c.query(job_id)["worker_id"], a.worker_id)

    def test_workers_listing_and_routing(self):
        scheduler, (w,), c = self.cluster(1)
        (listed,) = c.workers()
        self.assertLessEqual(worker_keys(), set(listed))
        self.assertEqual((listed["worker_id"], listed["address"], listed["online"], listed["slots"]),
                         (w.worker_id, w.address, True, 4))
        job_id = c.start("", "sh", "", sh_args("printf routed"))
        job = self.wait_done(c, job_id)
        self.assertEqual((job["worker_id"], job["state"]), (w.worker_id, "succeeded"))
        self.assertEqual(c.output(job_id, 0, 100)["data"], b"routed")
        self.assertEqual(c.query(w.worker_id, job_id), job)  # the seed's two-argument forms
        self.assertIs(c.stop(w.worker_id, job_id), True)
        self.assertEqual([j["job_id"] for j in c.jobs()], [job_id])
        job_id = c.start(w.worker_id, "sleep", "", {"args": ["300"]})
        self.assertEqual(c.query(job_id)["state"], "running")
        self.assertIs(c.stop(job_id), True)
        self.assertEqual(c.query(job_id)["state"], "stopped")
        # A job the scheduler never routed (started on the worker directly) is found too.
        direct = self.client(w).start("true", "")
        self.assertEqual(self.wait_done(c, direct)["worker_id"], w.worker_id)

    def test_binary_output_through_scheduler(self):
        scheduler, (w,), c = self.cluster(1)
        payload = bytes(range(256)) * 3 + b"\xff\xfe\x00"
        job_id = c.start("", sys.executable, "", py_args(
            "import sys; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1]))", payload.hex()))
        self.wait_done(c, job_id)
        self.assertEqual(b"".join(c.follow(job_id)), payload)

    def test_faults(self):
        scheduler, (w,), c = self.cluster(1)
        a = scheduler.address
        for method, params in [("start", (1, 2, 3)), ("start", ("", "sh", "", {"bogus": 1})),
                               ("start", ("", "", "")), ("query", (5,)), ("query", ()),
                               ("query", ("a", "b", "c")), ("no_such_method", ()),
                               ("register", (5,)), ("register", ("not an address",)),
                               ("output", ("x", 0, 10, "long"))]:
            with self.subTest(method=method, params=params):
                self.assertEqual(raw_fault(a, method, *params)[0], 2)
        for method, params in [("query", ("nope",)), ("stop", ("nope",)),
                               ("output", ("nope", 0, 10)), ("query", (w.worker_id, "nope")),
                               ("query", ("no-worker", "nope")), ("deregister", ("no-worker",)),
                               ("start", ("no-worker", "true", ""))]:
            with self.subTest(method=method, params=params):
                self.assertEqual(raw_fault(a, method, *params)[0], 1)
        with self.assertRaises(jobsched.NotFound):
            c.query("nope")
        with self.assertRaises(jobsched.BadRequest):
            c.call("no_such_method")
        for method, params in [("workers", ()), ("jobs", ()), ("info", ()), ("query", ("nope",)),
                               ("register", (w.address, {"worker_id": w.worker_id}))]:
            self.assertNotIn(b"<nil", raw_xmlrpc(a, method, *params))

    def test_no_worker_fault_3(self):
        scheduler = self.scheduler()
        self.assertEqual(raw_fault(scheduler.address, "start", "", "true", ""),
                         (3, "no worker is online (0 registered, 0 online)"))

    def test_register_keeps_worker_id_and_deregister(self):
        scheduler = self.scheduler()
        c = self.client(scheduler)
        w = self.worker(None)
        self.assertEqual(c.register(w.address, {"worker_id": w.worker_id, "slots": 2}), w.worker_id)
        fresh = c.register(w.address)
        self.assertEqual(str(uuid.UUID(fresh)), fresh)
        self.assertNotEqual(fresh, w.worker_id)
        self.assertIs(c.deregister(fresh), True)
        listed = {x["worker_id"]: x for x in c.workers()}
        self.assertEqual(set(listed), {w.worker_id, fresh})
        self.assertEqual((listed[w.worker_id]["online"], listed[w.worker_id]["slots"]), (True, 2))
        self.assertIs(listed[fresh]["online"], False)
        job_id = c.start("", "sh", "", sh_args("true"))
        self.assertEqual(self.wait_done(c, job_id)["worker_id"], w.worker_id)
        code, message = raw_fault(scheduler.address, "start", fresh, "true", "")
        self.assertEqual(code, 3)
        self.assertRegex(message, r"^worker %s \(%s, last seen \d+ s ago\) is offline$"
                         % (fresh, re.escape(w.address)))

    def test_deregistered_worker_listed_offline_and_its_jobs_fault_3(self):
        scheduler, (w,), c = self.cluster(1)
        job_id = c.start("", "sleep", "", {"args": ["300"]})
        w.close()  # stops its jobs, deregisters
        wait_until(lambda: not c.workers()[0]["online"], message="worker offline")
        (listed,) = c.workers()
        self.assertEqual((listed["worker_id"], listed["online"]), (w.worker_id, False))
        a = scheduler.address
        offline = r"worker %s \(%s, last seen \d+ s ago\) is offline$" % (w.worker_id,
                                                                        re.escape(w.address))
        for method, params in [("query", (job_id,)), ("stop", (job_id,)), ("output", (job_id, 0, 10)),
                               ("query", (w.worker_id, job_id)), ("start", (w.worker_id, "true", ""))]:
            with self.subTest(method=method):
                code, message = raw_fault(a, method, *params)
                self.assertEqual(code, 3)
                self.assertRegex(message, ("^" if method == "start" else "^job %s: " % job_id) + offline)
        code, message = raw_fault(a, "start", "", "true", "")
        self.assertEqual((code, message), (3, "no worker is online (1 registered, 0 online)"))

    # Placement: workers heartbeat rarely, so the scheduler's view of slots changes only by its
    # own placements (and the heartbeats the test sends), never by a stale beat racing a start.

    def test_placement_most_free_slots_then_none_free(self):
        scheduler = self.scheduler()
        small = self.worker(scheduler, slots=1, heartbeat=30)
        big = self.worker(scheduler, slots=3, heartbeat=30)
        c = self.client(scheduler)
        wait_until(lambda: sum(x["online"] for x in c.workers()) == 2, message="workers to register")
        placed = [c.query(c.start("", "sleep", "", {"args": ["300"]}))["worker_id"] for _ in range(4)]
        self.assertEqual(placed[:2], [big.worker_id, big.worker_id])
        self.assertEqual(sorted(placed[2:]), sorted([big.worker_id, small.worker_id]))
        code, message = raw_fault(scheduler.address, "start", "", "sleep", "", {"args": ["300"]})
        self.assertEqual((code, message), (3, "no worker has a free slot (2 online, all 4 slots busy)"))
        self.assertEqual(raw_fault(scheduler.address, "start", small.worker_id, "true", "")[0], 3)

    def test_placement_ties_round_robin(self):
        scheduler = self.scheduler()
        workers = [self.worker(scheduler, slots=1, heartbeat=30) for _ in range(2)]
        c = self.client(scheduler)
        wait_until(lambda: sum(x["online"] for x in c.workers()) == 2, message="workers to register")
        placed = []
        for _ in range(4):
            placed.append(self.wait_done(c, c.start("", "true", ""))["worker_id"])
            for w in workers:  # what each worker's next heartbeat would say
                c.heartbeat(w.worker_id, {"running": 0})
        self.assertEqual(set(placed), {w.worker_id for w in workers})
        for previous, current in zip(placed, placed[1:]):
            self.assertNotEqual(previous, current, placed)

    def test_placement_tries_next_when_worker_refuses(self):
        scheduler = self.scheduler()
        roomy = self.worker(scheduler, slots=2, heartbeat=30)
        other = self.worker(scheduler, slots=1, heartbeat=30)
        c = self.client(scheduler)
        wait_until(lambda: sum(x["online"] for x in c.workers()) == 2, message="workers to register")
        direct = self.client(roomy)
        for _ in range(2):  # fill it behind the scheduler's back: it still looks the most free
            direct.start("sleep", "", {"args": ["300"]})
        job_id = c.start("", "sleep", "", {"args": ["300"]})
        self.assertEqual(c.query(job_id)["worker_id"], other.worker_id)
        code, message = raw_fault(scheduler.address, "start", "", "true", "")
        self.assertEqual((code, message), (3, "no worker has a free slot (2 online, all 3 slots busy)"))


class JsonApiTest(ClusterTestCase):

    def test_timeouts_beyond_the_limit_are_refused(self):
        scheduler, (w,), c = self.cluster(1)
        status, reply = http_call(scheduler.address, "POST", "/start",
                                  {"command": "true", "timeout": 10 ** 30})
        self.assertEqual((status, reply), (400, {"error": "timeout must be at most %d seconds"
                                                  % jobsched.MAX_JOB_TIMEOUT}))
        with self.assertRaises(jobsched.BadRequest):
            self.client(w).start("true", "", {"timeout": 1e30})

    def test_seed_routes(self):
        scheduler, (w,), c = self.cluster(1)
        a = scheduler.address
        status, reply = http_call(a, "POST", "/start", {"worker_id": "", "command": "sleep", "path": "300"})
        self.assertEqual((status, list(reply)), (201, ["job_id"]))
        job_id = reply["job_id"]
        status, job = http_call(a, "POST", "/query", {"worker_id": w.worker_id, "job_id": job_id})
        self.assertEqual(status, 200)
        self.assertEqual(set(job), job_keys("stop_grace"))  # running
        self.assertEqual((job["done"], job["error"], job["error_text"], job["command"], job["path"]),
                         (False, False, "", "sleep", "300"))
        self.assertEqual(http_call(a, "POST", "/stop", {"worker_id": w.worker_id, "job_id": job_id}),
                         (200, {"success": True}))
        status, job = http_call(a, "POST", "/query", {"job_id": job_id})
        self.assertEqual((status, job["done"], job["error"], job["error_text"], job["state"]),
                         (200, True, True, "signal: terminated", "stopped"))
        status, reply = http_call(a, "POST", "/start", {"worker_id": w.worker_id, "command": "sh",
                                                   "args": ["-c", 'printf "%s" "$V"; exit 4'],
                                                   "env": {"V": "json"}, "cwd": "/", "timeout": 30})
        self.assertEqual(status, 201)
        job = self.wait_done(c, reply["job_id"])
        self.assertEqual((job["exit_code"], job["args"]), (4, ["-c", 'printf "%s" "$V"; exit 4']))
        self.assertEqual(c.output(reply["job_id"])["data"], b"json")
        status, listing = http_call(a, "GET", "/workers")
        self.assertEqual((status, list(listing)), (200, ["workers"]))
        self.assertEqual([x["worker_id"] for x in listing["workers"]], [w.worker_id])
        self.assertLessEqual(worker_keys(), set(listing["workers"][0]))
        status, listing = http_call(a, "GET", "/jobs")
        self.assertEqual((status, list(listing)), (200, ["jobs"]))
        self.assertEqual(sorted(j["job_id"] for j in listing["jobs"]), sorted([job_id, reply["job_id"]]))

    def test_errors(self):
        scheduler, (w,), c = self.cluster(1)
        a = scheduler.address
        cases = [
            ("POST", "/start", b"{not json", 400), ("POST", "/start", b"\xff\xfe", 400),
            ("POST", "/query", b"[1, 2]", 400), ("POST", "/stop", b'"job"', 400),
            ("POST", "/start", {"worker_id": ""}, 400), ("POST", "/start", {"command": 5}, 400),
            ("POST", "/start", {"command": "true", "bogus": 1}, 400),
            ("POST", "/start", {"command": "true", "args": "x"}, 400),
            ("POST", "/query", {}, 400),
            ("POST", "/start", {"worker_id": "no-such-worker", "command": "true"}, 404),
            ("POST", "/query", {"job_id": "no-such-job"}, 404),
            ("POST", "/stop", {"worker_id": w.worker_id, "job_id": "no-such-job"}, 404),
            ("POST", "/query", {"worker_id": "no-such-worker", "job_id": "no-such-job"}, 404),
            ("GET", "/nothing", None, 404),
        ]
        for method, path, body, status in cases:
            with self.subTest(path=path, body=body):
                got, reply = http_call(a, method, path, body)
                self.assertEqual(got, status, reply)
                self.assertEqual(list(reply), ["error"])
                self.assertIsInstance(reply["error"], str)
        self.assertEqual(c.workers()[0]["online"], True)  # none of that hurt the cluster

    def test_no_worker_is_503(self):
        scheduler = self.scheduler()
        status, reply = http_call(scheduler.address, "POST", "/start", {"worker_id": "", "command": "true", "path": ""})
        self.assertEqual((status, reply), (503, {"error": "no worker is online (0 registered, 0 online)"}))


class WebPage(http.server.BaseHTTPRequestHandler):
    """A web server that is not jobsched: 200 and an HTML page for any POST."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.write(b"<p>not xml")  # not even well-formed

    def log_message(self, *args):
        pass


class CommandLineTest(ClusterTestCase):
    """The CLI as a user runs it: real processes against an in-process cluster (one for the
    class; each test stops the jobs it leaves running)."""

    @classmethod
    def setUpClass(cls):
        cls.state_dir = tempfile.mkdtemp(prefix="jobsched-test-")
        cls.sched = jobsched.Scheduler("127.0.0.1:0", rpc_timeout=5.0).start_serving()
        cls.w = jobsched.Worker("127.0.0.1:0", scheduler=cls.sched.address, state_dir=cls.state_dir,
                                slots=8, heartbeat=0.2, stop_grace=2.0).start_serving()

    @classmethod
    def tearDownClass(cls):
        cls.w.close()
        cls.sched.close()
        shutil.rmtree(cls.state_dir, ignore_errors=True)

    def setUp(self):
        self.c = self.client(self.sched)
        wait_until(lambda: [x["online"] for x in self.c.workers()] == [True], message="worker to register")
        self.env = {"JOBSCHED_SCHEDULER": self.sched.address}

    def start_running(self, *argv):
        job_id = self.c.start("", argv[0], "", {"args": list(argv[1:])})
        self.addCleanup(self.c.stop, job_id)
        return job_id

    def run_cli(self, *args, **kwargs):
        return self.cli(*args, env=self.env, **kwargs)

    def popen_cli(self, *args):
        env = dict(os.environ, **self.env)
        env.pop("JOBSCHED_TOKEN", None)
        return popen_jobsched(self, args, env=env)

    def test_start_prints_only_the_id(self):
        cwd = self.tempdir()
        result = self.run_cli("start", "--worker", self.w.worker_id, "--env", "K=v=w", "--cwd", cwd,
                              "--timeout", "60", "--", "sh", "-c", 'printf "%s %s" "$K" "$0"', "zero")
        self.assertEqual(result.returncode, 0, result.stderr)
        job_id = result.stdout.decode().strip()
        self.assertEqual(result.stdout.decode(), job_id + "\n")
        job = self.wait_done(self.c, job_id)
        self.assertEqual((job["command"], job["path"], job["args"], job["worker_id"]),
                         ("sh", "", ["-c", 'printf "%s %s" "$K" "$0"', "zero"], self.w.worker_id))
        self.assertEqual(self.c.output(job_id)["data"], b"v=w zero")
        result = self.cli("start", "--scheduler", self.sched.address, "--path", "/dev/null", "--", "cat")
        self.assertEqual(result.returncode, 0, result.stderr)
        job = self.wait_done(self.c, result.stdout.decode().strip())
        self.assertEqual((job["command"], job["path"], job["args"]), ("cat", "/dev/null", []))

    def test_run_exit_codes(self):
        cases = [(["true"], 0), (["sh", "-c", "exit 3"], 3), (["sh", "-c", "kill -9 $$"], 128 + 9),
                 (["sh", "-c", "kill -TERM $$"], 128 + 15)]
        procs = [(self.popen_cli("run", "--", *argv), status) for argv, status in cases]
        for proc, status in procs:
            out, err = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, status, (out, err))
            self.assertEqual(out, b"")

    def test_run_streams_output_and_exits_with_code(self):
        gate = os.path.join(self.tempdir(), "gate")
        proc = self.popen_cli("run", "--", "sh", "-c",
                              'echo first; echo to-stderr >&2; while [ ! -e "$1" ]; do sleep 0.02; done; '
                              'echo second; exit 5', "sh", gate)
        seen = read_until(proc, b"to-stderr\n")  # printed while the job still waits on the gate
        self.assertEqual(seen, b"first\nto-stderr\n")
        self.assertIsNone(proc.poll())
        open(gate, "w").close()
        out, err = proc.communicate(timeout=30)
        self.assertEqual(seen + out, b"first\nto-stderr\nsecond\n")
        self.assertEqual(proc.returncode, 5, err)

    def test_run_ctrl_c_stops_the_job(self):
        marker = uuid.uuid4().hex
        proc = self.popen_cli("run", "--", "sh", "-c", "echo started; exec sleep 300", marker)
        read_until(proc, b"started\n")
        (job,) = [j for j in self.c.jobs() if marker in j["args"]]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 128 + 15, err)
        self.assertNotIn(b"Traceback", err)
        self.assertEqual(out, b"")  # "started" was read above; nothing is written twice
        self.assertEqual(self.c.query(job["job_id"])["state"], "stopped")

    def test_logs_exact_bytes_offset_and_follow(self):
        payload = bytes(range(256)) + b"\xff\xfe\r\n"
        job_id = self.c.start("", sys.executable, "", py_args(
            "import sys; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1]))", payload.hex()))
        self.wait_done(self.c, job_id)
        result = self.run_cli("logs", job_id)
        self.assertEqual((result.returncode, result.stdout), (0, payload), result.stderr)
        result = self.run_cli("logs", job_id, "--offset", "250")
        self.assertEqual((result.returncode, result.stdout), (0, payload[250:]), result.stderr)
        gate = os.path.join(self.tempdir(), "gate")
        job_id = self.start_running("sh", "-c", 'echo one; while [ ! -e "$1" ]; do sleep 0.02; done; echo two',
                                    "sh", gate)
        wait_until(lambda: self.c.output(job_id)["data"] == b"one\n", message="first line")
        result = self.run_cli("logs", job_id)  # without -f: what is there now, then exit
        self.assertEqual((result.returncode, result.stdout), (0, b"one\n"), result.stderr)
        proc = self.popen_cli("logs", "-f", job_id)
        seen = read_until(proc, b"one\n")
        self.assertIsNone(proc.poll())
        open(gate, "w").close()
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, seen + out), (0, b"one\ntwo\n"), err)

    def test_logs_of_several_mib_asks_ahead_and_writes_every_byte_once(self):
        size = 3 * jobsched.MAX_OUTPUT_CHUNK + 12345  # four chunks: two asked for ahead
        job_id = self.c.start("", "head", "", {"args": ["-c", str(size), "/dev/urandom"]})
        self.wait_done(self.c, job_id)
        with open(os.path.join(self.state_dir, job_id + ".out"), "rb") as f:
            payload = f.read()
        self.assertEqual(len(payload), size)
        for offset in (0, jobsched.MAX_OUTPUT_CHUNK - 1, size - 5):
            result = self.run_cli("logs", job_id, "--offset", str(offset))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertTrue(result.stdout == payload[offset:], "offset %d: %d bytes written, "
                            "%d expected" % (offset, len(result.stdout), size - offset))
        # A job still writing: the chunks asked for ahead wait for their bytes, then the end.
        gate = os.path.join(self.tempdir(), "gate")
        job_id = self.start_running("sh", "-c", 'head -c 2200000 /dev/zero; while [ ! -e "$1" ]; '
                                    'do sleep 0.02; done; echo end', "sh", gate)
        proc = self.popen_cli("logs", "-f", job_id)
        seen = read_until(proc, b"\0" * 100)
        open(gate, "w").close()
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        self.assertTrue(seen + out == b"\0" * 2200000 + b"end\n", len(seen + out))

    def test_query_jobs_workers_json_and_stop(self):
        job_id = self.start_running("sleep", "300")
        calls = [("query", job_id, "--json"), ("query", job_id), ("jobs", "--json"), ("jobs",),
                 ("workers", "--json"), ("workers",)]
        procs = [self.popen_cli(*args) for args in calls]
        out = {}
        for args, proc in zip(calls, procs):
            stdout, stderr = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 0, (args, stderr))
            out[args] = stdout.decode()
        job = json.loads(out[calls[0]])
        self.assertEqual(set(job), job_keys("stop_grace"))  # running
        self.assertEqual((job["job_id"], job["state"], job["args"]), (job_id, "running", ["300"]))
        self.assertIn("state: running", out[calls[1]])
        self.assertIn(job_id, [j["job_id"] for j in json.loads(out[calls[2]])["jobs"]])
        self.assertIn(job_id, out[calls[3]])
        (listed,) = json.loads(out[calls[4]])["workers"]
        self.assertEqual((listed["worker_id"], listed["online"]), (self.w.worker_id, True))
        self.assertIn(self.w.worker_id, out[calls[5]])
        result = self.run_cli("stop", job_id)
        self.assertEqual((result.returncode, result.stdout),
                         (0, b"%s stopped (signal: terminated)\n" % job_id.encode()), result.stderr)
        self.assertEqual(self.c.query(job_id)["state"], "stopped")

    def test_help_of_every_command(self):
        commands = ["scheduler", "worker", "start", "run", "stop", "query", "logs", "jobs", "workers",
                    "demo"]
        procs = [(command, self.popen_cli(*filter(None, [command, "--help"])))
                 for command in commands + [None]]
        for command, proc in procs:
            out, err = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 0, (command, err))
            self.assertIn(b"usage:", out)

    def test_usage_errors_exit_2(self):
        jobs_before = len(self.c.jobs())
        cases = [[], ["bogus"], ["query"], ["start", "--"], ["logs", "x", "--offset", "-1"],
                 ["start", "--env", "NOEQUALS", "--", "true"], ["jobs", "--scheduler", "not an address"]]
        procs = [(args, self.popen_cli(*args)) for args in cases]
        for args, proc in procs:
            out, err = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 2, (args, out, err))
            self.assertNotIn(b"Traceback", err)
            self.assertTrue(err.strip(), args)
        self.assertEqual(len(self.c.jobs()), jobs_before)  # a refused command line started nothing

    def test_remote_error_exits_1_with_one_line(self):
        not_a_scheduler = self.worker(None).address  # a worker has no workers() method
        closed = socket.socket()  # bound, never listening: connection refused
        closed.bind(("127.0.0.1", 0))
        self.addCleanup(closed.close)
        unreachable = "127.0.0.1:%d" % closed.getsockname()[1]
        not_xml_rpc = http.server.HTTPServer(("127.0.0.1", 0), WebPage)
        threading.Thread(target=not_xml_rpc.serve_forever, daemon=True).start()
        self.addCleanup(not_xml_rpc.server_close)
        self.addCleanup(not_xml_rpc.shutdown)
        web_page = "127.0.0.1:%d" % not_xml_rpc.server_address[1]  # 200 and HTML to a POST
        cases = [["query", "no-such-job"], ["stop", "no-such-job"], ["logs", "no-such-job"],
                 ["start", "--worker", "no-such-worker", "--", "true"],
                 ["workers", "--scheduler", not_a_scheduler], ["jobs", "--scheduler", unreachable],
                 ["workers", "--scheduler", web_page]]
        procs = [(args, self.popen_cli(*args)) for args in cases]
        for args, proc in procs:
            out, err = proc.communicate(timeout=30)
            self.assertEqual((proc.returncode, out), (1, b""), (args, err))
            self.assertEqual(len(err.decode().strip().splitlines()), 1, (args, err))
            self.assertNotIn(b"Traceback", err)


class ProcessTest(ClusterTestCase):
    """Real role processes: signals, the state-dir lock, import hygiene, the demo."""

    def test_a_role_run_as_a_script_runs_again_without_the_scripts_syntax_tree(self):
        state_dir = os.path.join(self.tempdir(), "state dir \u00e9")  # arguments kept as given
        proc, address = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", "",
                                   "--state-dir", state_dir, "--label", "k=v w")
        client = self.client(address)
        self.assertEqual(client.info()["labels"]["k"], "v w")
        job_id = client.start("true", "")
        self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")
        # The record is written just after the job is seen to end.
        wait_until(lambda: os.path.exists(os.path.join(state_dir, job_id + ".json")),
                   message="the job's record in the state dir given")
        if not os.path.exists("/proc/%d/cmdline" % proc.pid):
            return  # macOS: the behaviour above is what counts
        with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
            argv = f.read().split(b"\0")[:-1]
        rerun = sys.version_info >= (3, 10)  # 3.6 to 3.8 free the tree; 3.9 has no orig_argv
        self.assertEqual(b"-c" in argv, rerun, argv)  # same pid: the process executed itself
        self.assertEqual(argv[argv.index(os.path.abspath(JOBSCHED).encode()):][1:3] if rerun
                         else argv[2:4], [b"worker", b"--listen"])
        proc.terminate()
        self.assertEqual(proc.wait(timeout=20), 0)

    def test_a_role_run_as_a_script_keeps_its_options_path_and_a_closed_stdout(self):
        cwd = self.tempdir()  # a module here must not shadow the standard library's
        marker = os.path.join(cwd, "shadowed")
        with open(os.path.join(cwd, "shlex.py"), "w") as f:
            f.write("open(%r, 'w').close()\nraise SystemExit(9)\n" % marker)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-u", "-W", "ignore::DeprecationWarning", JOBSCHED, "scheduler",
             "--listen", "127.0.0.1:%d" % port, "--state-dir", os.path.join(cwd, "state")],
            cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(1))  # stdout closed
        self.addCleanup(lambda: proc.poll() is not None or (proc.kill(), proc.wait()))
        client = self.client("127.0.0.1:%d" % port)
        wait_until(lambda: fault_of(client.info) is None, message="the scheduler to listen")
        self.assertFalse(os.path.exists(marker))
        if sys.version_info >= (3, 10) and os.path.exists("/proc/%d/cmdline" % proc.pid):
            with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            self.assertEqual(argv[1:5], [b"-u", b"-W", b"ignore::DeprecationWarning", b"-c"])
        proc.terminate()
        self.assertEqual(proc.wait(timeout=20), 0)

    def test_worker_sigterm_stops_jobs_deregisters_exits_0(self):
        scheduler = self.scheduler()
        c = self.client(scheduler)
        state_dir = self.tempdir()
        proc, address = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", scheduler.address,
                                   "--state-dir", state_dir, "--slots", "2", "--heartbeat", "0.2",
                                   "--stop-grace", "2")
        self.assertNotEqual(address.rsplit(":", 1)[1], "0")
        (listed,) = wait_until(lambda: c.workers(), message="worker to register")
        self.assertEqual((listed["address"], listed["online"], listed["slots"]), (address, True, 2))
        job_ids = [c.start("", "sleep", "", {"args": ["300"]}) for _ in range(2)]
        pids = [c.query(j)["pid"] for j in job_ids]
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=15), 0)
        self.assertIs(c.workers()[0]["online"], False)
        for job_id, pid in zip(job_ids, pids):
            with open(os.path.join(state_dir, job_id + ".json")) as f:
                record = json.load(f)
            self.assertEqual((record["state"], record["done"]), ("stopped", True))
            wait_until(lambda: not pid_alive(pid), message="job process to be gone")

    def test_worker_sighup_stops_its_job_and_exits_0(self):
        # A closed terminal or ssh session: the worker must not leave its jobs unsupervised.
        scheduler = self.scheduler()
        c = self.client(scheduler)
        state_dir = self.tempdir()
        proc, _ = self.spawn(*worker_args(scheduler.address, state_dir))
        wait_until(lambda: c.workers(), message="worker to register")
        job_id = c.start("", "sleep", "", {"args": ["300"]})
        pid = c.query(job_id)["pid"]
        proc.send_signal(signal.SIGHUP)
        self.assertEqual(proc.wait(timeout=15), 0)
        with open(os.path.join(state_dir, job_id + ".json")) as f:
            self.assertEqual(json.load(f)["state"], "stopped")
        wait_until(lambda: not pid_alive(pid), message="job process to be gone")

    def test_scheduler_signal_exits_0(self):
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with self.subTest(signal=signum):
                proc, address = self.spawn("scheduler", "--listen", "127.0.0.1:0")
                self.assertEqual(self.client(address).workers(), [])
                proc.send_signal(signum)
                self.assertEqual(proc.wait(timeout=15), 0)

    def test_sighup_ignored_under_nohup_stays_ignored(self):
        proc = popen_jobsched(self, ["scheduler", "--listen", "127.0.0.1:0", "--state-dir",
                                     self.tempdir()],
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        address = proc.stdout.readline().decode().split("listening on ")[1].split()[0]
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        self.assertEqual(self.client(address).workers(), [])  # still serving
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=15), 0)

    def test_signal_while_the_main_thread_holds_a_lock(self):
        # A loaded process can be switched out while its main thread holds the lock inside a
        # threading.Event's wait(). Here the first such hold once the role serves (its banner is
        # out) lasts until the signal has come: a handler that set that Event would wait for
        # the lock for ever.
        marker = os.path.join(self.tempdir(), "holding")
        wrapper = (
            "import os, sys, threading, time\n"
            "sys.path.insert(0, %r)\n"
            "import jobsched\n"
            "wait, write, state = threading.Event.wait, sys.stdout.write, ['']\n"
            "def write_banner(text):\n"
            "    state.append('serving')\n"
            "    return write(text)\n"
            "def slow_wait(self, timeout=None):\n"
            "    if threading.current_thread() is threading.main_thread() and state[-1:] == ['serving']:\n"
            "        state.append('held')\n"
            "        with self._cond:\n"
            "            open(%r, 'w').close()\n"
            "            time.sleep(1.5)\n"
            "    return wait(self, timeout)\n"
            "sys.stdout.write = write_banner\n"
            "threading.Event.wait = slow_wait\n"
            "sys.exit(jobsched.main(sys.argv[1:]))\n" % (HERE, marker))
        for role in ("scheduler", "worker"):
            with self.subTest(role=role):
                if role == "scheduler":
                    args = ["scheduler", "--listen", "127.0.0.1:0", "--state-dir", self.tempdir()]
                else:
                    args = ["worker", "--listen", "127.0.0.1:0", "--state-dir", self.tempdir()]
                proc = subprocess.Popen([sys.executable, "-c", wrapper] + args,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL)
                self.addCleanup(proc.stdout.close)
                self.addCleanup(lambda p=proc: p.poll() is None and (p.kill(), p.wait()))
                self.assertIn(b"listening on", proc.stdout.readline())
                # The marker comes if the main thread waits on an Event; else send at once.
                deadline = time.monotonic() + 1.0
                while not os.path.exists(marker) and time.monotonic() < deadline:
                    time.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(timeout=15), 0)
                if os.path.exists(marker):
                    os.remove(marker)

    def test_import_has_no_side_effects(self):
        probe = (
            "import json, logging, signal, sys, threading\n"
            "sys.path.insert(0, %r)\n"
            "def snapshot():\n"
            "    handlers = {}\n"
            "    for n in range(1, signal.NSIG):\n"
            "        try: handlers[n] = repr(signal.getsignal(n))\n"
            "        except (ValueError, OSError): pass\n"
            "    return {'threads': [t.name for t in threading.enumerate()], 'signals': handlers,\n"
            "            'root': [repr(h) for h in logging.root.handlers], 'level': logging.root.level}\n"
            "before = snapshot()\n"
            "import jobsched\n"
            "after = snapshot()\n"
            "after['jobsched_handlers'] = len(logging.getLogger('jobsched').handlers)\n"
            "after['missing'] = [n for n in jobsched.__all__ if not hasattr(jobsched, n)]\n"
            "print(json.dumps([before, after, jobsched.__version__]))\n" % HERE)
        result = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=30)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        before, after, version = json.loads(result.stdout.decode())
        self.assertEqual((after.pop("jobsched_handlers"), after.pop("missing")), (0, []))
        self.assertEqual(after, before)
        self.assertIsInstance(version, str)

    def test_demo_exits_0_and_leaves_nothing_behind(self):
        if not os.path.isdir("/proc/self"):
            self.skipTest("needs /proc to look for leftover processes")
        tmp = self.tempdir()
        marker = "JOBSCHED_DEMO_MARKER=" + uuid.uuid4().hex

        def marked_pids():
            pids = []
            for name in os.listdir("/proc"):
                try:
                    with open("/proc/%s/environ" % name, "rb") as f:
                        if marker.encode() in f.read().split(b"\0"):
                            pids.append(int(name))
                except (OSError, ValueError):
                    pass
            return pids
        result = self.cli("demo", env={"TMPDIR": tmp, marker.split("=")[0]: marker.split("=")[1]},
                          timeout=40)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertIn(b"done\n", result.stdout)
        self.assertEqual(marked_pids(), [])
        self.assertEqual(os.listdir(tmp), [])


TLS_SH = os.path.join(HERE, "examples", "tls.sh")
TOKEN = "s3cret-token-4f9a2c"

# A certificate signed by the test CA whose subjectAltName does not name this host.
ELSEWHERE_CNF = """[ req ]
distinguished_name = req_dn
[ req_dn ]
[ elsewhere ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = DNS:elsewhere.invalid
"""


def run_openssl(args, cwd):
    subprocess.run(["openssl"] + args, cwd=cwd, check=True, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_certificates(directory):
    """examples/tls.sh into directory/a and directory/b (two CAs), plus a/elsewhere.{pem,key}."""
    for name in ("a", "b"):
        subprocess.run(["sh", TLS_SH, os.path.join(directory, name)], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    a = os.path.join(directory, "a")
    with open(os.path.join(a, "elsewhere.cnf"), "w") as f:
        f.write(ELSEWHERE_CNF)
    run_openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "elsewhere.key"], a)
    run_openssl(["req", "-config", "elsewhere.cnf", "-new", "-key", "elsewhere.key",
                 "-subj", "/CN=elsewhere", "-out", "elsewhere.csr"], a)
    run_openssl(["x509", "-req", "-days", "2", "-in", "elsewhere.csr", "-CA", "ca.pem",
                 "-CAkey", "ca.key", "-CAserial", "ca.srl", "-extfile", "elsewhere.cnf",
                 "-extensions", "elsewhere", "-out", "elsewhere.pem"], a)
    return a, os.path.join(directory, "b")


def raw_http(address, data, timeout=10.0, shut_write=False):
    """Send raw bytes to HOST:PORT and read one response: (status, headers, body);
    (None, None, b"") when the server closed the connection without answering."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        try:
            sock.sendall(data)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before reading everything
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except (http.client.HTTPException, ConnectionResetError):
            return None, None, b""  # no HTTP/1.x answer: closed (or an HTTP/0.9 reply)
        return response.status, response.headers, response.read()
    finally:
        sock.close()


def read_responses(sock, count):
    """``count`` HTTP responses read off a kept-alive socket: [(status, body)]."""
    data, answers = b"", []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end].decode("latin-1")
            length = int(re.search(r"(?im)^content-length: *([0-9]+)", head).group(1))
            if len(data) >= end + 4 + length:
                answers.append((int(head.split()[1]), data[end + 4:end + 4 + length]))
                data = data[end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("closed after %d answers" % len(answers))
        data += chunk
    return answers


def http_request(address, method, path, body=b"", headers=(), content_length=True):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % address]
    if content_length:
        lines.append("Content-Length: %d" % len(body))
    lines.extend("%s: %s" % header for header in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def rpc_body(method, *params):
    return xmlrpc.client.dumps(params, method).encode("utf-8")


def xml_call(address, body, headers=()):
    """POST an XML-RPC body; returns the Fault (or the result) the server answered with."""
    status, _, reply = raw_http(address, http_request(
        address, "POST", "/RPC2", body, (("Content-Type", "text/xml"),) + tuple(headers)))
    assert status == 200, (status, reply[:200])
    try:
        return xmlrpc.client.loads(reply)[0][0]
    except xmlrpc.client.Fault as fault:
        return fault


def url_open(url, data=None, headers=None, method=None):
    """urllib without proxies from the environment: (status, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        try:
            return e.code, e.read()
        finally:
            e.close()


def handshake_in_memory(server_context, client_context):
    """Whether the two contexts complete a TLS handshake (over memory BIOs, no sockets)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    try:
        for _ in range(20):
            done = 0
            for end in (client, server):
                try:
                    end.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if done == 2:
                return True
    except (ssl.SSLError, OSError):
        return False
    return False


def capped_at_tls11(cafile):
    """A client context that offers at most TLS 1.1 and would accept it, or None if impossible."""
    context = ssl.create_default_context(cafile=cafile)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if hasattr(context, "maximum_version"):
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        elif hasattr(ssl, "OP_NO_TLSv1_3"):
            context.options &= ~(ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1)
            context.options |= ssl.OP_NO_TLSv1_2 | ssl.OP_NO_TLSv1_3
        else:
            return None
    return context


def capture_jobsched_log(test, level=logging.INFO):
    """Records of the 'jobsched' logger during the test (in-process roles)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    handler = Keep(level)
    logger = logging.getLogger("jobsched")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    test.addCleanup(logger.setLevel, old_level)
    test.addCleanup(logger.removeHandler, handler)
    return records


class CertificatesTestCase(ClusterTestCase):
    """Certificates made by openssl once for the class: cls.a and cls.b (see make_certificates)."""

    @classmethod
    def setUpClass(cls):
        if shutil.which("openssl") is None:
            print("\n%s skipped: the openssl command is not installed" % cls.__name__, file=sys.stderr)
            raise unittest.SkipTest("the openssl command is not installed")
        cls.cert_dir = tempfile.mkdtemp(prefix="jobsched-tls-")
        try:
            cls.a, cls.b = make_certificates(cls.cert_dir)
        except BaseException:
            shutil.rmtree(cls.cert_dir, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.cert_dir, ignore_errors=True)


class TLSTest(CertificatesTestCase):
    """Verified TLS both ways, mutual TLS, TLS 1.2 minimum, handshakes off the accept loop."""

    def files(self, name, ca=None, directory=None):
        directory = directory or self.a
        return {"tls_cert": os.path.join(directory, name + ".pem"),
                "tls_key": os.path.join(directory, name + ".key"),
                "tls_ca": os.path.join(ca or self.a, "ca.pem")}

    def ca(self, directory=None):
        return {"tls_ca": os.path.join(directory or self.a, "ca.pem")}

    def test_tls_sh_made_verifiable_certificates_with_private_keys(self):
        for name in ("ca", "scheduler", "worker", "client"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.a, name + ".key")).st_mode), 0o600)
        text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in",
                               os.path.join(self.a, "worker.pem")], stdout=subprocess.PIPE,
                              timeout=30, check=True).stdout.decode()
        self.assertIn("DNS:localhost", text)
        self.assertIn("IP Address:127.0.0.1", text)

    def test_client_verifies_a_tls_scheduler_and_a_tls_worker(self):
        server_only = dict(self.files("scheduler"), tls_ca=None)
        scheduler = self.scheduler(**server_only)
        worker = self.worker(None, **dict(self.files("worker"), tls_ca=None))
        for role in (scheduler, worker):
            info = self.client(role, **self.ca()).info()
            self.assertEqual(info["version"], jobsched.__version__)
            self.assertEqual(self.client("https://" + role.address, **self.ca()).info()["version"],
                             jobsched.__version__)
            # the system trust store does not know our CA; another CA is not ours either
            for kwargs in ({}, self.ca(self.b)):
                with self.assertRaises(jobsched.Unreachable) as caught:
                    self.client("https://" + role.address, **kwargs).info()
                self.assertIn("certificate", str(caught.exception).lower())
            with self.assertRaises(jobsched.Unreachable):
                self.client(role.address).info()  # plain HTTP against a TLS server
        client = self.client(worker, **self.ca())
        job_id = client.start("sh", "", {"args": ["-c", "printf over-tls"]})
        self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")
        self.assertEqual(client.output(job_id)["data"], b"over-tls")

    def test_mutual_tls_cluster_scheduler_dials_the_worker_over_tls(self):
        scheduler = self.scheduler(**self.files("scheduler"))
        worker = self.worker(scheduler, **self.files("worker"))
        client = self.client(scheduler, **self.files("client"))
        workers = wait_until(lambda: [w for w in client.workers() if w["online"]],
                             message="the TLS worker to register")
        self.assertEqual(workers[0]["worker_id"], worker.worker_id)
        self.assertIs(workers[0]["tls"], True)
        job_id = client.start("", "sh", "", {"args": ["-c", "echo mutual"]})
        self.assertEqual(self.wait_done(client, job_id)["exit_code"], 0)
        self.assertEqual(client.output(job_id)["data"], b"mutual\n")
        self.assertEqual(self.client(worker, **self.files("client")).query(job_id)["state"],
                         "succeeded")

    def test_an_idle_tls_connection_is_parked_then_served_again(self):
        scheduler = self.scheduler(**self.files("scheduler"))
        scheduler.server.park_after = 0.05
        files = self.files("client")
        context = ssl.create_default_context(cafile=files["tls_ca"])
        context.load_cert_chain(files["tls_cert"], files["tls_key"])
        connection = http.client.HTTPSConnection(*scheduler.address.rsplit(":", 1), timeout=10,
                                                 context=context)
        self.addCleanup(connection.close)
        HTTPTest.assert_parked_connection_is_served(self, scheduler, connection)

    def test_mutual_tls_refuses_no_certificate_and_other_ca(self):
        scheduler = self.scheduler(**self.files("scheduler"))
        self.assertEqual(self.client(scheduler, **self.files("client")).info()["role"], "scheduler")
        refused = [
            self.ca(),  # verifies the server but presents no certificate
            self.files("client", ca=self.a, directory=self.b),  # a certificate from another CA
        ]
        for kwargs in refused:
            with self.assertRaises(jobsched.Unreachable, msg=kwargs):
                self.client(scheduler, **kwargs).info()
        # the CLI reads the same files from the environment
        env = {"JOBSCHED_TLS_CA": self.files("client")["tls_ca"],
               "JOBSCHED_TLS_CERT": self.files("client")["tls_cert"],
               "JOBSCHED_TLS_KEY": self.files("client")["tls_key"]}
        done = self.cli("workers", "--json", "--scheduler", scheduler.address, env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout.decode()), {"workers": []})
        done = self.cli("workers", "--scheduler", scheduler.address,
                        env={"JOBSCHED_TLS_CA": env["JOBSCHED_TLS_CA"]})
        self.assertEqual(done.returncode, 1, done.stderr)

    def test_wrong_hostname_is_refused(self):
        scheduler = self.scheduler(**dict(self.files("elsewhere"), tls_ca=None))
        with self.assertRaises(jobsched.Unreachable):
            self.client(scheduler, **self.ca()).info()
        # the same CA and a certificate naming 127.0.0.1 and localhost is accepted
        good = self.scheduler(**dict(self.files("scheduler"), tls_ca=None))
        port = good.address.rsplit(":", 1)[1]
        self.assertEqual(self.client("127.0.0.1:" + port, **self.ca()).info()["role"], "scheduler")
        self.assertEqual(self.client("localhost:" + port, **self.ca()).info()["role"], "scheduler")

    def test_tls_older_than_1_2_is_refused(self):
        files = self.files("scheduler")
        client_context = capped_at_tls11(files["tls_ca"])
        if client_context is None:
            self.skipTest("this Python cannot cap a client at TLS 1.1")
        permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if hasattr(permissive, "minimum_version"):
                permissive.minimum_version = ssl.TLSVersion.TLSv1
            else:
                permissive.options &= ~(ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1)
        permissive.load_cert_chain(files["tls_cert"], files["tls_key"])
        if not handshake_in_memory(permissive, client_context):
            self.skipTest("the local OpenSSL cannot negotiate TLS 1.1 at all (%s)"
                          % ssl.OPENSSL_VERSION)
        security = jobsched.Security(tls_cert=files["tls_cert"], tls_key=files["tls_key"])
        server_context = security.server_context()
        server_context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that only the version can refuse
        self.assertFalse(handshake_in_memory(server_context, client_context))
        scheduler = self.scheduler(**dict(files, tls_ca=None))
        host, port = scheduler.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            with self.assertRaises((ssl.SSLError, OSError)):
                client_context.wrap_socket(sock, server_hostname=host).close()
        self.assertEqual(self.client(scheduler, **self.ca()).info()["role"], "scheduler")

    def test_silent_client_does_not_block_others(self):
        scheduler = self.scheduler(read_timeout=1.0, **self.files("scheduler"))
        host, port = scheduler.address.rsplit(":", 1)
        silent = socket.create_connection((host, int(port)), timeout=10)
        self.addCleanup(silent.close)
        half = socket.create_connection((host, int(port)), timeout=10)
        self.addCleanup(half.close)
        half.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
        client = self.client(scheduler, **self.files("client"))
        for _ in range(3):
            self.assertEqual(client.info()["role"], "scheduler")
        # and the server gives up on the silent ones after its read timeout
        self.assertEqual(silent.recv(1024), b"")
        self.assertEqual(half.recv(1024), b"")

    def test_non_loopback_listen_is_allowed_with_mutual_tls_only(self):
        jobsched.Scheduler("0.0.0.0:0", **self.files("scheduler")).server.server_close()
        with self.assertRaises(jobsched.ConfigError) as caught:
            jobsched.Scheduler("0.0.0.0:0", **dict(self.files("scheduler"), tls_ca=None))
        self.assertIn("refusing to listen on 0.0.0.0 without protection", str(caught.exception))


class TokenTest(ClusterTestCase):
    """The token on both roles and the JSON routes, and where it must never show up."""

    def test_token_accepted_and_refused_on_both_roles(self):
        scheduler = self.scheduler(token=TOKEN)
        worker = self.worker(scheduler, token=TOKEN)
        client = self.client(scheduler, token=TOKEN)
        wait_until(lambda: any(w["online"] for w in client.workers()),
                   message="the worker to register with the token")
        for role in (scheduler, worker):
            good = xmlrpc.client.ServerProxy("http://jobsched:%s@%s" % (TOKEN, role.address))
            self.addCleanup(good("close"))
            self.assertEqual(good.info()["version"], jobsched.__version__)
            for url in ("http://%s" % role.address, "http://jobsched:wrong@%s" % role.address):
                bad = xmlrpc.client.ServerProxy(url)
                self.addCleanup(bad("close"))
                with self.assertRaises(xmlrpc.client.ProtocolError) as caught:
                    bad.info()
                self.assertEqual(caught.exception.errcode, 401)
            body = rpc_body("info")
            for header, status in ((None, 401), ("Bearer wrong", 401), ("Bearer " + TOKEN, 200),
                                   ("Basic " + base64.b64encode(b"any:" + TOKEN.encode()).decode(), 200),
                                   ("Basic " + base64.b64encode(b"any:wrong").decode(), 401)):
                headers = {"Content-Type": "text/xml"}
                if header:
                    headers["Authorization"] = header
                got, reply = url_open("http://%s/RPC2" % role.address, body, headers)
                self.assertEqual(got, status, header)
                if status == 401:
                    self.assertEqual(reply, b"")
            with self.assertRaises(jobsched.Unreachable) as caught:
                self.client(role, token="bad-t0ken-xyz").info()
            self.assertIn("401", str(caught.exception))
            self.assertNotIn("bad-t0ken-xyz", str(caught.exception))

    def test_token_on_json_routes(self):
        scheduler = self.scheduler(token=TOKEN)
        base = "http://%s" % scheduler.address
        bearer = {"Authorization": "Bearer " + TOKEN}
        self.assertEqual(url_open(base + "/workers", headers=bearer), (200, b'{"workers": []}'))
        self.assertEqual(url_open(base + "/workers")[0], 401)
        self.assertEqual(url_open(base + "/jobs", headers={"Authorization": "Bearer x"})[0], 401)
        query = json.dumps({"job_id": "nope"}).encode()
        self.assertEqual(url_open(base + "/query", query, bearer)[0], 404)
        self.assertEqual(url_open(base + "/query", query)[0], 401)
        self.assertEqual(url_open(base + "/start", b'{"command": "true"}')[0], 401)
        status, body = url_open(base + "/start", b'{"command": "true"}', bearer)
        self.assertEqual(status, 503, body)  # authorized, but no worker yet

    def test_token_file_readable_by_others_is_refused(self):
        directory = self.tempdir()
        path = os.path.join(directory, "token")
        with open(path, "w") as f:
            f.write(TOKEN + "\n")
        for mode in (0o644, 0o640, 0o602):
            os.chmod(path, mode)
            done = self.cli("scheduler", "--listen", "127.0.0.1:0", "--token-file", path)
            self.assertEqual(done.returncode, 2, done.stderr)
            message = done.stderr.decode()
            self.assertIn("group or others", message)
            self.assertIn("chmod 600", message)
            self.assertNotIn(TOKEN, message)
        done = self.cli("workers", "--token-file", path, "--scheduler", "127.0.0.1:1")
        self.assertEqual(done.returncode, 2, done.stderr)
        os.chmod(path, 0o600)
        proc, address = self.spawn("scheduler", "--listen", "127.0.0.1:0", "--token-file", path)
        self.assertEqual(self.client(address, token=TOKEN).info()["role"], "scheduler")
        with self.assertRaises(jobsched.Unreachable):
            self.client(address).info()
        done = self.cli("workers", "--token-file", path, "--scheduler", address)
        self.assertEqual(done.returncode, 0, done.stderr)
        done = self.cli("workers", "--scheduler", "http://jobsched:not-%s@%s" % (TOKEN[:4], address))
        self.assertEqual(done.returncode, 1)
        self.assertIn(b"401", done.stderr)
        self.assertNotIn(b"not-" + TOKEN[:4].encode(), done.stderr)
        self.assertNotIn(TOKEN.encode(), self.process_args(proc.pid))

    def process_args(self, pid):
        seen = b""
        if os.path.exists("/proc/%d/cmdline" % pid):
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                seen += f.read()
        if shutil.which("ps"):
            seen += subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)],
                                   stdout=subprocess.PIPE, timeout=10).stdout
        self.assertIn(b"jobsched", seen)
        return seen

    def test_token_not_in_ps_job_environment_or_log(self):
        proc, address = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", "",
                                   "--state-dir", self.tempdir(), "--log-level", "debug",
                                   env={"JOBSCHED_TOKEN": TOKEN, "JOBSCHED_CANARY": "hidden",
                                        "CANARY": "visible"})
        self.assertNotIn(TOKEN.encode(), self.process_args(proc.pid))
        client = self.client(address, token=TOKEN)
        job_id = client.start("env", "")
        self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")
        environment = client.output(job_id)["data"]
        self.assertIn(b"CANARY=visible", environment)  # it is the worker's environment,
        self.assertNotIn(b"JOBSCHED_CANARY", environment)  # without any JOBSCHED_* variable
        self.assertNotIn(TOKEN.encode(), environment)
        self.assertNotIn(b"JOBSCHED_TOKEN", environment)
        for token in ("wrong-1", "wrong-2"):
            with self.assertRaises(jobsched.Unreachable):
                self.client(address, token=token).info()
        client.stop(job_id)
        with open(proc.log_path, "rb") as f:
            log_text = f.read()
        self.assertEqual(log_text.count(b"unauthorized request from 127.0.0.1"), 1, log_text)
        self.assertIn(job_id.encode(), log_text)
        self.assertNotIn(TOKEN.encode(), log_text)
        self.assertNotIn(b"wrong-", log_text)


class SafeDefaultsTest(ClusterTestCase):
    """Listen policy, --allow, --jobs-dir, registered methods only, startup warnings."""

    def test_refuses_non_loopback_without_protection(self):
        for role in (["scheduler"], ["worker", "--scheduler", "", "--state-dir", self.tempdir()]):
            done = self.cli(*(role + ["--listen", "0.0.0.0:0"]))
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn(
                "refusing to listen on 0.0.0.0 without protection: configure a token "
                "(--token-file or JOBSCHED_TOKEN) or mutual TLS (--tls-cert, --tls-key and "
                "--tls-ca), or pass --insecure", done.stderr.decode())
        with self.assertRaises(jobsched.ConfigError):
            jobsched.Scheduler("0.0.0.0:0")
        jobsched.Scheduler("0.0.0.0:0", token=TOKEN).server.server_close()

    def test_insecure_allows_non_loopback(self):
        proc, address = self.spawn("scheduler", "--listen", "0.0.0.0:0", "--insecure")
        host, port = address.rsplit(":", 1)
        self.assertEqual(host, "0.0.0.0")
        self.assertEqual(self.client("127.0.0.1:" + port).info()["role"], "scheduler")
        with open(proc.log_path) as f:
            log_text = f.read()
        import pyexpat
        if pyexpat.version_info < (2, 6, 0):
            self.assertIn("expat %s is older than 2.6.0" % pyexpat.EXPAT_VERSION, log_text)
        else:
            self.assertNotIn("older than 2.6.0", log_text)

    def test_allow_limits_commands(self):
        worker = self.worker(None, allow=["echo"], allow_env=["PATH"])
        client = self.client(worker)
        job_id = client.start("echo", "", {"args": ["allowed"]})
        self.wait_done(client, job_id)
        self.assertEqual(client.output(job_id)["data"], b"allowed\n")
        fake_bin = self.tempdir()
        with open(os.path.join(fake_bin, "echo"), "w") as f:
            f.write("#!/bin/sh\necho impostor\n")
        os.chmod(os.path.join(fake_bin, "echo"), 0o755)
        for command, options in (("sh", {"args": ["-c", "echo no"]}),
                                 ("echo", {"env": {"PATH": fake_bin}}),
                                 (os.path.join(fake_bin, "echo"), {})):
            with self.assertRaises(jobsched.BadRequest) as caught:
                client.start(command, "", options)
            self.assertEqual(caught.exception.code, 2)
            self.assertIn("not allowed", str(caught.exception))
        proxy = xmlrpc.client.ServerProxy("http://" + worker.address)
        self.addCleanup(proxy("close"))
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            proxy.start("sh", "", {"args": ["-c", "true"]})
        self.assertEqual(caught.exception.faultCode, 2)
        # the file that was checked is the one that runs, even if PATH searched from cwd differs
        self.assertFalse(os.path.exists("echo"))
        job_id = client.start("echo", "", {"args": ["real"], "cwd": fake_bin,
                                           "env": {"PATH": "." + os.pathsep + os.environ["PATH"]}})
        self.wait_done(client, job_id)
        self.assertEqual(client.output(job_id)["data"], b"real\n")
        self.assertEqual(len(client.jobs()), 2)

    def test_jobs_dir_escapes_are_refused(self):
        root = self.tempdir()
        jobs_dir, outside = os.path.join(root, "jobs"), os.path.join(root, "outside")
        os.makedirs(os.path.join(jobs_dir, "sub"))
        os.mkdir(outside)
        for directory, name, word in ((jobs_dir, "ok.sh", "inside"), (jobs_dir, "sub/deep.sh", "deep"),
                                      (outside, "evil.sh", "escaped")):
            with open(os.path.join(directory, name), "w") as f:
                f.write("echo %s\n" % word)
        os.symlink(os.path.join(outside, "evil.sh"), os.path.join(jobs_dir, "link.sh"))
        os.symlink(outside, os.path.join(jobs_dir, "outdir"))
        scheduler, _, client = self.cluster(1, jobs_dir=jobs_dir)
        for path, output in (("ok.sh", b"inside\n"), ("sub/deep.sh", b"deep\n"),
                             ("./sub/deep.sh", b"deep\n")):
            job_id = client.start("", "sh", path)
            self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded", path)
            self.assertEqual(client.output(job_id)["data"], output)
        for path in ("../outside/evil.sh", "sub/../../outside/evil.sh",
                     os.path.join(outside, "evil.sh"), os.path.join(jobs_dir, "ok.sh"),
                     "link.sh", "outdir/evil.sh", ".."):
            with self.assertRaises(jobsched.BadRequest, msg=path) as caught:
                client.start("", "sh", path)
            self.assertEqual(caught.exception.code, 2)
            self.assertTrue("jobs dir" in str(caught.exception), str(caught.exception))
        self.assertEqual(len(client.jobs()), 3)

    def test_only_registered_methods_are_callable(self):
        scheduler, (worker,), _ = self.cluster(1)
        for role in (scheduler, worker):
            proxy = xmlrpc.client.ServerProxy("http://" + role.address)
            self.addCleanup(proxy("close"))
            for name in ("system.listMethods", "system.methodHelp", "system.multicall", "_dispatch",
                         "__init__", "__class__", "start.__globals__", "server.methods",
                         "close", "start_serving", "_get", "_Role__x", "info.__call__", ""):
                fault = xml_call(role.address, rpc_body(name))
                self.assertIsInstance(fault, xmlrpc.client.Fault, name)
                self.assertEqual(fault.faultCode, 2, name)
            self.assertEqual(proxy.info()["version"], jobsched.__version__)
        self.assertEqual(self.client(worker).info()["worker_id"], worker.worker_id)

    @unittest.skipUnless(hasattr(os, "geteuid"), "POSIX only")
    def test_worker_as_root_warns(self):
        proc, _ = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", "",
                             "--state-dir", self.tempdir())
        with open(proc.log_path) as f:
            log_text = f.read()
        self.assertEqual("running as root" in log_text, os.geteuid() == 0, log_text)


class HTTPTest(ClusterTestCase):
    """The HTTP layer jobsched parses itself: request headers, Expect, keep-alive."""

    def test_expect_100_continue_is_answered_before_the_body(self):
        scheduler = self.scheduler()
        host, port = scheduler.address.rsplit(":", 1)
        body = json.dumps({"command": "true", "args": ["x" * 5000]}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /start HTTP/1.1\r\nContent-Length: %d\r\n"
                         b"Expect: 100-continue\r\n\r\n" % len(body))
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            response = http.client.HTTPResponse(sock)
            response.begin()
            self.assertEqual((response.status, json.loads(response.read().decode())),
                             (503, {"error": "no worker is online (0 registered, 0 online)"}))

    def test_bad_header_lines_are_400_and_the_server_goes_on(self):
        scheduler = self.scheduler()
        for request in (b"GET /workers HTTP/1.1\r\nno colon here\r\n\r\n",
                        b"GET /workers HTTP/1.1\r\n: no name\r\n\r\n",
                        b"GET /workers HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
                        b"GET /workers HTTP/2.0\r\n\r\n", b"GET /workers\r\n\r\n"):
            status, _, _ = raw_http(scheduler.address, request)
            self.assertEqual(status, 400, request[:40])
        status, headers, body = raw_http(scheduler.address, http_request(
            scheduler.address, "GET", "/workers", content_length=False).replace(
            b"Host:", b"hOsT:"))
        self.assertEqual((status, json.loads(body.decode())), (200, {"workers": []}))

    def assert_parked_connection_is_served(self, scheduler, connection):
        """Idle past park_after, the connection gives up its thread and still works."""
        baseline = threading.active_count()
        connection.request("GET", "/workers")
        self.assertEqual(connection.getresponse().read(), b'{"workers": []}')
        sock = connection.sock
        wait_until(lambda: threading.active_count() <= baseline, message="the thread to go")
        connection.request("GET", "/workers")
        self.assertEqual(connection.getresponse().read(), b'{"workers": []}')
        self.assertIs(connection.sock, sock)  # the same connection, served again

    def test_an_idle_connection_is_parked_then_served_again(self):
        scheduler = self.scheduler()
        scheduler.server.park_after = 0.05
        connection = http.client.HTTPConnection(*scheduler.address.rsplit(":", 1), timeout=10)
        self.addCleanup(connection.close)
        self.assert_parked_connection_is_served(scheduler, connection)

    def test_a_parked_connection_is_closed_after_the_read_timeout(self):
        scheduler = self.scheduler(read_timeout=0.5)
        scheduler.server.park_after = 0.05
        host, port = scheduler.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /workers HTTP/1.1\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"workers": []}'):
                reply += sock.recv(4096)
            self.assertEqual(sock.recv(4096), b"")  # closed by the server, not by the timeout

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        scheduler = self.scheduler()
        connection = http.client.HTTPConnection(*scheduler.address.rsplit(":", 1), timeout=10)
        self.addCleanup(connection.close)
        for _ in range(3):
            connection.request("GET", "/workers")
            response = connection.getresponse()
            self.assertEqual((response.status, response.read()), (200, b'{"workers": []}'))
        self.assertIsNotNone(connection.sock)  # never closed in between


class QuickRequestTest(ClusterTestCase):
    """A heartbeat that has come whole on a parked plain connection is answered on the parking
    thread itself; anything else goes to a thread as before, and a request read otherwise than
    it is framed closes the connection."""

    def parked_connection(self, headers=(), **kwargs):
        """(scheduler, names of the threads that served each heartbeat, socket to it whose
        first heartbeat was answered and which is parked now, heartbeat request bytes)."""
        scheduler = self.scheduler(**kwargs)
        scheduler.server.park_after = 0.05
        scheduler.register("127.0.0.1:9", {"worker_id": "w1", "slots": 0})
        served_by, threads, heartbeat = [], [], scheduler.server.methods["heartbeat"]

        def recording(*args):
            served_by.append(threading.current_thread().name)
            threads.append(threading.current_thread())
            return heartbeat(*args)
        scheduler.server.methods["heartbeat"] = recording
        beat = http_request(scheduler.address, "POST", "/RPC2", rpc_body("heartbeat", "w1"),
                            headers)
        host, port = scheduler.address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(beat)
        [(status, body)] = read_responses(sock, 1)
        self.assertEqual((status, xmlrpc.client.loads(body)[0]), (200, (True,)))
        # the connection's own thread ends once it has handed the connection to the parking
        # thread (other tests' threads may end meanwhile: a count of threads would not tell)
        wait_until(lambda: not threads[0].is_alive(), message="the connection to be parked")
        self.assertNotEqual(served_by, ["jobsched-parking"])
        return scheduler, served_by, sock, beat

    def test_a_heartbeat_on_a_parked_connection_is_answered_by_the_parking_thread(self):
        scheduler, served_by, sock, beat = self.parked_connection()
        sock.sendall(beat)
        self.assertEqual(read_responses(sock, 1)[0][0], 200)
        self.assertEqual(served_by[1:], ["jobsched-parking"])
        sock.sendall(http_request(scheduler.address, "POST", "/RPC2", rpc_body("info")))
        status, body = read_responses(sock, 1)[0]  # the connection goes on, for any call
        self.assertEqual(xmlrpc.client.loads(body)[0][0]["role"], "scheduler")

    def test_pipelined_requests_on_a_parked_connection_are_answered_in_order(self):
        scheduler, served_by, sock, beat = self.parked_connection()
        info = http_request(scheduler.address, "POST", "/RPC2", rpc_body("info"))
        sock.sendall(beat + beat + info + beat)
        answers = [xmlrpc.client.loads(body)[0][0] for _, body in read_responses(sock, 4)]
        self.assertEqual([answer is True for answer in answers], [True, True, False, True])
        self.assertEqual(answers[2]["role"], "scheduler")
        self.assertEqual(served_by[1:3], ["jobsched-parking"] * 2)
        self.assertEqual(len(served_by), 4)

    def test_a_request_still_coming_on_a_parked_connection_is_left_to_a_thread(self):
        scheduler, served_by, sock, beat = self.parked_connection()
        sock.sendall(beat[:-20])
        time.sleep(0.2)  # the parking thread has seen it, and let a thread wait for the rest
        sock.sendall(beat[-20:])
        self.assertEqual(read_responses(sock, 1)[0][0], 200)
        self.assertEqual(len(served_by), 2)
        self.assertNotEqual(served_by[1], "jobsched-parking")

    def test_a_request_read_otherwise_than_it_is_framed_closes_the_connection(self):
        # Framed by its second Content-Length (the first line ends in a bare LF, which the
        # server's reader takes for the end of the headers): the server would read "xyz" as the
        # body and the rest as a next request, which was consumed with the first.
        scheduler, served_by, sock, _ = self.parked_connection()
        inner = rpc_body("heartbeat", "w1")
        sock.sendall(b"POST /RPC2 HTTP/1.1\r\nContent-Length: 3\n\r\nxyz\r\nContent-Length: %d"
                     b"\r\n\r\n%s" % (len(inner), inner))
        self.assertEqual(len(read_responses(sock, 1)), 1)  # a fault: "xyz" is no XML-RPC call
        self.assertEqual(sock.recv(4096), b"")
        self.assertEqual(len(served_by), 1)

    def test_after_slow_inline_answers_in_a_row_heartbeats_go_to_threads_for_a_while(self):
        scheduler, served_by, sock, beat = self.parked_connection()
        heartbeat, slow = scheduler.server.methods["heartbeat"], [False, True, True, True]
        scheduler.server.methods["heartbeat"] = lambda *args: (
            time.sleep(0.3) if threading.current_thread().name == "jobsched-parking" and slow
            and slow.pop(0) else None, heartbeat(*args))[1]  # as when the interpreter is busy
        # slow: 0.3 s, where a loaded machine may take a few ms on its own
        self.addCleanup(setattr, jobsched, "INLINE_SLOW_SECONDS", jobsched.INLINE_SLOW_SECONDS)
        jobsched.INLINE_SLOW_SECONDS = 0.15
        for _ in range(5):
            sock.sendall(beat)
            self.assertEqual(read_responses(sock, 1)[0][0], 200)
        wait_until(lambda: scheduler.server._idle == 1, message="the connection to be parked")
        self.assertEqual(served_by[1:5], ["jobsched-parking"] * 4)  # a fast one between
        self.assertNotEqual(served_by[5], "jobsched-parking")
        scheduler.server._inline_paused_until = time.monotonic()  # the pause is over
        sock.sendall(beat)
        self.assertEqual(read_responses(sock, 1)[0][0], 200)
        self.assertEqual(served_by[6], "jobsched-parking")

    def test_a_call_that_only_mentions_heartbeat_is_left_to_a_thread(self):
        scheduler, served_by, sock, _ = self.parked_connection()
        info_by, info = [], scheduler.server.methods["info"]
        scheduler.server.methods["info"] = lambda: info_by.append(
            threading.current_thread().name) or info()
        heartbeat = b"<methodName>heartbeat</methodName>"
        for body, answer in (
                (b"<methodCall><!--" + heartbeat + b"--><methodName>info</methodName></methodCall>",
                 "scheduler"),
                (b"<methodCall>" + heartbeat + b"<methodName>info</methodName></methodCall>",
                 "more than one methodName")):
            sock.sendall(http_request(scheduler.address, "POST", "/RPC2", body))
            try:
                got = xmlrpc.client.loads(read_responses(sock, 1)[0][1])[0][0]["role"]
            except xmlrpc.client.Fault as e:
                got = e.faultString
            self.assertEqual(got, answer)
        self.assertEqual(len(info_by), 1)
        self.assertNotEqual(info_by[0], "jobsched-parking")
        self.assertEqual(len(served_by), 1)  # heartbeat itself never called

    def test_a_peer_that_reads_no_answers_is_closed_without_holding_the_parking_thread(self):
        scheduler, served_by, victim, beat = self.parked_connection()
        host, port = scheduler.address.rsplit(":", 1)
        timeouts, quick_request = [], scheduler.server.quick_request

        def small_send_buffer(connection):  # filled after a few dozen answers
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            received = quick_request(connection)
            if received is not None:
                timeouts.append(connection.gettimeout())
            return received
        # answered inline however slowly a loaded machine answers them (a thread would wait)
        self.addCleanup(setattr, jobsched, "INLINE_SLOW_IN_A_ROW", jobsched.INLINE_SLOW_IN_A_ROW)
        jobsched.INLINE_SLOW_IN_A_ROW = float("inf")
        scheduler.server.quick_request = small_send_buffer
        reader = socket.socket()
        self.addCleanup(reader.close)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.settimeout(10)
        reader.connect((host, int(port)))
        reader.sendall(beat)
        self.assertEqual(read_responses(reader, 1)[0][0], 200)
        wait_until(lambda: served_by[-1] == "jobsched-parking" or not time.sleep(0.05) and
                   reader.sendall(beat), message="the reader's heartbeats to be answered inline")
        try:
            for _ in range(2000):
                reader.sendall(beat)
            while reader.recv(65536):  # all sent: the answers must end with a close
                pass
        except socket.timeout:
            self.fail("the server stopped reading the connection without closing it")
        except OSError:
            pass  # reset
        victim.sendall(beat)
        self.assertEqual(read_responses(victim, 1)[0][0], 200)
        self.assertEqual(set(timeouts), {0.0})  # the parking thread never waits on a socket

    def test_an_unauthorized_heartbeat_on_a_parked_connection_is_refused_and_closed(self):
        scheduler, served_by, sock, beat = self.parked_connection(
            token=TOKEN, headers=(("Authorization", "Bearer " + TOKEN),))
        sock.sendall(beat.replace(TOKEN.encode(), b"x" * len(TOKEN)))
        self.assertEqual(read_responses(sock, 1), [(401, b"")])
        self.assertEqual(sock.recv(4096), b"")
        self.assertEqual(len(served_by), 1)


class HostileInputTest(ClusterTestCase):
    """Body limits, read timeout, XML and JSON attacks, a fuzz pass: faults or 4xx, never harm."""

    def test_a_refused_body_is_read_and_dropped_only_until_the_requests_deadline(self):
        scheduler = self.scheduler(max_request=1000, read_timeout=1.0)
        host, port = scheduler.address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(http_request(scheduler.address, "POST", "/RPC2", content_length=False,
                                  headers=(("Content-Length", str(10 ** 6)),)))
        self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 413 "))  # before the body
        done = threading.Event()
        self.addCleanup(done.set)

        def trickle():  # a byte of the body every 0.2 s: each read gets one in time
            while not done.wait(0.2):
                try:
                    sock.send(b"x")
                except OSError:
                    return
        threading.Thread(target=trickle, daemon=True).start()
        sock.settimeout(8.0)  # less than the 10 s a refused body may take at most
        try:
            self.assertEqual(sock.recv(4096), b"")  # closed at the request's deadline (1 s)
        except ConnectionResetError:
            pass

    def test_body_limits_and_encodings(self):
        scheduler = self.scheduler(max_request=1000)
        worker = self.worker(None, max_request=1000)
        for role in (scheduler, worker):
            address = role.address
            for length in (1001, 10 ** 12, 10 ** 40):
                # only the headers are sent: a 413 must come without the body having been read
                status, headers, body = raw_http(address, http_request(
                    address, "POST", "/RPC2", content_length=False,
                    headers=(("Content-Length", str(length)),)))
                self.assertEqual(status, 413)
                self.assertEqual(headers["Connection"], "close")
            status, _, body = raw_http(address, http_request(address, "POST", "/RPC2",
                                                             content_length=False))
            self.assertEqual(status, 411)
            status, _, _ = raw_http(address, http_request(
                address, "POST", "/RPC2", headers=(("Transfer-Encoding", "chunked"),),
                content_length=False))
            self.assertEqual(status, 400)
            status, _, _ = raw_http(address, http_request(
                address, "POST", "/RPC2", rpc_body("info"), headers=(("Content-Encoding", "gzip"),)))
            self.assertEqual(status, 415)
            for bad in ("abc", "-5", "1e3", "\u00b2"):
                status, _, _ = raw_http(address, http_request(
                    address, "POST", "/RPC2", content_length=False, headers=(("Content-Length", bad),)))
                self.assertEqual(status, 400, bad)
            result = xml_call(address, rpc_body("info"))
            self.assertEqual(result["version"], jobsched.__version__)

    def test_client_stalling_mid_body_is_cut_off(self):
        scheduler = self.scheduler(read_timeout=0.5)
        host, port = scheduler.address.rsplit(":", 1)
        stalled = socket.create_connection((host, int(port)), timeout=10)
        self.addCleanup(stalled.close)
        body = rpc_body("info")
        stalled.sendall(http_request(scheduler.address, "POST", "/RPC2", content_length=False,
                                     headers=(("Content-Length", str(len(body))),)) + body[:10])
        client = self.client(scheduler)
        self.assertEqual(client.info()["role"], "scheduler")  # not blocked by the stalled one
        self.assertEqual(stalled.recv(1024), b"")  # cut off, with no answer
        self.assertEqual(client.info()["role"], "scheduler")

    def test_xml_attacks_get_faults(self):
        scheduler, (worker,), client = self.cluster(1)
        laughs = ('<!DOCTYPE m [<!ENTITY a "aaaaaaaaaa">' + "".join(
            '<!ENTITY %s "%s">' % (chr(ord("b") + i), ("&%s;" % chr(ord("a") + i)) * 10)
            for i in range(8)) + ']><methodCall><methodName>&i;</methodName><params/></methodCall>')
        blowup = ('<!DOCTYPE m [<!ENTITY x "%s">]><methodCall><methodName>info</methodName><params>'
                  '<param><value><string>%s</string></value></param></params></methodCall>'
                  % ("x" * 20000, "&x;" * 20000))
        xxe = ('<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
               '<methodCall><methodName>info</methodName><params><param><value>&x;</value>'
               '</param></params></methodCall>')
        dtd_bodies = [laughs.encode(), ('<?xml version="1.0" encoding="UTF-16"?>' + laughs).encode("utf-16"),
                      blowup.encode(), xxe.encode(),
                      ('<?xml version="1.0" encoding="UTF-16"?>' + xxe[21:]).encode("utf-16-le")]
        for role, prefix in ((scheduler, ("",)), (worker, ())):
            for body in dtd_bodies:
                fault = xml_call(role.address, body)
                self.assertIsInstance(fault, xmlrpc.client.Fault)
                self.assertEqual((fault.faultCode, fault.faultString),
                                 (2, "DTDs and entity declarations are not allowed"))
            for body in self.hostile_xml_bodies(prefix):
                fault = xml_call(role.address, body)
                self.assertIsInstance(fault, xmlrpc.client.Fault, body[:100])
                self.assertIn(fault.faultCode, (1, 2), (body[:100], fault.faultString))
                self.assertLess(len(fault.faultString), 400)
        self.assertEqual(client.jobs(), [])
        self.check_still_serving(client)

    @staticmethod
    def hostile_xml_bodies(prefix):
        """Requests that must each get a fault; prefix is ("",) for the scheduler's worker_id."""
        depth = 10000
        deep_array = "<value><array><data>" * depth + "</data></array></value>" * depth
        deep_struct = ("<value><struct><member><name>args</name>" * depth + "<value>x</value>"
                       + "</member></struct></value>" * depth)
        start = "".join("<param><value>%s</value></param>" % p for p in prefix + ("sh", ""))
        start = "<methodCall><methodName>start</methodName><params>%s%%s</params></methodCall>" % start
        bodies = [
            start % ("<param>%s</param>" % deep_array), start % ("<param>%s</param>" % deep_struct),
            "<methodCall><methodName>info</methodName><params><param>%s</param></params>"
            "</methodCall>" % deep_array,
            b"<methodCall><methodName>in\xff\xfefo</methodName><params/></methodCall>",
            b"\xff\xfe\x00\x01garbage", b"", b"<methodCall><methodName>info</methodName>",
            b"<methodResponse><params><param><value>1</value></param></params></methodResponse>",
            rpc_body("start", *(prefix + ("x" * 900000, ""))),
            rpc_body("start", *(prefix + ("sh", "", {"args": ["y" * 70000]}))),
            rpc_body("start", *(prefix + ("sh", "", {"env": {"K": "v" * 70000}}))),
            rpc_body("start", *(prefix + ("sh", "", {"nonsense": 1}))),
            rpc_body("start", *(prefix + (5, ""))),
            rpc_body("start", *(prefix + ("sh", "", {"args": [1, 2]}))),
            rpc_body("start", *(prefix + ("sh", "", {"timeout": -1.0}))),
            rpc_body("start"), rpc_body("query", "j" * 100000), rpc_body("query", 7),
            rpc_body("output", "job", [[["x"]]], 10), rpc_body("no_such_method"),
            "<methodCall><methodName>output</methodName><params><param><value><int>%s</int>"
            "</value></param></params></methodCall>" % ("9" * 200000),
            "<methodCall><methodName>info</methodName><params><param><value><dateTime.iso8601>"
            "nonsense</dateTime.iso8601></value></param></params></methodCall>",
            "<methodCall><methodName>info</methodName><params><param><value><base64>!!"
            "</base64></value></param></params></methodCall>",
        ]
        return [body.encode() if isinstance(body, str) else body for body in bodies]

    def test_json_attacks_get_4xx(self):
        scheduler, _, client = self.cluster(1)
        base = "http://%s" % scheduler.address
        for body in (b"{", b"\xff\xfe{}", b"[1, 2]", b'"text"', b"{" * 100000 + b"}" * 100000,
                     b'{"command": "sh", "args": ' + b"[" * 50000 + b"]" * 50000 + b"}",
                     b'{"command": "' + b"x" * 900000 + b'"}', b'{"command": "\\ud800"}',
                     b'{"command": "sh", "args": ["\\u0001"]}', b'{"command": 1}',
                     b'{"command": "sh", "timeout": ' + b"9" * 100000 + b"}",
                     b'{"command": "sh", "timeout": 1e999}', b'{"command": "sh", "bogus": 1}',
                     b'{"job_id": {"a": [1]}}'):
            status, reply = url_open(base + "/start", body)
            self.assertEqual(status, 400, (body[:60], reply))
            self.assertIn("error", json.loads(reply.decode()))
        status, reply = url_open(base + "/query", b'{"job_id": "x"}')
        self.assertEqual(status, 404)
        self.assertEqual(url_open(base + "/nowhere", b"{}")[0], 404)
        self.assertEqual(client.jobs(), [])
        self.check_still_serving(client)

    def test_job_output_with_control_bytes_and_invalid_utf8(self):
        _, _, client = self.cluster(1)
        job_id = client.start("", "sh", "", {"args": ["-c", r"printf '\000\001\033[31m\377\376\r\n'"]})
        self.wait_done(client, job_id)
        self.assertEqual(client.output(job_id)["data"], b"\x00\x01\x1b[31m\xff\xfe\r\n")
        self.assertEqual(client.query(job_id)["output_bytes"], 11)

    def check_still_serving(self, client, word="still-serving"):
        job_id = client.start("", "sh", "", {"args": ["-c", "echo " + word]})
        job = self.wait_done(client, job_id)
        self.assertEqual((job["state"], job["exit_code"]), ("succeeded", 0))
        self.assertEqual(client.output(job_id)["data"], (word + "\n").encode())

    def test_fuzz_pass_leaves_servers_working(self):
        records = capture_jobsched_log(self, logging.ERROR)
        scheduler = self.scheduler(max_request=64 * 1024, read_timeout=2.0)
        worker = self.worker(scheduler, max_request=64 * 1024, read_timeout=2.0,
                             allow=["echo"])  # whatever a mutation makes of a start, only echo runs
        client = self.client(scheduler)
        wait_until(lambda: any(w["online"] for w in client.workers()), message="worker to register")
        rng = random.Random(20240611)
        valid_xml = [rpc_body("start", "", "echo", "", {"args": ["fuzz"]}),
                     rpc_body("query", "00000000-0000-0000-0000-000000000000"),
                     rpc_body("output", "job", 0, 100, 0), rpc_body("info"), rpc_body("workers"),
                     rpc_body("jobs")]
        valid_json = [b'{"command": "echo", "args": ["fuzz"]}', b'{"job_id": "abc"}', b"{}"]
        junk = [b"<", b">", b"&", b"\x00", b"\xff", b"<!DOCTYPE x>", b"<value>", b"</param>",
                b"&#0;", b"&#xD800;", b"]]>", b"<![CDATA[", b"9" * 50, b'"', b"{", b"[", b"\\u"]

        def mutate(data):
            data = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                position = rng.randint(0, len(data))
                choice = rng.random()
                if choice < 0.3:
                    del data[position:position + rng.randint(1, 20)]
                elif choice < 0.6:
                    data[position:position] = rng.choice(junk)
                elif choice < 0.8 and data:
                    data[min(position, len(data) - 1)] = rng.randint(0, 255)
                else:
                    data[position:position] = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 30)))
            return bytes(data)

        roles = [scheduler, worker]
        outcomes = {}
        for i in range(360):
            role = roles[i % 2]
            address = role.address
            kind = rng.choice(["xml", "xml", "xml", "json", "oversized", "headers", "garbage"])
            headers = (("Content-Type", "text/xml"),)
            if kind == "xml":
                request = http_request(address, "POST", rng.choice(["/RPC2", "/"]),
                                       mutate(rng.choice(valid_xml)), headers)
            elif kind == "json":
                request = http_request(address, rng.choice(["POST", "GET"]),
                                       rng.choice(["/start", "/query", "/stop", "/workers", "/jobs"]),
                                       mutate(rng.choice(valid_json)))
            elif kind == "oversized":
                request = http_request(address, "POST", "/RPC2", content_length=False, headers=(
                    ("Content-Length", str(rng.randint(64 * 1024 + 1, 10 ** 15))),))
            elif kind == "headers":
                request = mutate(http_request(address, "POST", "/RPC2", rpc_body("info"), headers))
            else:
                request = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 300))) + b"\r\n\r\n"
            status, _, body = raw_http(address, request, shut_write=True)
            outcomes[status] = outcomes.get(status, 0) + 1
            self.assertNotEqual(status, 500, (kind, request[:300], body[:300]))
            if status == 200 and kind == "xml":
                try:
                    xmlrpc.client.loads(body)
                except xmlrpc.client.Fault as fault:
                    self.assertIn(fault.faultCode, (1, 2, 3), (request[:300], fault.faultString))
        self.assertGreater(outcomes.get(200, 0), 50, outcomes)
        self.assertGreater(outcomes.get(400, 0) + outcomes.get(413, 0), 50, outcomes)
        self.assertEqual([r.getMessage() for r in records], [])
        self.assertTrue(all(thread.is_alive() for thread in scheduler._threads + worker._threads))
        # a normal job still starts, runs and reports correctly through the scheduler
        online = wait_until(lambda: [w for w in client.workers()
                                     if w["online"] and w["worker_id"] == worker.worker_id],
                            message="the worker to stay online")
        self.assertEqual(len(online), 1)
        job_id = client.start("", "echo", "", {"args": ["after", "fuzz"]})
        job = self.wait_done(client, job_id)
        self.assertEqual((job["state"], job["exit_code"]), ("succeeded", 0))
        self.assertEqual(client.output(job_id)["data"], b"after fuzz\n")
        self.assertEqual(self.client(worker).info()["worker_id"], worker.worker_id)


# A job that writes `first` lines, then "waiting", waits for a gate file, then writes `second`
# lines and exits 7: what a follower must copy whole and in order across a lost scheduler.
GATED_WRITER = (
    "import os, sys, time\n"
    "gate, first, second = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
    "for i in range(first):\n"
    "    sys.stdout.write('before %d\\n' % i)\n"
    "sys.stdout.write('waiting\\n')\n"
    "sys.stdout.flush()\n"
    "while not os.path.exists(gate):\n"
    "    time.sleep(0.02)\n"
    "for i in range(second):\n"
    "    sys.stdout.write('after %d\\n' % i)\n"
    "sys.stdout.flush()\n"
    "sys.exit(7)\n")


def gated_output(first, second):
    return ("".join("before %d\n" % i for i in range(first)) + "waiting\n"
            + "".join("after %d\n" % i for i in range(second))).encode()


def cli_env(**extra):
    """The environment of a CLI process: ours without any jobsched setting, plus extra."""
    return example_env(**extra)


class StopSignalTest(ClusterTestCase):
    """run and run --all when a signal lands at the worst moment: in the middle of a write to
    stdout, just after the job is placed, and again while run says it is stopping. Each case
    widens its window in a wrapper that patches the client before jobsched.main() runs."""

    def setUp(self):
        self.scheduler_, workers, self.c = self.cluster(workers=2, slots=4)
        self.marker = os.path.join(self.tempdir(), "now")

    def run_patched(self, patch, args, read=True, preexec_fn=None):
        """`jobsched.py ARGS` with PATCH run first (it may create self.marker: the window is
        open); returns (proc, stdout chunks read by a thread, that thread); read=False: its
        stdout is a pipe nobody reads."""
        code = ("import io, os, sys, time\nsys.path.insert(0, %r)\nimport jobsched\n"
                "MARKER = %r\n%s\nsys.exit(jobsched.main(sys.argv[1:]))\n"
                % (HERE, self.marker, textwrap.dedent(patch)))
        proc = subprocess.Popen([sys.executable, "-c", code] + list(args),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=preexec_fn,
                                env=cli_env(JOBSCHED_SCHEDULER=self.scheduler_.address))
        chunks = []
        reader = threading.Thread(
            target=lambda: read and chunks.extend(iter(lambda: proc.stdout.read(65536), b"")))
        reader.start()
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait(), reader.join(),
                                 proc.stdout.close(), proc.stderr.close()))
        return proc, chunks, reader

    def when_open(self, proc):
        wait_until(lambda: os.path.exists(self.marker) or proc.poll() is not None,
                   timeout=30, message="the window to open")
        if proc.poll() is not None:
            self.fail("exited %d first: %s" % (proc.returncode, proc.stderr.read().decode()))

    def test_a_signal_in_the_middle_of_a_write_writes_no_byte_twice(self):
        # The first big write to stdout stops half way for 2 s: the signal comes then. (Both
        # ways to write are patched: os.write() may return the half as a signal makes it do.)
        patch = """
            real_write = os.write
            def half_then_wait(fd, data):
                if fd == 1 and len(data) > 100000 and not os.path.exists(MARKER):
                    written = real_write(fd, bytes(data[:len(data) // 2]))
                    open(MARKER, "w").close()
                    time.sleep(2)
                    return written
                return real_write(fd, data)
            os.write = half_then_wait
            class HalfThenWait(io.BufferedWriter):
                def write(self, data):
                    if len(data) > 100000 and not os.path.exists(MARKER):
                        half = len(data) // 2
                        super().write(data[:half]); super().flush()
                        open(MARKER, "w").close()
                        time.sleep(2)
                        return half + super().write(data[half:])
                    return super().write(data)
            sys.stdout = io.TextIOWrapper(HalfThenWait(io.FileIO(1, "w", closefd=False)))
            """
        for signum, status in ((signal.SIGINT, 0), (signal.SIGTERM, 143)):
            with self.subTest(signal=signum):
                if os.path.exists(self.marker):
                    os.remove(self.marker)
                proc, chunks, reader = self.run_patched(patch, ["run", "--", "seq", "1", "300000"])
                self.when_open(proc)
                proc.send_signal(signum)
                self.assertEqual(proc.wait(timeout=30), status, proc.stderr.read().decode())
                reader.join()
                lines = b"".join(chunks).decode().split()
                self.assertEqual(len(lines), 300000)
                self.assertEqual(lines, [str(i) for i in range(1, 300001)])

    def test_a_signal_once_run_has_returned_ends_it_with_its_status_and_no_traceback(self):
        # The signal lands as the script exits, after main() has restored the handlers.
        code = ("import os, runpy, signal, sys, time\n"
                "real_exit = sys.exit\n"
                "def exit_after_a_signal(status):\n"
                "    os.kill(os.getpid(), signal.SIGINT)\n"
                "    time.sleep(2)\n"
                "    real_exit(status)\n"
                "sys.exit = exit_after_a_signal\n"
                "sys.argv = [%r, 'run', '--', 'sh', '-c', 'echo out; exit 3']\n"
                "runpy.run_path(%r, run_name='__main__')\n" % (JOBSCHED, JOBSCHED))
        done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                              env=cli_env(JOBSCHED_SCHEDULER=self.scheduler_.address))
        self.assertEqual((done.returncode, done.stdout), (3, b"out\n"), done.stderr)
        self.assertNotIn(b"Traceback", done.stderr)

    def test_output_written_whole_while_signals_come(self):
        # What copy() writes with: to a pipe read slowly, with signals whose handler returns
        # landing in the writes (a BufferedWriter's write() loses bytes then).
        child = ("import signal, sys\nsys.path.insert(0, %r)\nimport jobsched\n"
                 "signal.signal(signal.SIGINT, lambda signum, frame: None)\n"
                 "data = b''.join(b'%%d\\n' %% i for i in range(1, 1500001))\n"
                 "print('ready', file=sys.stderr, flush=True)\n"
                 "for k in range(0, len(data), 1 << 20):\n"
                 "    jobsched._Follower(None, 'job')._write(sys.stdout.buffer, data[k:k + (1 << 20)])\n"
                 % HERE)
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait(),
                                 proc.stdout.close(), proc.stderr.close()))
        self.assertEqual(proc.stderr.readline(), b"ready\n")
        chunks = []

        def read_slowly():
            for chunk in iter(lambda: proc.stdout.read1(16384), b""):
                chunks.append(chunk)
                time.sleep(0.002)
        reader = threading.Thread(target=read_slowly)
        reader.start()
        for _ in range(5):
            time.sleep(0.2)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(timeout=60), 0)
        reader.join()
        self.assertEqual(b"".join(chunks), b"".join(b"%d\n" % i for i in range(1, 1500001)))

    def test_two_signals_in_one_write_are_counted_once(self):
        # stdout is a full pipe: the write blocks; two signals cut it short at once, and both
        # handlers run right after it returns. The bytes it wrote must be counted.
        child = ("import sys\nsys.path.insert(0, %r)\nimport jobsched\n"
                 "follower = jobsched._Follower(None, 'job')\n"
                 "def body():\n"
                 "    try:\n"
                 "        follower._write(sys.stdout.buffer, b'x' * (4 << 20))\n"
                 "    except BaseException as e:\n"
                 "        print(type(e).__name__, follower.offset, file=sys.stderr)\n"
                 "jobsched._with_stop_signals(body)\n" % HERE)
        for signals in ((signal.SIGINT, signal.SIGTERM), (signal.SIGHUP, signal.SIGINT)):
            with self.subTest(signals=signals):
                read_end, write_end = os.pipe()
                proc = subprocess.Popen([sys.executable, "-c", child], stdout=write_end,
                                        stderr=subprocess.PIPE)
                os.close(write_end)
                time.sleep(1.0)  # the pipe is full: the child waits in os.write
                for signum in signals:
                    os.kill(proc.pid, signum)
                time.sleep(0.5)
                with os.fdopen(read_end, "rb") as pipe:
                    written = len(pipe.read())
                error = proc.communicate(timeout=30)[1].decode().split()
                first = "KeyboardInterrupt" if signals[0] == signal.SIGINT else "_Signalled"
                self.assertEqual(error, [first, str(written)])

    def test_a_signal_while_the_job_is_placed_stops_it(self):
        # The submit (start_all) has placed the job(s) and takes 2 s more to come back.
        patch = """
            def slowly(method):
                def call(*args, **kwargs):
                    result = method(*args, **kwargs)
                    open(MARKER, "w").close()
                    time.sleep(2)
                    return result
                return call
            jobsched.Client.submit = slowly(jobsched.Client.submit)
            jobsched.Client.start_all = slowly(jobsched.Client.start_all)
            """
        for args, count in ((["run", "--", "sleep", "300"], 1),
                            (["run", "--all", "--", "sleep", "300"], 2)):
            for signum in (signal.SIGINT, signal.SIGTERM):
                with self.subTest(args=args, signal=signum):
                    if os.path.exists(self.marker):
                        os.remove(self.marker)
                    known = {job["job_id"] for job in self.c.jobs()}
                    proc, _, _ = self.run_patched(patch, args)
                    self.when_open(proc)
                    proc.send_signal(signum)
                    # Ctrl-C: the job's status (stopped by SIGTERM); SIGTERM: 143 in any case
                    self.assertEqual(proc.wait(timeout=30), 143, proc.stderr.read().decode())
                    placed = [job for job in self.c.jobs() if job["job_id"] not in known]
                    self.assertEqual(len(placed), count)
                    for job in placed:
                        ended = self.wait_done(self.c, job["job_id"])
                        self.assertEqual(ended["state"], "stopped")

    def new_jobs(self, known, count, state):
        return wait_until(lambda: (lambda jobs: jobs if len(jobs) == count else None)(
            [job for job in self.c.jobs() if job["job_id"] not in known and job["state"] == state]),
            message="%d new %s jobs" % (count, state))

    def test_a_signal_while_a_queued_job_is_placed_cancels_it_at_once(self):
        for _ in range(8):  # every slot of the two workers
            self.c.start("", "sleep", "", {"args": ["300"]})
        known = {job["job_id"] for job in self.c.jobs()}
        patch = """
            submit = jobsched.Client.submit
            def slowly(*args, **kwargs):
                result = submit(*args, **kwargs)
                open(MARKER, "w").close()
                time.sleep(2)
                return result
            jobsched.Client.submit = slowly
            """
        proc, _, _ = self.run_patched(patch, ["run", "--", "true"])
        self.when_open(proc)
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(timeout=30), 130, proc.stderr.read().decode())
        self.new_jobs(known, 1, "cancelled")

    def test_one_signal_stops_the_job_while_stdout_is_not_read(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            with self.subTest(signal=signum):
                known = {job["job_id"] for job in self.c.jobs()}
                proc, _, _ = self.run_patched("", ["run", "--", "sh", "-c",
                                                   "seq 1 400000; sleep 300"], read=False)
                (job,) = self.new_jobs(known, 1, "running")
                time.sleep(1.0)  # run is blocked writing to the full pipe
                proc.send_signal(signum)
                self.assertEqual(self.wait_done(self.c, job["job_id"])["state"], "stopped")
                proc.kill()

    def test_run_started_ignoring_sigint_keeps_its_job(self):
        # A script's background job (`jobsched.py run ... &`) starts with SIGINT ignored.
        known = {job["job_id"] for job in self.c.jobs()}
        proc, _, _ = self.run_patched("", ["run", "--", "sleep", "300"],
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        (job,) = self.new_jobs(known, 1, "running")
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        self.assertIsNone(proc.poll())
        self.assertEqual(self.c.query(job["job_id"])["state"], "running")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=30), 143)
        self.assertEqual(self.wait_done(self.c, job["job_id"])["state"], "stopped")

    def test_a_second_sigterm_while_run_says_it_is_stopping(self):
        # Each write to stderr takes 0.5 s: the second SIGTERM lands in "stopping job ...".
        patch = """
            class Slow:
                def __init__(self, stream):
                    self.stream = stream
                def write(self, text):
                    time.sleep(0.5)
                    return self.stream.write(text)
                def __getattr__(self, name):
                    return getattr(self.stream, name)
            sys.stderr = Slow(sys.stderr)
            """
        for args, count in ((["run", "-q", "--", "sleep", "300"], 1),
                            (["run", "--all", "--", "sleep", "300"], 2)):
            with self.subTest(args=args):
                known = {job["job_id"] for job in self.c.jobs()}
                proc, _, _ = self.run_patched(patch, args)
                wait_until(lambda: len([job for job in self.c.jobs() if job["job_id"] not in known
                                        and job["state"] == "running"]) == count,
                           message="the jobs to run")
                time.sleep(0.6)  # past run's own first lines on stderr
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(timeout=30), 143, proc.stderr.read().decode())
                for job in [job for job in self.c.jobs() if job["job_id"] not in known]:
                    self.assertEqual(self.wait_done(self.c, job["job_id"])["state"], "stopped")


class FollowAcrossRestartTest(ClusterTestCase):
    """run and logs -f as a user runs them while the scheduler is killed (-9) and restarted on
    the same port, or never comes back; run's answer to SIGTERM, SIGHUP and a closed stdout."""

    def setUp(self):
        self.sched_proc, self.address = self.spawn("scheduler", "--listen", "127.0.0.1:0")
        self.w = self.worker(self.address)
        self.c = self.client(self.address)
        wait_until(lambda: [x["online"] for x in self.c.workers()] == [True],
                   message="the worker to register")
        self.env = cli_env(JOBSCHED_SCHEDULER=self.address)

    def kill_scheduler(self):
        self.sched_proc.kill()
        self.sched_proc.wait(timeout=10)

    def restart_scheduler(self):
        self.sched_proc, _ = self.spawn("scheduler", "--listen", self.address)

    def gated_job_argv(self, first=200, second=20000):
        gate = os.path.join(self.tempdir(), "gate")
        return gate, [sys.executable, "-c", GATED_WRITER, gate, str(first), str(second)]

    def job_of(self, marker):
        return [j for j in self.c.jobs() if marker in j["args"]]

    def test_logs_follow_survives_a_scheduler_restart(self):
        # Over a MiB before the pause: the chunks asked for ahead are in flight when it goes.
        gate, argv = self.gated_job_argv(first=110000)
        job_id = self.c.start("", argv[0], "", {"args": argv[1:]})
        self.addCleanup(lambda: fault_of(self.client(self.w).stop, job_id))
        proc = popen_jobsched(self, ["logs", "-f", job_id], env=self.env)
        seen = read_until(proc, b"waiting\n")
        self.kill_scheduler()
        self.restart_scheduler()  # knows no worker and no job until the worker registers again
        open(gate, "w").close()
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        self.assertTrue(seen + out == gated_output(110000, 20000))  # nothing lost or twice
        self.assertEqual(err.count(b"retrying for up to 60 s"), 1, err)  # said once
        self.assertLessEqual(err.count(b"reconnected"), 1, err)
        self.assertNotIn(b"Traceback", err)

    def run_across_a_scheduler_restart(self, *args):
        """`jobsched ARGS -- gated job` with the scheduler killed and restarted while the job
        waits; checks exit status 7, every byte once, no traceback. Returns (gate, stderr)."""
        gate, argv = self.gated_job_argv()
        proc = popen_jobsched(self, list(args) + ["--"] + argv, env=self.env)
        seen = read_until(proc, b"waiting\n")
        self.kill_scheduler()
        self.restart_scheduler()
        open(gate, "w").close()
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 7, err)
        self.assertEqual(seen + out, gated_output(200, 20000))  # nothing lost, nothing twice
        self.assertNotIn(b"Traceback", err)
        return gate, err

    def test_run_survives_a_scheduler_restart_and_exits_with_the_jobs_status(self):
        gate, err = self.run_across_a_scheduler_restart("run")
        (job,) = self.job_of(gate)
        self.assertIn(("jobsched: job %s on %s (%s)\n" % (job["job_id"], self.w.worker_id,
                                                          socket.gethostname())).encode(), err)

    def test_run_all_survives_a_scheduler_restart(self):
        self.run_across_a_scheduler_restart("run", "--all", "--no-prefix")

    def test_run_gives_up_after_reconnect_seconds_and_says_how_to_resume(self):
        gate, argv = self.gated_job_argv(first=50, second=10)
        proc = popen_jobsched(self, ["run", "--reconnect", "0.5", "--"] + argv, env=self.env)
        seen = read_until(proc, b"waiting\n")
        (job,) = self.job_of(gate)
        self.addCleanup(lambda: fault_of(self.client(self.w).stop, job["job_id"]))
        self.kill_scheduler()
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 255, err)
        offset = len(seen + out)
        self.assertEqual(seen + out, gated_output(50, 0))
        last = err.decode().strip().splitlines()[-1]
        self.assertEqual(last, "jobsched: lost the scheduler; the job goes on: "
                               "jobsched.py logs -f --offset %d %s" % (offset, job["job_id"]))
        self.assertEqual(self.client(self.w).query(job["job_id"])["state"], "running")
        # ... and the command it gives picks up at that byte once a scheduler is back
        self.restart_scheduler()
        wait_until(lambda: fault_of(self.c.workers) is None and self.c.workers(),
                   message="the worker to register with the new scheduler")
        open(gate, "w").close()
        rest = self.cli("logs", "-f", "--offset", str(offset), job["job_id"], env=self.env)
        self.assertEqual(rest.returncode, 0, rest.stderr)
        self.assertEqual(seen + out + rest.stdout, gated_output(50, 10))

    def test_logs_follow_gives_up_with_255(self):
        job_id = self.c.start("", "sleep", "", {"args": ["300"]})
        self.addCleanup(lambda: fault_of(self.client(self.w).stop, job_id))
        proc = popen_jobsched(self, ["logs", "-f", "--reconnect", "0", job_id], env=self.env)
        self.kill_scheduler()
        out, err = proc.communicate(timeout=60)
        self.assertEqual((proc.returncode, out), (255, b""), err)
        self.assertTrue(err.decode().endswith(
            "jobsched: lost the scheduler; the job goes on: jobsched.py logs -f --offset 0 %s\n"
            % job_id), err)
        self.assertNotIn(b"retrying", err)  # --reconnect 0: no retry to announce

    def test_sigterm_and_sighup_stop_the_job(self):
        for signum in (signal.SIGTERM, signal.SIGHUP):
            with self.subTest(signal=signum):
                marker = uuid.uuid4().hex
                proc = popen_jobsched(self, ["run", "--", "sh", "-c", "echo started; exec sleep 300",
                                             marker], env=self.env)
                read_until(proc, b"started\n")
                (job,) = self.job_of(marker)
                proc.send_signal(signum)
                out, err = proc.communicate(timeout=30)
                self.assertEqual(proc.returncode, 128 + signum, err)
                self.assertEqual(self.c.query(job["job_id"])["state"], "stopped")
                self.assertIn(("jobsched: job %s stopped (signal: terminated)\n"
                               % job["job_id"]).encode(), err)
                self.assertNotIn(b"Traceback", err)

    def test_run_into_a_closed_pipe_stops_the_job_and_exits_141(self):
        marker = uuid.uuid4().hex
        status_file = os.path.join(self.tempdir(), "status")
        script = '{ "$@"; echo $? >"$STATUS"; } | head -n 2'
        done = subprocess.run(
            ["sh", "-c", script, "sh", sys.executable, JOBSCHED, "run", "--", "sh", "-c",
             'i=0; while :; do echo "line $i"; i=$((i + 1)); sleep 0.02; done', marker],
            env=dict(self.env, STATUS=status_file), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(done.stdout, b"line 0\nline 1\n")
        with open(status_file) as f:
            self.assertEqual(f.read().strip(), "141", done.stderr)
        (job,) = self.job_of(marker)
        self.assertEqual(job["state"], "stopped")
        self.assertNotIn(b"Traceback", done.stderr)
        self.assertNotIn(b"Exception ignored", done.stderr)
        self.assertIn(b"stopped (signal: terminated)", done.stderr)

    def test_logs_into_a_closed_pipe_exits_141_quietly(self):
        job_id = self.c.start("", sys.executable, "", py_args(
            "import sys; sys.stdout.write('x' * 3000000)"))
        self.wait_done(self.c, job_id)
        status_file = os.path.join(self.tempdir(), "status")
        done = subprocess.run(["sh", "-c", '{ "$@"; echo $? >"$STATUS"; } | head -c 10 >/dev/null',
                               "sh", sys.executable, JOBSCHED, "logs", job_id],
                              env=dict(self.env, STATUS=status_file), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(done.stderr, b"")
        with open(status_file) as f:
            self.assertEqual(f.read().strip(), "141")


class ClientMessagesTest(ClusterTestCase):
    """Each error a client command can meet says what happened and what to do, in one line."""

    def cli_error(self, *args, status=1, env=None):
        """Run the CLI; check its exit status and that stderr is one line; return that line."""
        done = self.cli(*args, env=env)
        err = done.stderr.decode()
        self.assertEqual(done.returncode, status, (args, err))
        self.assertEqual(len(err.strip().splitlines()), 1, (args, err))
        self.assertNotIn("Traceback", err)
        return err.strip()

    def test_offline_worker_named_with_its_address_and_last_sighting(self):
        scheduler, (w,), c = self.cluster(1)
        job_id = c.start("", "sleep", "", {"args": ["300"]})
        w.close()
        offline = r"worker %s \(%s, last seen \d+ s ago\) is offline$" % (w.worker_id,
                                                                        re.escape(w.address))
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        self.assertRegex(self.cli_error("start", "--worker", w.worker_id, "--", "true", env=env),
                         "^jobsched: error: " + offline)
        for command in ("query", "stop", "logs"):
            self.assertRegex(self.cli_error(command, job_id, env=env),
                             "^jobsched: error: job %s: %s" % (job_id, offline))

    def test_no_worker_online_and_no_free_slot(self):
        scheduler = self.scheduler()
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        self.assertEqual(self.cli_error("start", "--", "true", env=env),
                         "jobsched: error: no worker is online (0 registered, 0 online)")
        w = self.worker(scheduler, slots=1, heartbeat=30)
        c = self.client(scheduler)
        wait_until(lambda: c.workers(), message="the worker to register")
        c.start("", "sleep", "", {"args": ["300"]})
        self.assertEqual(self.cli_error("start", "--", "true", env=env),
                         "jobsched: error: no worker has a free slot (1 online, all 1 slots busy)")
        w.close()  # deregisters
        self.assertEqual(self.cli_error("start", "--", "true", env=env),
                         "jobsched: error: no worker is online (1 registered, 0 online)")

    def test_a_start_every_worker_refused_gives_the_last_reason(self):
        scheduler, (w,), c = self.cluster(1)
        os.rename(w.state_dir, w.state_dir + ".gone")
        self.addCleanup(os.rename, w.state_dir + ".gone", w.state_dir)
        message = self.cli_error("start", "--", "true", env=cli_env(JOBSCHED_SCHEDULER=scheduler.address))
        self.assertEqual(message, "jobsched: error: worker %s refused the job: cannot write job "
                                  "output in %s: No such file or directory" % (w.worker_id, w.state_dir))

    def test_a_worker_address_is_not_the_scheduler(self):
        w = self.worker(None)
        expected = "jobsched: error: %s is a jobsched worker, not the scheduler" % w.address
        for args in (["workers"], ["jobs"], ["query", str(uuid.uuid4())], ["run", "--", "true"],
                     ["start", "--", "true"]):
            self.assertEqual(self.cli_error(*args, env=cli_env(JOBSCHED_SCHEDULER=w.address)),
                             expected, args)
        self.assertEqual(self.client(w).jobs(), [])  # nothing was started on it

    def test_plain_http_to_a_tls_port_says_use_https(self):
        if shutil.which("openssl") is None:
            self.skipTest("the openssl command is not installed")
        a, _ = make_certificates(self.tempdir())
        files = {"tls_cert": os.path.join(a, "scheduler.pem"),
                 "tls_key": os.path.join(a, "scheduler.key")}
        for ca in (None, os.path.join(a, "ca.pem")):  # TLS, then mutual TLS
            scheduler = self.scheduler(tls_ca=ca, **files)
            address = scheduler.address
            self.assertEqual(self.cli_error("workers", "--scheduler", address),
                             "jobsched: error: %s speaks TLS: use https://%s or --tls-ca"
                             % (address, address))
            with self.assertRaises(jobsched.Unreachable) as caught:
                self.client(address).info()
            self.assertIn("speaks TLS", str(caught.exception))
        done = self.cli("workers", "--scheduler", "https://" + scheduler.address,
                        "--tls-ca", os.path.join(a, "ca.pem"),
                        "--tls-cert", os.path.join(a, "client.pem"),
                        "--tls-key", os.path.join(a, "client.key"))
        self.assertEqual(done.returncode, 0, done.stderr)

    def test_a_refused_token_names_the_token_file_option_and_variable(self):
        scheduler = self.scheduler(token=TOKEN)
        message = self.cli_error("workers", env=cli_env(JOBSCHED_SCHEDULER=scheduler.address,
                                                        JOBSCHED_TOKEN="wrong-token"))
        self.assertIn("HTTP 401", message)
        self.assertIn("--token-file", message)
        self.assertIn("JOBSCHED_TOKEN_FILE", message)
        self.assertNotIn("wrong-token", message)

    def test_a_worker_whose_token_is_refused_exits_2(self):
        scheduler = self.scheduler(token=TOKEN)
        proc = popen_jobsched(self, worker_args(scheduler.address, self.tempdir()),
                              env=cli_env(JOBSCHED_TOKEN="not-the-token"))
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 2, err)
        self.assertIn(b"listening on", out)
        last = err.decode().strip().splitlines()[-1]
        self.assertEqual(last, "jobsched: error: scheduler %s refused this worker's token (HTTP "
                               "401): give the cluster's token with --token-file FILE or "
                               "JOBSCHED_TOKEN_FILE" % scheduler.address)
        self.assertEqual(self.client(scheduler, token=TOKEN).workers(), [])

    def test_a_command_that_cannot_start_names_worker_and_host(self):
        scheduler, (w,), c = self.cluster(1)
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        where = "on worker %s (%s)" % (w.worker_id, socket.gethostname())
        message = self.cli_error("run", "--", "no-such-command x", env=env)
        self.assertTrue(message.startswith("jobsched: error: cannot start 'no-such-command x' %s: "
                                           "No such file or directory" % where), message)
        self.assertTrue(message.endswith(" (commands do not go through a shell: use sh -c '...')"),
                        message)
        message = self.cli_error("run", "--", "/no/such/command", env=env)
        self.assertIn("cannot start '/no/such/command' %s: No such file" % where, message)
        self.assertNotIn("sh -c", message)

    def test_bad_arguments_exit_2(self):
        scheduler, (w,), c = self.cluster(1)
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        cases = [(["start", "--timeout", "20000000", "--", "true"], "10000000"),
                 (["run", "--timeout", "0", "--", "true"], "--timeout"),
                 (["query", ""], "must not be empty"), (["stop", ""], "must not be empty"),
                 (["logs", "abc"], "at least 8 characters"),
                 (["jobs", "--scheduler", "127.0.0.1:70000"], "port out of range"),
                 (["workers", "--scheduler", "127.0.0.1:99999999999"], "port out of range"),
                 (["jobs", "--limit", "0"], "--limit"), (["run", "--reconnect", "-1", "--", "true"],
                                                         "--reconnect")]
        procs = [(args, words, popen_jobsched(self, args, env=env)) for args, words in cases]
        for args, words, proc in procs:
            _, err = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 2, (args, err))
            self.assertIn(words, err.decode(), args)
            self.assertNotIn(b"Traceback", err)
        self.assertEqual(c.jobs(), [])


class FindingJobsTest(ClusterTestCase):
    """Prefixes of ids, the filters of jobs, query's text form, workers' RUNNING, from_env()."""

    def test_job_and_worker_ids_by_unique_prefix(self):
        scheduler, (w,), c = self.cluster(1)
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        done = self.cli("start", "--worker", w.worker_id[:8], "--", "sh", "-c", "echo by-prefix",
                        env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        job_id = done.stdout.decode().strip()
        self.assertEqual(self.wait_done(c, job_id)["worker_id"], w.worker_id)
        for prefix in (job_id[:8], job_id[:13]):
            done = self.cli("logs", prefix, env=env)
            self.assertEqual((done.returncode, done.stdout), (0, b"by-prefix\n"), done.stderr)
            done = self.cli("query", "--json", prefix, env=env)
            self.assertEqual(json.loads(done.stdout.decode())["job_id"], job_id)
        done = self.cli("stop", job_id[:8], env=env)
        self.assertEqual(done.stdout.decode(), "%s had already ended: succeeded\n" % job_id)
        # two workers whose ids share their first 8 characters: a prefix must tell them apart
        for suffix in ("-one", "-two"):
            c.register("127.0.0.1:9", {"worker_id": "abcdefgh" + suffix})
        done = self.cli("start", "--worker", "abcdefgh", "--", "true", env=env)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("worker id prefix abcdefgh is ambiguous: it matches abcdefgh-one, "
                      "abcdefgh-two", done.stderr.decode())
        done = self.cli("start", "--worker", "abcd", "--", "true", env=env)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("at least 8 characters", done.stderr.decode())
        done = self.cli("query", "ffffffff-no", env=env)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("job not found", done.stderr.decode())

    def test_jobs_filters_started_column_and_offline_workers(self):
        scheduler, (w1, w2), c = self.cluster(2)
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        ok = c.start(w1.worker_id, "true", "")
        failed = c.start(w2.worker_id, "false", "")
        for job_id in (ok, failed):
            self.wait_done(c, job_id)
        running = c.start(w1.worker_id, "sleep", "", {"args": ["300"]})
        self.addCleanup(c.stop, running)

        def listed(*args):
            done = self.cli("jobs", *args, env=env)
            self.assertEqual(done.returncode, 0, done.stderr)
            return done
        table = listed().stdout.decode().splitlines()
        self.assertEqual(table[0].split(), ["JOB_ID", "WORKER_ID", "STATE", "EXIT", "STARTED",
                                            "COMMAND"])
        started = c.query(running)["started_at"]
        self.assertIn(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), table[-1])
        self.assertEqual([line.split()[0] for line in table[1:]], [ok, failed, running])

        def ids(*args):
            return [j["job_id"] for j in json.loads(listed("--json", *args).stdout.decode())["jobs"]]
        self.assertEqual(ids("--state", "failed", "--state", "running"), [failed, running])
        self.assertEqual(ids("--worker", w1.worker_id[:8]), [ok, running])
        self.assertEqual(ids("--limit", "2"), [failed, running])
        self.assertEqual(ids("--worker", w2.worker_id, "--state", "succeeded"), [])
        self.assertEqual(listed().stderr, b"")
        w2.close()
        done = listed("--json")
        self.assertEqual(done.stderr, b"jobsched: the jobs of 1 offline worker are not listed\n")
        self.assertEqual([j["job_id"] for j in json.loads(done.stdout.decode())["jobs"]],
                         [ok, running])
        self.assertEqual(listed("--worker", w1.worker_id).stderr, b"")

    def test_query_prints_json_values_and_local_times(self):
        scheduler, (w,), c = self.cluster(1)
        job_id = c.start("", "sh", "", sh_args("exit 0", "5"))
        job = self.wait_done(c, job_id)
        done = self.cli("query", job_id, env=cli_env(JOBSCHED_SCHEDULER=scheduler.address))
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.decode().splitlines()
        for line in ('args: ["-c", "exit 0", "sh", "5"]', "done: true", "error: false",
                     'error_text: ""', "exit_code: 0", "state: succeeded", "command: sh",
                     'path: ""'):
            self.assertIn(line, lines)
        for key in ("started_at", "finished_at"):
            local = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(job[key]))
            self.assertRegex(done.stdout.decode(), r"(?m)^%s: %s\.\d{3}[+-]\d\d:\d\d$"
                             % (key, re.escape(local)))
        done = self.cli("query", "--json", job_id, env=cli_env(JOBSCHED_SCHEDULER=scheduler.address))
        self.assertEqual(json.loads(done.stdout.decode())["started_at"], job["started_at"])

    def test_workers_running_counts_only_jobs_still_running(self):
        scheduler = self.scheduler()
        w = self.worker(scheduler, heartbeat=30)  # no regular heartbeat during the test
        c = self.client(scheduler)
        wait_until(lambda: c.workers(), message="the worker to register")
        job_id = c.start("", "sh", "", sh_args("exit 0"))
        self.wait_done(c, job_id)
        wait_until(lambda: c.workers()[0]["running"] == 0, timeout=5,
                   message="the scheduler to learn that the job ended")
        done = self.cli("workers", env=cli_env(JOBSCHED_SCHEDULER=scheduler.address))
        header, row = done.stdout.decode().splitlines()
        self.assertEqual(row.split()[header.split().index("RUNNING")], "0")

    def test_client_from_env(self):
        scheduler = self.scheduler(token=TOKEN)
        token_file = os.path.join(self.tempdir(), "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        os.chmod(token_file, 0o600)
        environment = example_env(JOBSCHED_SCHEDULER=scheduler.address,
                                  JOBSCHED_TOKEN_FILE=token_file, JOBSCHED_TOKEN="wrong")
        saved = dict(os.environ)
        self.addCleanup(lambda: (os.environ.clear(), os.environ.update(saved)))
        os.environ.clear()
        os.environ.update(environment)
        client = self.client_from_env()  # the file wins over JOBSCHED_TOKEN, as in the CLI
        self.assertEqual(client.info()["role"], "scheduler")
        self.assertEqual(client.timeout, 10.0)
        with self.assertRaises(jobsched.Unauthorized):
            self.client_from_env(token="wrong").info()  # a token given wins over the file
        self.assertEqual(self.client_from_env(timeout=3).timeout, 3)
        with self.assertRaises(TypeError):
            jobsched.Client.from_env(schedulr="x")
        with self.assertRaises(jobsched.ConfigError):
            jobsched.Client.from_env(token_file=os.path.join(self.tempdir(), "none"))
        del os.environ["JOBSCHED_SCHEDULER"]
        self.assertEqual(self.client_from_env().address, jobsched.DEFAULT_SCHEDULER)
        other = self.scheduler()
        self.assertEqual(self.client_from_env(address=other.address).workers(), [])

    def client_from_env(self, **overrides):
        client = jobsched.Client.from_env(**overrides)
        self.addCleanup(client.close)
        return client


class ExamplesFromEnvTest(CertificatesTestCase):
    """examples/client.py and examples/curl.sh read what the CLI reads, after the TLS
    walk-through: a token file, a CA, a client certificate."""

    def secured_cluster(self):
        """A mutual-TLS, token cluster; returns (scheduler, client, the CLI's environment)."""
        token_file = os.path.join(self.tempdir(), "token")
        with open(token_file, "w") as f:
            f.write(TOKEN)
        os.chmod(token_file, 0o600)

        def files(name):
            return {"tls_cert": os.path.join(self.a, name + ".pem"),
                    "tls_key": os.path.join(self.a, name + ".key"),
                    "tls_ca": os.path.join(self.a, "ca.pem"), "token": TOKEN}
        scheduler = self.scheduler(**files("scheduler"))
        self.worker(scheduler, **files("worker"))
        client = self.client(scheduler, **files("client"))
        wait_until(lambda: client.workers(), message="the worker to register")
        env = example_env(JOBSCHED_SCHEDULER="https://" + scheduler.address,
                          JOBSCHED_TOKEN_FILE=token_file,
                          JOBSCHED_TLS_CA=files("client")["tls_ca"],
                          JOBSCHED_TLS_CERT=files("client")["tls_cert"],
                          JOBSCHED_TLS_KEY=files("client")["tls_key"])
        return scheduler, client, env

    def test_example_client_reads_token_file_and_tls_from_env(self):
        _, _, env = self.secured_cluster()
        proc = run_example([sys.executable, os.path.join(HERE, "examples", "client.py")], env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr.decode(errors="replace"))
        self.assertIn("1\n2\n3\ndone\n", proc.stdout.decode())

    def test_example_curl_reads_token_file_and_tls_and_prints_replies_byte_for_byte(self):
        if shutil.which("curl") is None:
            self.skipTest("curl is not installed")
        _, client, env = self.secured_cluster()
        # A directory whose name JSON escapes (a backslash): `echo` would print it altered.
        examples = os.path.join(self.tempdir(), "ex\\n")
        os.mkdir(examples)
        for name in ("curl.sh", "count.sh"):
            shutil.copy(os.path.join(HERE, "examples", name), examples)
        proc = run_example(["sh", os.path.join(examples, "curl.sh")], env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr.decode(errors="replace"))
        out = proc.stdout.decode()
        self.assertIn('"path": %s' % json.dumps(os.path.join(examples, "count.sh")), out)
        self.assertIn('< 200 {"success": true}\n', out)
        self.assertNotIn(TOKEN, out)
        jobs = {j["command"]: j for j in client.jobs()}
        self.assertEqual((jobs["sh"]["state"], jobs["sleep"]["state"]), ("succeeded", "stopped"))


class IdempotentStartTest(ClusterTestCase):
    """A caller-made job_id: start is idempotent, concurrent starts of one id spawn one process."""

    def test_same_job_id_starts_once(self):
        worker = self.worker(None, slots=8)
        client = self.client(worker)
        job_id = str(uuid.uuid4())
        marker = os.path.join(self.tempdir(), "runs")
        options = {"job_id": job_id.upper(), "args": ["-c", "echo x >> %s; sleep 30" % marker]}
        answers, errors = [], []

        def start():
            try:
                answers.append(self.client(worker).start("sh", "", options))
            except Exception as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=start) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        self.addCleanup(client.stop, job_id)
        self.assertEqual(errors, [])
        self.assertEqual(answers, [job_id] * 6)  # canonical lower-case form
        self.assertEqual(client.start("sh", "", options), job_id)
        wait_until(lambda: os.path.exists(marker), message="the job to run")
        self.assertEqual([j["job_id"] for j in client.jobs()], [job_id])
        self.assertEqual(worker.info()["running"], 1)
        with open(marker) as f:
            self.assertEqual(f.read(), "x\n")
        client.stop(job_id)
        # an ended job is not started again either
        self.assertEqual(client.start("sh", "", options), job_id)
        self.assertEqual(client.query(job_id)["state"], "stopped")

    def test_start_on_the_command_line_names_its_job_when_the_answer_is_lost(self):
        class LosesAnswers(jobsched.Scheduler):
            def start(self, *args, **kwargs):
                job_id = super().start(*args, **kwargs)
                time.sleep(2.5)  # started; answered after the client gave up
                return job_id
        scheduler = self.scheduler(LosesAnswers)
        self.worker(scheduler)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        done = self.cli("start", "--scheduler", scheduler.address, "--rpc-timeout", "1", "--",
                        "true")
        self.assertEqual((done.returncode, done.stdout), (1, b""), done.stderr)
        said = re.fullmatch(r"jobsched: error: no answer from [^\n]*timed out; job ([-0-9a-f]{36}) "
                            r"may have started: see jobsched.py query \1, and stop it if it was\n",
                            done.stderr.decode())
        self.assertIsNotNone(said, done.stderr)
        self.assertEqual(self.wait_done(client, said.group(1))["state"], "succeeded")
        self.assertEqual([job["job_id"] for job in client.jobs()], [said.group(1)])

    def test_start_on_the_command_line_works_with_a_scheduler_that_names_every_job(self):
        class Older(jobsched.Scheduler):  # as 1.0 was: no job_id option
            def start(self, worker_id, command, path, options=None):
                if "job_id" in (options or {}):
                    raise jobsched.BadRequest("unknown option 'job_id' (known: args, env, cwd, "
                                              "timeout)")
                return super().start(worker_id, command, path, options)
        scheduler = self.scheduler(Older)
        self.worker(scheduler)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        done = self.cli("start", "--scheduler", scheduler.address, "--", "true")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.wait_done(client, done.stdout.decode().strip())["state"], "succeeded")
        self.assertEqual(len(client.jobs()), 1)

    def test_start_on_the_command_line_names_its_job_when_interrupted(self):
        arrived = threading.Event()
        class Slow(jobsched.Scheduler):
            def start(self, *args, **kwargs):
                arrived.set()
                time.sleep(1.0)  # the answer comes after Ctrl-C
                return super().start(*args, **kwargs)
        scheduler = self.scheduler(Slow)
        self.worker(scheduler)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        proc = popen_jobsched(self, ("start", "--scheduler", scheduler.address, "--", "true"),
                              env=cli_env())
        self.assertTrue(arrived.wait(30))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        said = re.fullmatch(r"jobsched: interrupted; job ([-0-9a-f]{36}) may have started: see "
                            r"jobsched.py query \1, and stop it if it was\n", err.decode())
        self.assertEqual((proc.returncode, out), (130, b""), err)
        self.assertIsNotNone(said, err)
        wait_until(lambda: client.jobs(), message="the start to go on")  # answered to no one
        self.assertEqual(self.wait_done(client, said.group(1))["state"], "succeeded")

    def test_job_id_must_be_a_uuid(self):
        worker = self.worker(None)
        client = self.client(worker)
        for bad in ("", "abc", "1234", 5):
            with self.assertRaises(jobsched.BadRequest) as caught:
                client.start("true", "", {"job_id": bad})
            self.assertIn("job_id", str(caught.exception))
        self.assertEqual(client.jobs(), [])

    def test_empty_array_is_an_empty_struct(self):
        worker = self.worker(None)
        client = self.client(worker)
        job_id = client.start("true", "", [])
        self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")
        job_id = client.start("true", "", {"env": []})
        self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")


class SpawnPathTests:
    """The same guarantees whichever way a job is spawned (subclasses set spawn_method)."""
    spawn_method = None

    def setUp(self):
        self.w = self.worker(None, spawn_method=self.spawn_method, slots=8)
        self.assertEqual(self.w.spawner.method, self.spawn_method)
        self.c = self.client(self.w)

    def run_job(self, command, options=None, path=""):
        job = self.wait_done(self.c, self.c.start(command, path, options or {}))
        return job, self.c.output(job["job_id"])["data"].decode()

    def test_session_stdin_output_env_cwd(self):
        cwd = os.path.realpath(self.tempdir())
        script = ('import os, sys; print(os.getsid(0) == os.getpid() == os.getpgid(0), '
                  'sys.stdin.read() == "", os.environ.get("SPAWN_T"), os.getcwd(), flush=True); '
                  'sys.stderr.write("err\\n")')
        job, out = self.run_job(sys.executable, dict(py_args("import subprocess, sys; sys.exit("
                                "subprocess.call([sys.executable, '-c', %r]))" % script),
                                env={"SPAWN_T": "v 1"}, cwd=cwd))
        self.assertEqual(job["state"], "succeeded", out)
        self.assertEqual(out, "False True v 1 %s\nerr\n" % cwd)  # the grandchild shares the session
        job, out = self.run_job(sys.executable, dict(py_args(script), cwd=cwd))
        self.assertEqual(out, "True True None %s\nerr\n" % cwd)

    def test_sigpipe_is_default_in_the_job(self):
        job, out = self.run_job("sh", sh_args("yes | head -1"))
        self.assertEqual((job["state"], out), ("succeeded", "y\n"))
        job, out = self.run_job("sh", sh_args("trap"))
        self.assertEqual(out, "")  # no signal ignored

    def test_no_worker_fd_reaches_the_job(self):
        job, out = self.run_job("sh", sh_args("ls /proc/$$/fd"))
        if not os.path.isdir("/proc/self/fd"):
            self.skipTest("no /proc")
        self.assertEqual(sorted(out.split()), ["0", "1", "2"])

    def test_exit_status_and_signal(self):
        job, _ = self.run_job("sh", sh_args("exit 7"))
        self.assertEqual((job["state"], job["exit_code"]), ("failed", 7))
        job, _ = self.run_job("sh", sh_args("kill -TERM $$"))
        self.assertEqual((job["state"], job["signal"]), ("failed", 15))

    def test_errors_as_before(self):
        for command, options, text in (
                ("jobsched-no-such-command", {}, "No such file or directory"),
                ("sh", dict(sh_args("true"), cwd="/nonexistent/jobsched-dir"),
                 "/nonexistent/jobsched-dir"), ("/etc/passwd", {}, "Permission denied")):
            with self.assertRaises(jobsched.BadRequest) as caught:
                self.c.start(command, "", options)
            self.assertIn(text, str(caught.exception))
            self.assertIn(command, str(caught.exception))
        self.assertEqual(self.c.jobs(), [])
        self.assertEqual(self.w.info()["running"], 0)

    def test_path_searched_in_the_jobs_env(self):
        bindir = self.tempdir()
        tool = os.path.join(bindir, "jobsched-spawn-tool")
        with open(tool, "w") as f:
            f.write("#!/bin/sh\necho tool \"$@\"\n")
        os.chmod(tool, 0o755)
        job, out = self.run_job("jobsched-spawn-tool", {"args": ["a"],
                                "env": {"PATH": bindir + os.pathsep + os.environ.get("PATH", "")}})
        self.assertEqual((job["state"], out), ("succeeded", "tool a\n"))

    def test_allow_runs_the_checked_file(self):
        worker = self.worker(None, spawn_method=self.spawn_method, allow=["echo"])
        client = self.client(worker)
        bindir = self.tempdir()
        fake = os.path.join(bindir, "echo")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho fake\n")
        os.chmod(fake, 0o755)
        cwd_job = client.start("echo", "", {"args": ["real"], "cwd": bindir})
        self.assertEqual(client.output(self.wait_done(client, cwd_job)["job_id"])["data"], b"real\n")


class PopenSpawnTest(SpawnPathTests, ClusterTestCase):
    spawn_method = "popen"


@unittest.skipUnless(jobsched.Spawner().method == "posix_spawn",
                     "posix_spawn through ctypes needs Linux with glibc 2.26 or newer")
class PosixSpawnTest(SpawnPathTests, ClusterTestCase):
    spawn_method = "posix_spawn"


# ---------------------------------------------------------------------------------------------
# Status page and metrics
# ---------------------------------------------------------------------------------------------

SCHEDULER_METRICS = {
    "jobsched_workers", "jobsched_worker_slots", "jobsched_worker_running", "jobsched_jobs_queued",
    "jobsched_jobs_started_total", "jobsched_jobs_finished_total", "jobsched_rpc_requests_total",
    "jobsched_rpc_duration_seconds", "process_resident_memory_bytes", "process_cpu_seconds_total",
    "process_open_fds", "process_start_time_seconds"}
WORKER_METRICS = {
    "jobsched_jobs_running", "jobsched_slots", "jobsched_jobs_started_total",
    "jobsched_jobs_finished_total", "jobsched_job_duration_seconds", "jobsched_output_bytes_total",
    "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
    "process_start_time_seconds"}
_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(r"(%s)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*=%s(?:,[a-zA-Z_][a-zA-Z0-9_]*=%s)*)?\})? "
                     r"(-?[0-9.e+-]+|[+-]Inf|NaN)\Z" % (_METRIC_NAME, _LABEL_VALUE, _LABEL_VALUE))
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)=("(?:[^"\\\n]|\\[\\"n])*")')


def parse_metrics(text):
    """Check text against the Prometheus text format 0.0.4 strictly; returns ({family: type},
    {(sample name, ((label, value), ...)): value}) with label values unescaped."""
    types, samples, family = {}, {}, None
    if not text.endswith("\n"):
        raise AssertionError("the exposition must end with a newline")
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            family = line.split(" ")[2]
            if family in types:
                raise AssertionError("family %s written twice" % family)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            if name != family or kind not in ("counter", "gauge", "histogram"):
                raise AssertionError("bad TYPE line %r" % line)
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            if match is None:
                raise AssertionError("not a sample line: %r" % line)
            name, labels = match.group(1), match.group(2) or ""
            suffixes = ("_bucket", "_sum", "_count") if types.get(family) == "histogram" else ("",)
            if name not in [family + suffix for suffix in suffixes]:
                raise AssertionError("sample %s outside its family %s" % (name, family))
            pairs = tuple((key, json.loads(value)) for key, value in _LABEL.findall(labels))
            if (name, pairs) in samples:
                raise AssertionError("sample written twice: %r" % line)
            samples[name, pairs] = float(match.group(3))
    for name, kind in types.items():
        if kind != "histogram":
            continue
        series = {}
        for (sample, pairs), value in samples.items():
            if sample == name + "_bucket":
                rest = tuple(p for p in pairs if p[0] != "le")
                series.setdefault(rest, []).append((float(dict(pairs)["le"]), value))
        for rest, buckets in series.items():
            counts = [value for _, value in sorted(buckets)]
            if counts != sorted(counts) or sorted(buckets)[-1][0] != float("inf"):
                raise AssertionError("%s%r: buckets not cumulative up to +Inf" % (name, rest))
            if samples[name + "_count", rest] != counts[-1]:
                raise AssertionError("%s%r: _count is not the +Inf bucket" % (name, rest))
    return types, samples


def scrape(address, token=None, path="/metrics", scheme="http", context=None):
    """(status, headers, body text) of GET path; the token goes as a Bearer token."""
    headers = {"Authorization": "Bearer " + token} if token else {}
    request = urllib.request.Request("%s://%s%s" % (scheme, address, path), headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=30) as reply:
            return reply.status, reply.headers, reply.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        try:
            return e.code, e.headers, e.read().decode("utf-8")
        finally:
            e.close()


def metric(samples, name, **labels):
    return samples.get((name, tuple(labels.items())))


class MetricsFormatTest(ClusterTestCase):
    """The text format, checked in Python (always runs): names, types, escaping, histograms."""

    def test_label_values_are_escaped(self):
        self.assertEqual(jobsched.escape_label('a"b\\c\nd'), 'a\\"b\\\\c\\nd')
        metrics = jobsched.Metrics()
        metrics.inc("jobsched_rpc_requests_total", ('we"ird\\\n', "0"))
        text = jobsched.metrics_text(metrics.samples()).decode()
        self.assertIn('jobsched_rpc_requests_total{method="we\\"ird\\\\\\n",code="0"} 1\n', text)
        _, samples = parse_metrics(text)
        self.assertEqual(metric(samples, "jobsched_rpc_requests_total", method='we"ird\\\n',
                                code="0"), 1)

    def test_histograms_are_cumulative_with_sum_and_count(self):
        metrics = jobsched.Metrics()
        for seconds in (0.0001, 0.0005, 0.003, 2.0, 100.0):
            metrics.observe_rpc("start", 0, seconds)
        metrics.observe_rpc("start", 3, 0.5)
        text = jobsched.metrics_text(metrics.samples()).decode()
        types, samples = parse_metrics(text)
        self.assertEqual(types["jobsched_rpc_duration_seconds"], "histogram")
        bucket = lambda le: metric(samples, "jobsched_rpc_duration_seconds_bucket",
                                   method="start", le=le)
        self.assertEqual([bucket("0.0005"), bucket("0.005"), bucket("0.5"), bucket("2.5"),
                          bucket("60.0"), bucket("+Inf")], [2, 3, 4, 5, 5, 6])
        self.assertEqual(metric(samples, "jobsched_rpc_duration_seconds_count", method="start"), 6)
        self.assertAlmostEqual(metric(samples, "jobsched_rpc_duration_seconds_sum",
                                      method="start"), 102.5036)
        self.assertEqual(metric(samples, "jobsched_rpc_requests_total", method="start", code="3"), 1)

    def test_each_job_is_counted_once_and_only_if_it_ended_since_the_start(self):
        metrics = jobsched.Metrics()
        metrics.inc_once("jobsched_jobs_finished_total", [("a", ("failed",)), ("b", ("failed",))])
        metrics.inc_once("jobsched_jobs_finished_total", [("a", ("failed",)), ("c", ("lost",))])
        _, samples = parse_metrics(jobsched.metrics_text(metrics.samples()).decode())
        self.assertEqual(metric(samples, "jobsched_jobs_finished_total", state="failed"), 2)
        self.assertEqual(metric(samples, "jobsched_jobs_finished_total", state="lost"), 1)

    def test_a_relayed_query_reply_tells_whether_and_how_the_job_ended(self):
        ended = {"job_id": "j", "state": "failed", "done": True, "finished_at": 1795816431.39,
                 "exit_code": 3}
        reply = jobsched.dumps_response(ended)
        relayed = jobsched._RelayedReply
        self.assertEqual(jobsched.job_end(relayed(reply), "j"), ("j", "failed", 1795816431.39))
        self.assertEqual(jobsched.job_end(ended, "j"), ("j", "failed", 1795816431.39))
        running = jobsched.dumps_response({"job_id": "j", "state": "running", "done": False})
        self.assertIsNone(jobsched.job_end(relayed(running), "j"))
        fault = xmlrpc.client.dumps(xmlrpc.client.Fault(1, "job not found: j")).encode()
        self.assertIsNone(jobsched.job_end(relayed(fault), "j"))
        self.assertEqual(jobsched.relayed_fault_code(fault), 1)
        self.assertEqual(jobsched.relayed_fault_code(reply), 0)

    def test_each_scrape_shows_the_workers_as_they_are_then(self):
        scheduler = self.scheduler()
        client = self.client(scheduler)
        scrape = lambda: parse_metrics(jobsched.scheduler_metrics(scheduler).decode())[1]
        client.register("127.0.0.1:9", {"worker_id": "w-1", "hostname": "h1", "slots": 2})
        for _ in range(2):  # the second is made from the first's text
            self.assertEqual(metric(scrape(), "jobsched_worker_slots", worker_id="w-1", host="h1"), 2)
        client.heartbeat("w-1", {"slots": 2, "running": 1})
        client.register("127.0.0.1:9", {"worker_id": "w-2", "hostname": "h2", "slots": 5})
        samples = scrape()
        self.assertEqual([metric(samples, "jobsched_worker_running", worker_id="w-1", host="h1"),
                          metric(samples, "jobsched_worker_slots", worker_id="w-2", host="h2"),
                          metric(samples, "jobsched_workers", state="online")], [1, 5, 2])
        client.heartbeat("w-1", {"slots": 3, "running": 0})
        samples = scrape()
        self.assertEqual([metric(samples, "jobsched_worker_slots", worker_id="w-1", host="h1"),
                          metric(samples, "jobsched_worker_running", worker_id="w-1", host="h1")],
                         [3, 0])

    def test_both_roles_write_exactly_the_documented_families(self):
        scheduler = self.scheduler()
        worker = self.worker(None)
        # A worker whose host name needs escaping, registered by hand.
        self.client(scheduler).register("127.0.0.1:9", {"worker_id": "w-1", "hostname": 'h"\\\n'})
        types, samples = parse_metrics(jobsched.scheduler_metrics(scheduler).decode())
        self.assertEqual(set(types), SCHEDULER_METRICS)
        self.assertEqual(metric(samples, "jobsched_worker_slots", worker_id="w-1", host='h"\\\n'), 1)
        self.assertEqual(metric(samples, "jobsched_workers", state="online"), 1)
        self.assertEqual(metric(samples, "jobsched_jobs_finished_total", state="succeeded"), 0)
        self.assertEqual(metric(samples, "jobsched_jobs_queued"), 0)
        types, samples = parse_metrics(jobsched.worker_metrics(worker).decode())
        self.assertEqual(set(types), WORKER_METRICS)
        self.assertEqual(metric(samples, "jobsched_slots"), 4)
        self.assertEqual(types["jobsched_job_duration_seconds"], "histogram")
        self.assertGreater(metric(samples, "process_resident_memory_bytes"), 1000000)
        self.assertGreater(metric(samples, "process_open_fds"), 2)
        self.assertLess(abs(metric(samples, "process_start_time_seconds") - time.time()), 3600)
        # queued jobs: pinned to w-1, offline once deregistered, they wait
        self.client(scheduler).deregister("w-1")
        self.client(scheduler).submit([{"command": "true", "worker_id": "w-1", "array": 3}])
        types, samples = parse_metrics(jobsched.scheduler_metrics(scheduler).decode())
        self.assertEqual(metric(samples, "jobsched_jobs_queued"), 3)

    def test_open_fds_counts_each_descriptor_open(self):
        gc.collect()  # sockets of earlier tests in reference cycles: closed now, not midway
        # Threads that earlier tests left behind may open and close descriptors meanwhile:
        # each count is compared with a listing made at a quiet moment.
        if not os.path.isdir("/proc/self/fd"):  # macOS: /dev/fd is listed
            before = jobsched._open_fds()
            opened = [socket.socket() for _ in range(40)]
            self.addCleanup(lambda: [sock.close() for sock in opened])
            self.assertEqual(jobsched._open_fds(), before + 40)
            return

        def agrees():  # as a listing counts them, less its own
            count = jobsched._open_fds()
            listed = os.listdir("/proc/self/fd")
            return count == len(listed) - 1 == jobsched._open_fds() and set(listed)
        wait_until(agrees, message="the count to agree with a listing")
        opened = [socket.socket() for _ in range(40)]
        try:
            listed = wait_until(agrees, message="the count to agree with a listing")
            self.assertLessEqual({str(sock.fileno()) for sock in opened}, listed)
            for sock in opened[::2]:  # holes in the table are not counted
                sock.close()
            listed = wait_until(agrees, message="the count to agree with a listing")
            self.assertFalse({str(sock.fileno()) for sock in opened[1::2]} - listed)
        finally:
            for sock in opened:
                sock.close()

    def test_utf8_tails(self):
        for data, tail in ((b"abc", 0), (b"ab\xc3", 1), (b"ab\xc3\xa9", 0), (b"\xe2\x82", 2),
                           (b"\xe2\x82\xac", 0), (b"x\xf0\x9f\x98", 3), (b"\xf0\x9f\x98\x80", 0),
                           (b"", 0), (b"\xff", 0)):
            self.assertEqual(jobsched._incomplete_utf8_tail(data), tail, data)


def fetch(address, path, method="GET", headers=None, body=None):
    """(status, headers, body bytes) of one request, redirects not followed."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, reply.headers, reply.read()
    finally:
        connection.close()


def basic_auth(token):
    return "Basic " + base64.b64encode(("anyone:" + token).encode()).decode()


class MetricsTest(ClusterTestCase):
    """GET /metrics on live roles: what is counted, authentication, promtool."""

    def test_counts_of_a_live_cluster_behind_a_token(self):
        scheduler = self.scheduler(token=TOKEN)
        worker = self.worker(scheduler, token=TOKEN)
        client = self.client(scheduler, token=TOKEN)
        wait_until(lambda: any(w["online"] for w in client.workers()), message="worker to register")
        ok = client.start("", "sh", "", sh_args("printf hello"))
        failed = client.start("", "sh", "", sh_args("printf ab; exit 3"))
        running = client.start("", "sh", "", sh_args("printf 1234; exec sleep 30"))
        self.addCleanup(fault_of, client.stop, running)
        self.wait_done(client, ok)
        self.wait_done(client, failed)
        wait_until(lambda: client.query(running)["output_bytes"] == 4, message="running job's output")
        for job_id in (ok, failed, ok):  # the scheduler counts what it sees end, once per job
            client.query(job_id)
        client.jobs()
        self.assertIsInstance(fault_of(client.query, str(uuid.uuid4())), jobsched.NotFound)

        for address in (scheduler.address, worker.address):
            status, headers, _ = scrape(address)
            self.assertEqual(status, 401)
            self.assertEqual(headers["WWW-Authenticate"], 'Basic realm="jobsched"')
        status, headers, text = scrape(worker.address, TOKEN)
        self.assertEqual((status, headers["Content-Type"]),
                         (200, "text/plain; version=0.0.4; charset=utf-8"))
        _, samples = parse_metrics(text)
        self.assertEqual(metric(samples, "jobsched_jobs_started_total"), 3)
        self.assertEqual(metric(samples, "jobsched_jobs_running"), 1)
        self.assertEqual(metric(samples, "jobsched_slots"), 4)
        self.assertEqual(metric(samples, "jobsched_jobs_finished_total", state="succeeded"), 1)
        self.assertEqual(metric(samples, "jobsched_jobs_finished_total", state="failed"), 1)
        self.assertEqual(metric(samples, "jobsched_job_duration_seconds_count"), 2)
        self.assertEqual(metric(samples, "jobsched_output_bytes_total"), 5 + 2 + 4)

        status, _, text = fetch_text(scheduler.address, "/metrics", basic_auth(TOKEN))
        self.assertEqual(status, 200)
        _, samples = parse_metrics(text)
        self.assertEqual(metric(samples, "jobsched_jobs_started_total"), 3)
        self.assertEqual(metric(samples, "jobsched_jobs_finished_total", state="succeeded"), 1)
        self.assertEqual(metric(samples, "jobsched_jobs_finished_total", state="failed"), 1)
        self.assertEqual(metric(samples, "jobsched_workers", state="online"), 1)
        self.assertEqual(metric(samples, "jobsched_workers", state="offline"), 0)
        labels = {"worker_id": worker.worker_id, "host": socket.gethostname()}
        self.assertEqual(metric(samples, "jobsched_worker_slots", **labels), 4)
        self.assertEqual(metric(samples, "jobsched_rpc_requests_total", method="start", code="0"), 3)
        self.assertEqual(metric(samples, "jobsched_rpc_requests_total", method="query", code="1"), 1)
        self.assertGreaterEqual(metric(samples, "jobsched_rpc_requests_total", method="query",
                                       code="0"), 4)
        self.assertEqual(metric(samples, "jobsched_rpc_duration_seconds_count", method="start"), 3)

        client.stop(running)
        _, samples = parse_metrics(scrape(worker.address, TOKEN)[2])
        self.assertEqual(metric(samples, "jobsched_jobs_finished_total", state="stopped"), 1)
        self.assertEqual(metric(samples, "jobsched_output_bytes_total"), 11)  # no byte twice
        self.assertEqual(metric(samples, "jobsched_jobs_running"), 0)

    def test_promtool_accepts_both_roles(self):
        promtool = shutil.which("promtool")
        if promtool is None:
            self.skipTest("promtool is not installed (Debian package prometheus)")
        scheduler, (worker,), client = self.cluster(1)
        self.wait_done(client, client.start("", "sh", "", sh_args("echo hi; exit 1")))
        client.jobs()
        for address in (scheduler.address, worker.address):
            text = scrape(address)[2]
            check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
            self.assertEqual(check.returncode, 0, check.stdout.decode())
            self.assertEqual(check.stdout.strip(), b"", "promtool's lint: %s" % check.stdout)


def fetch_text(address, path, authorization=None, accept="text/html"):
    headers = {"Accept": accept}
    if authorization:
        headers["Authorization"] = authorization
    status, headers, body = fetch(address, path, headers=headers)
    return status, headers, body.decode("utf-8")


def inline(page, tag):
    """The text of the page's one inline <tag> element (style or script)."""
    found = re.findall(r"<%s>(.*?)</%s>" % (tag, tag), page, re.S)
    if len(found) != 1:
        raise AssertionError("%d inline <%s> elements" % (len(found), tag))
    return found[0]


def csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


class StatusPageTest(ClusterTestCase):
    """The pages as HTTP sees them: headers, escaping, content negotiation, output, Stop."""

    def test_status_page_lists_workers_and_jobs_escaped_with_failures_marked(self):
        scheduler, (worker,), client = self.cluster(1)
        ok = client.start("", "true", "")
        failed = client.start("", "sh", "", sh_args("exit 3", "<b>bold</b>"))
        running = client.start("", "sleep", "", {"args": ["30"]})
        self.addCleanup(fault_of, client.stop, running)
        self.wait_done(client, ok)
        self.wait_done(client, failed)
        wait_until(lambda: scheduler.queue.knows(ok) and scheduler.queue.knows(failed),
                   message="the scheduler to learn of the ends")
        wait_until(lambda: client.workers()[0]["running"] == 1, message="a heartbeat")
        status, headers, page = fetch_text(scheduler.address, "/")
        self.assertEqual((status, headers["Content-Type"]), (200, "text/html; charset=utf-8"))
        self.assertEqual(headers["X-Frame-Options"], "DENY")
        policy = headers["Content-Security-Policy"]
        self.assertIn("default-src 'none'", policy)
        self.assertIn("script-src %s;" % csp_hash(inline(page, "script")), policy)
        self.assertIn("style-src %s;" % csp_hash(inline(page, "style")), policy)
        self.assertNotIn("unsafe-inline", policy)
        self.assertIn('<meta name="viewport"', page)
        self.assertIn('<noscript><meta http-equiv="refresh" content="2"></noscript>', page)
        self.assertIn('title="%s"' % worker.worker_id, page)
        self.assertIn(worker.address, page)
        self.assertIn("1/4", page)  # slots used/total
        self.assertIn("&lt;b&gt;bold&lt;/b&gt;", page)
        self.assertNotIn("<b>bold", page)
        rows = re.findall(r'<tr( class="bad")?><td><a href="/jobs/([0-9a-f-]+)"', page)
        self.assertEqual(sorted(rows), sorted([("", ok), (' class="bad"', failed), ("", running)]))
        self.assertIn("<h2>Running (1)</h2>", page)
        self.assertIn("<h2>Finished (the latest 2 of 2)</h2>", page)
        self.assertIn("<h2>Queue (0)</h2>", page)

    def test_job_route_answers_html_or_the_json_struct(self):
        scheduler, _, client = self.cluster(1)
        job_id = client.start("", "echo", "", {"args": ["hi"]})
        self.wait_done(client, job_id)
        status, headers, body = fetch_text(scheduler.address, "/jobs/" + job_id,
                                           accept="application/json")
        self.assertEqual((status, headers["Content-Type"]), (200, "application/json"))
        self.assertEqual(json.loads(body), client.query(job_id))
        status, headers, page = fetch_text(scheduler.address, "/jobs/" + job_id)
        self.assertEqual((status, headers["Content-Type"]), (200, "text/html; charset=utf-8"))
        self.assertIn("<h1>Job %s" % job_id, page)
        self.assertIn('<pre id="output">hi\n</pre>', page)  # ended: nothing to follow
        self.assertIn("Content-Security-Policy", headers)
        self.assertEqual(http_call(scheduler.address, "GET", "/jobs")[1]["jobs"][0]["job_id"], job_id)
        missing = str(uuid.uuid4())
        status, _, body = fetch_text(scheduler.address, "/jobs/" + missing, accept="*/*")
        self.assertEqual((status, json.loads(body)), (404, {"error": "job not found: '%s'" % missing}))
        status, _, page = fetch_text(scheduler.address, "/jobs/" + missing)
        self.assertEqual(status, 404)
        self.assertIn("job not found", page)
        self.assertEqual(fetch_text(scheduler.address, "/jobs/%s/nothing" % job_id)[0], 404)

    def test_output_is_escaped_and_invalid_utf8_shows_replacement_characters(self):
        scheduler, _, client = self.cluster(1)
        job_id = client.start("", "sh", "", sh_args(
            r"printf '<script>alert(1)</script>\n\377\376end \342\202'; exec sleep 30"))
        self.addCleanup(fault_of, client.stop, job_id)
        wait_until(lambda: client.query(job_id)["output_bytes"] == 34, message="the output")
        page = fetch_text(scheduler.address, "/jobs/" + job_id)[2]
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;\n\ufffd\ufffdend </pre>", page)
        self.assertNotIn("<script>alert", page)
        # running: the page follows from before the incomplete character at the end
        self.assertIn('data-follow="/jobs/%s/output" data-offset="32"' % job_id, page)
        self.assertIn('<form method="post" action="/jobs/%s/stop">' % job_id, page)

    def test_a_big_output_shows_its_last_mib_with_a_note(self):
        scheduler, _, client = self.cluster(1)
        job_id = client.start("", sys.executable, "", py_args(
            "import sys; sys.stdout.write('FIRST' + '\\u20ac' * 600000 + 'LAST!')"))
        job = self.wait_done(client, job_id)
        self.assertEqual(job["output_bytes"], 1800010)
        page = fetch_text(scheduler.address, "/jobs/" + job_id)[2]
        self.assertIn("The output is 1800010 bytes; this is its last MiB.", page)
        shown = re.search(r'<pre id="output">(.*)</pre>', page, re.S).group(1)
        self.assertEqual(shown, "\u20ac" * ((1048576 - 5) // 3) + "LAST!")  # no half character

    def test_output_route_reads_from_an_offset(self):
        scheduler, _, client = self.cluster(1)
        job_id = client.start("", "printf", "", {"args": ["abcdef"]})
        self.wait_done(client, job_id)
        status, headers, body = fetch(scheduler.address, "/jobs/%s/output?offset=2" % job_id)
        self.assertEqual((status, body), (200, b"cdef"))
        self.assertEqual((headers["X-Jobsched-Offset"], headers["X-Jobsched-Eof"]), ("6", "1"))
        self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
        status, _, body = fetch(scheduler.address, "/jobs/%s/output?offset=x" % job_id)
        self.assertEqual(status, 400)

    def test_pages_need_the_token_and_stop_is_a_same_site_post(self):
        scheduler = self.scheduler(token=TOKEN)
        self.worker(scheduler, token=TOKEN)
        client = self.client(scheduler, token=TOKEN)
        wait_until(lambda: any(w["online"] for w in client.workers()), message="worker to register")
        job_id = client.start("", "sleep", "", {"args": ["30"]})
        self.addCleanup(fault_of, client.stop, job_id)
        for path in ("/", "/jobs/" + job_id, "/jobs/%s/output" % job_id):
            status, headers, _ = fetch(scheduler.address, path, headers={"Accept": "text/html"})
            self.assertEqual((status, headers["WWW-Authenticate"]), (401, 'Basic realm="jobsched"'))
        auth = basic_auth(TOKEN)
        self.assertEqual(fetch_text(scheduler.address, "/", auth)[0], 200)
        stop = "/jobs/%s/stop" % job_id
        self.assertEqual(fetch(scheduler.address, stop, "POST", body=b"")[0], 401)
        self.assertEqual(fetch(scheduler.address, stop, "GET", {"Authorization": auth})[0], 404)
        for foreign in ({"Origin": "http://attacker.example"}, {"Sec-Fetch-Site": "cross-site"}):
            headers = dict(foreign, Authorization=auth, Accept="text/html")
            status, _, page = fetch(scheduler.address, stop, "POST", headers, body=b"")
            self.assertEqual(status, 403, foreign)
            self.assertIn(b"another site", page)
        self.assertEqual(client.query(job_id)["state"], "running")
        headers = {"Authorization": auth, "Accept": "text/html", "Sec-Fetch-Site": "same-origin",
                   "Origin": "http://" + scheduler.address,
                   "Content-Type": "application/x-www-form-urlencoded"}
        status, reply_headers, _ = fetch(scheduler.address, stop, "POST", headers, body=b"")
        self.assertEqual((status, reply_headers["Location"]), (303, "/jobs/" + job_id))
        self.assertEqual(client.query(job_id)["state"], "stopped")
        status, _, body = fetch(scheduler.address, stop, "POST", {"Authorization": auth}, b"")
        self.assertEqual((status, json.loads(body.decode())), (200, {"success": True}))


class StatusCommandTest(ClusterTestCase):
    """`jobsched.py status`: one screen, --json, --watch."""

    def test_one_screen_and_json(self):
        scheduler, workers, client = self.cluster(2)
        ended = [self.wait_done(client, client.start("", *argv))["job_id"] for argv in (
            ("true", ""), ("false", ""), ("sh", "", sh_args("exit 2")))]
        running = client.start("", "sleep", "", {"args": ["30"]})
        self.addCleanup(fault_of, client.stop, running)
        # A worker's end report, processed after a heartbeat that counted the end, would take
        # one off the running count again: wait for the reports first.
        wait_until(lambda: all(scheduler.queue.knows(j) for j in ended),
                   message="the scheduler to learn of the ends")
        wait_until(lambda: sum(w["running"] for w in client.workers()) == 1,
                   message="heartbeats to report the running job")
        proc = self.cli("status", "--scheduler", scheduler.address)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = proc.stdout.decode().splitlines()
        self.assertEqual(lines[0], "workers 2/2 online   slots 1/8 busy   jobs 0 queued, 1 running"
                                   "   last hour 1 succeeded, 2 failed")
        self.assertEqual(lines[2].split(), ["WORKER_ID", "ADDRESS", "ONLINE", "SLOTS", "HOSTNAME",
                                            "LAST", "SEEN"])
        self.assertEqual(sorted(line.split()[0] for line in lines[3:]),
                         sorted(w.worker_id for w in workers))
        proc = self.cli("status", "--json", "--scheduler", scheduler.address)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        status = json.loads(proc.stdout.decode())
        self.assertEqual({k: v for k, v in status.items() if k != "workers"}, {
            "workers_online": 2, "workers_total": 2, "slots_busy": 1, "slots_total": 8,
            "jobs_queued": 0, "jobs_running": 1, "succeeded_last_hour": 1, "failed_last_hour": 2,
            "stopped_last_hour": 0})
        self.assertEqual(sorted(w["worker_id"] for w in status["workers"]),
                         sorted(w.worker_id for w in workers))

    def test_watch_draws_until_ctrl_c(self):
        scheduler, _, _ = self.cluster(1)
        proc = popen_jobsched(self, ["status", "--watch", "--scheduler", scheduler.address])
        read_until(proc, b"\033[H\033[2Jworkers 1/1 online")  # clear the screen, then draw
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(timeout=10), 0)
        self.assertNotIn(b"Traceback", proc.stderr.read())

    def test_an_unreachable_scheduler_is_one_line(self):
        proc = self.cli("status", "--scheduler", "127.0.0.1:%d" % free_port())
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stderr.decode(), r"\Ajobsched: error: cannot reach [^\n]*\n\Z")


def chromium_binary():
    return shutil.which("chromium") or shutil.which("chromium-browser")


class HeadlessChromium:
    """A headless Chromium driven over the DevTools protocol on a pipe (JSON messages ended by
    NUL on its fds 3 and 4: no WebSocket needed). close() ends it and removes its profile."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="jobsched-chromium-")
        commands_in, self._commands = os.pipe()
        self._replies, replies_out = os.pipe()
        self.proc = subprocess.Popen(
            ["sh", "-c", 'exec "$0" "$@" 3<&%d 4>&%d' % (commands_in, replies_out),
             chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
             "--hide-scrollbars", "--no-first-run", "--remote-debugging-pipe",
             "--user-data-dir=" + self.profile, "about:blank"],
            pass_fds=(commands_in, replies_out), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_in)
        os.close(replies_out)
        self._changed = threading.Condition()
        self._answers, self.events, self._last_id = {}, [], 0  # guarded by self._changed
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        pending = b""
        while True:
            data = os.read(self._replies, 65536)
            if not data:
                break
            messages = (pending + data).split(b"\0")
            pending = messages.pop()
            with self._changed:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                self._changed.notify_all()
        os.close(self._replies)

    def send(self, method, session=None, timeout=30.0, **params):
        with self._changed:
            self._last_id += 1
            message_id = self._last_id
        message = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._changed:
            while message_id not in self._answers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("Chromium did not answer %s" % method)
                self._changed.wait(remaining)
            answer = self._answers.pop(message_id)
        if "error" in answer:
            raise AssertionError("%s: %s" % (method, answer["error"]))
        return answer["result"]

    def open(self, url, width=1200, height=800):
        """A new tab showing url; returns its session id."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", session, url=url)
        return session

    def evaluate(self, session, expression):
        """The value of a JavaScript expression in the tab (None while a page is loading)."""
        result = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)
        return None if "exceptionDetails" in result else result["result"].get("value")

    def dialogs(self):
        with self._changed:
            return [e for e in self.events if e["method"] == "Page.javascriptDialogOpening"]

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(timeout=15)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=15)
        os.close(self._commands)
        self._reader.join(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


class BrowserTest(ClusterTestCase):
    """The pages in a real browser (headless Chromium): what renders, live output, no script
    from a job ever runs, the Stop button; a screenshot, written to $JOBSCHED_SCREENSHOT if set
    (how examples/status.png is made)."""

    @classmethod
    def setUpClass(cls):
        if chromium_binary() is None:
            raise unittest.SkipTest("no Chromium (Debian package chromium); .ci/run installs it")
        cls.browser = HeadlessChromium()

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()

    def text_of(self, session, selector):
        return self.browser.evaluate(
            session, "(document.querySelector(%s) || {}).textContent || ''" % json.dumps(selector))

    def test_status_page_refreshes_itself_and_keeps_the_scroll_position(self):
        scheduler = self.scheduler(token=TOKEN)
        worker = self.worker(scheduler, token=TOKEN)
        client = self.client(scheduler, token=TOKEN)
        wait_until(lambda: any(w["online"] for w in client.workers()), message="worker to register")
        ids = [client.start("", "true", "") for _ in range(12)]
        failed = client.start("", "sh", "", sh_args("exit 4", "<script>alert(3)</script>"))
        for job_id in ids + [failed]:
            self.wait_done(client, job_id)
        session = self.browser.open("http://jobsched:%s@%s/" % (TOKEN, scheduler.address),
                                    width=800, height=300)
        wait_until(lambda: "Finished" in self.text_of(session, "main"), message="the page")
        main = self.text_of(session, "main")
        self.assertIn("workers 1/1 online", main)
        self.assertIn(worker.address, main)
        self.assertIn(worker.worker_id[:8], main)
        self.assertIn("<script>alert(3)</script>", main)  # the command, as text
        bad = self.browser.evaluate(session, "Array.prototype.map.call(document.querySelectorAll("
                                             "'tr.bad a'), function (a) { return a.title; })")
        self.assertEqual(bad, [failed])
        self.browser.evaluate(session, "window.scrollTo(0, 250)")
        self.assertEqual(self.browser.evaluate(session, "window.scrollY"), 250)
        late = client.start("", "sleep", "", {"args": ["30"]})
        self.addCleanup(fault_of, client.stop, late)
        wait_until(lambda: late[:8] in self.text_of(session, "main"), timeout=15,
                   message="the page to show a job started after it loaded")
        self.assertEqual(self.browser.evaluate(session, "window.scrollY"), 250)
        self.assertIn("running", self.browser.evaluate(session, "document.title"))
        self.assertEqual(self.browser.dialogs(), [])

    def test_job_page_streams_output_shows_markup_as_text_and_stops_the_job(self):
        scheduler = self.scheduler(token=TOKEN)
        self.worker(scheduler, token=TOKEN)
        client = self.client(scheduler, token=TOKEN)
        wait_until(lambda: any(w["online"] for w in client.workers()), message="worker to register")
        flag = os.path.join(self.tempdir(), "flag")
        job_id = client.start("", "sh", "", sh_args(
            "printf '<script>alert(1)</script>\\n<img src=x onerror=alert(2)>\\n'; "
            'while [ ! -e "$1" ]; do sleep 0.05; done; echo LATE-MARKER; exec sleep 60', flag))
        self.addCleanup(fault_of, client.stop, job_id)
        session = self.browser.open("http://jobsched:%s@%s/jobs/%s" % (TOKEN, scheduler.address, job_id))
        wait_until(lambda: "<img src=x" in self.text_of(session, "#output"), message="the output")
        with open(flag, "w"):
            pass
        wait_until(lambda: "LATE-MARKER" in self.text_of(session, "#output"), timeout=5,
                   message="output written after the page loaded")
        self.assertEqual(client.query(job_id)["state"], "running")  # it came live, not on reload
        self.assertEqual(self.text_of(session, "#output"),
                         "<script>alert(1)</script>\n<img src=x onerror=alert(2)>\nLATE-MARKER\n")
        self.assertEqual(self.browser.evaluate(session, "document.querySelectorAll('#output *, "
                                                        "img').length"), 0)
        self.assertEqual(self.browser.dialogs(), [])
        self.browser.evaluate(session, "document.querySelector('form button').click()")
        wait_until(lambda: client.query(job_id)["state"] == "stopped", message="the job to stop")
        wait_until(lambda: self.text_of(session, "h1").endswith("stopped"),
                   message="the page to show the stopped job")
        self.assertIsNone(self.browser.evaluate(session, "document.querySelector('form')"))
        self.assertEqual(self.browser.dialogs(), [])

    def test_screenshot_of_a_live_cluster(self):
        scheduler, workers, client = self.cluster(3, slots=3)
        scripts = self.tempdir()
        for name, body in (("build.sh", "sleep 0.4"), ("backup.sh", "sleep 0.2; exit 3"),
                           ("report.sh", "sleep 0.3"), ("deploy.sh", "sleep 0.6"),
                           ("ingest.sh", "exec sleep 30"), ("render.sh", "exec sleep 30")):
            with open(os.path.join(scripts, name), "w") as f:
                f.write(body + "\n")
        finished = [client.start(workers[i % 3].worker_id, "sh", name, {"args": args, "cwd": scripts})
                    for i, (name, args) in enumerate([
                        ("build.sh", ["--target", "test"]), ("backup.sh", ["/srv/data"]),
                        ("report.sh", ["--daily"]), ("deploy.sh", ["staging"])])]
        for name, args in (("ingest.sh", ["--follow", "/var/log/app"]), ("render.sh", ["scene-12"])):
            job_id = client.start("", "sh", name, {"args": args, "cwd": scripts})
            self.addCleanup(fault_of, client.stop, job_id)
        stopped = client.start("", "sleep", "", {"args": ["600"]})
        client.stop(stopped)
        for job_id in finished:
            self.wait_done(client, job_id)
        wait_until(lambda: sum(w["running"] for w in client.workers()) == 2, message="heartbeats")
        session = self.browser.open("http://%s/" % scheduler.address, width=1100, height=660)
        wait_until(lambda: "Finished" in self.text_of(session, "main"), message="the page")
        shot = self.browser.send("Page.captureScreenshot", session, format="png")
        png = base64.b64decode(shot["data"])
        self.assertTrue(png.startswith(b"\x89PNG\r\n\x1a\n"))
        if os.environ.get("JOBSCHED_SCREENSHOT"):
            with open(os.environ["JOBSCHED_SCREENSHOT"], "wb") as f:
                f.write(png)


def proc_environ(pid):
    """The environment of a process as a list of b"NAME=VALUE" (empty if gone or unreadable)."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def marked_processes(worker_id):
    """Live processes whose environment marks them as jobs of worker_id (Linux: /proc)."""
    marker = ("JOBSCHED_WORKER_ID=%s" % worker_id).encode()
    return [int(name) for name in os.listdir("/proc")
            if name.isdigit() and marker in proc_environ(int(name)) and pid_alive(int(name))]


def kill_marked(worker_id):
    """Cleanup: SIGKILL whatever a failed test left of a worker's jobs."""
    for pid in marked_processes(worker_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def child_processes(parent):
    """[(pid, start token)] of parent's children (Linux: /proc)."""
    children = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                ppid = int(f.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == parent:
            children.append((int(name), jobsched.process_start_time(int(name))))
    return children


class WorkerHardeningTest(ClusterTestCase):
    """No job process outlives a crash unsupervised, no job is forgotten, nothing is left behind,
    stop never races a job's own exit, jobs get no credential."""

    @unittest.skipUnless(os.path.isdir("/proc"), "scans /proc")
    def test_a_job_process_that_execs_late_after_a_crash_is_found_and_killed(self):
        # A child the dead worker was spawning shows its marks only once it has exec'd: the
        # restarted worker looks again while a started job has no process found.
        state_dir = self.tempdir()
        proc, address = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", "",
                                   "--state-dir", state_dir)
        worker_id = self.client(address).info()["worker_id"]
        self.addCleanup(kill_marked, worker_id)
        job_id = self.client(address).start("sleep", "", {"args": ["300"]})
        proc.kill()
        proc.wait(timeout=10)
        kill_marked(worker_id)  # the job's process is gone: as if it had not exec'd yet
        wait_until(lambda: not jobsched.find_job_processes(worker_id), message="no marked process")
        late = subprocess.Popen(["sh", "-c", 'sleep 0.2; exec env %s=%s %s=%s sleep 30' % (
            jobsched.WORKER_ID_VARIABLE, worker_id, jobsched.JOB_ID_VARIABLE, job_id)],
            start_new_session=True)
        self.addCleanup(lambda: late.poll() is None and late.kill())
        restarted = self.client(self.worker(None, state_dir=state_dir))
        self.assertEqual(late.wait(timeout=10), -signal.SIGKILL)
        self.assertEqual(restarted.query(job_id)["state"], "lost")

    def test_worker_killed_while_starting_jobs_leaves_no_job_process(self):
        state_dir = self.tempdir()
        proc, address = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", "",
                                   "--state-dir", state_dir, "--slots", "500")
        worker_id = self.client(address).info()["worker_id"]
        self.addCleanup(kill_marked, worker_id)
        started, stopping = [], threading.Event()

        def start_jobs():
            client = jobsched.Client(address, timeout=5)
            try:
                while not stopping.is_set():
                    started.append(client.start("sleep", "", {"args": ["300"]}))
            except jobsched.JobschedError:
                pass  # the worker was killed
            finally:
                client.close()
        threads = [threading.Thread(target=start_jobs) for _ in range(4)]
        for thread in threads:
            thread.start()
        self.addCleanup(lambda: [thread.join(10) for thread in threads])
        self.addCleanup(stopping.set)
        wait_until(lambda: len(started) >= 12, message="jobs to start")
        # Frozen mid-start, the worker's children are every process it has spawned.
        proc.send_signal(signal.SIGSTOP)
        children = child_processes(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        stopping.set()
        for pid, start_time in children:
            self.addCleanup(kill_if_same, pid, start_time)
        self.assertGreaterEqual(len(children), 12)
        job_id = started[0]
        pid = [p for p, _ in children if ("JOBSCHED_JOB_ID=%s" % job_id).encode()
               in proc_environ(p)]
        self.assertEqual(len(pid), 1, "a job's process carries its job id")
        self.assertIn(("JOBSCHED_WORKER_ID=%s" % worker_id).encode(), proc_environ(pid[0]))

        restarted = self.client(self.worker(None, state_dir=state_dir))
        listed = {job["job_id"]: job for job in restarted.jobs()}
        self.assertLessEqual(set(started), set(listed))
        self.assertEqual({job["state"] for job in listed.values()}, {"lost"})
        wait_until(lambda: not any(pid_alive(p) for p, _ in children),
                   message="every process the killed worker spawned to be gone")
        self.assertEqual(marked_processes(worker_id), [])
        self.assertEqual(listed[job_id]["pid"], pid[0])  # found by its marks

    def test_jobs_get_their_ids_and_no_jobsched_variable(self):
        leaked = "http://jobsched:%s@127.0.0.1:1" % TOKEN
        proc, address = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", "",
                                   "--state-dir", self.tempdir(),
                                   env={"JOBSCHED_TOKEN": TOKEN, "JOBSCHED_SCHEDULER": leaked,
                                        "JOBSCHED_OTHER": "x"})
        client = self.client(address, token=TOKEN)
        worker_id = client.info()["worker_id"]
        for options in ({}, {"env": {"APP_SETTING": "1"}}, {"env": {"JOBSCHED_SCHEDULER": "mine"}}):
            with self.subTest(options=options):
                job_id = client.start("env", "", options)
                self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")
                lines = client.output(job_id)["data"].decode().splitlines()
                own = ["%s=%s" % pair for pair in options.get("env", {}).items()
                       if pair[0].startswith("JOBSCHED_")]
                self.assertEqual(sorted(line for line in lines if line.startswith("JOBSCHED_")),
                                 sorted(own + ["JOBSCHED_JOB_ID=" + job_id,
                                               "JOBSCHED_WORKER_ID=" + worker_id]))
                self.assertNotIn(TOKEN, "\n".join(lines))
        for name in ("JOBSCHED_JOB_ID", "JOBSCHED_WORKER_ID"):
            with self.assertRaises(jobsched.BadRequest) as caught:
                client.start("env", "", {"env": {name: str(uuid.uuid4())}})
            self.assertIn(name, str(caught.exception))

    def test_allow_env_limits_the_names_a_job_may_set(self):
        client = self.client(self.worker(None, allow=["env"], allow_env=["APP_*", "LANG"]))
        job_id = client.start("env", "", {"env": {"APP_ONE": "1", "LANG": "C"}})
        self.wait_done(client, job_id)
        self.assertIn(b"APP_ONE=1\n", client.output(job_id)["data"])
        for name in ("LD_PRELOAD", "BASH_ENV", "BASH_FUNC_env%%", "PYTHONSTARTUP", "PERL5OPT",
                     "PATH", "app_one", "LANGUAGE"):
            with self.subTest(name=name):
                with self.assertRaises(jobsched.BadRequest) as caught:
                    client.start("env", "", {"env": {"APP_TWO": "2", name: "/tmp/x"}})
                self.assertIn(name, str(caught.exception))
        self.assertEqual(len(client.jobs()), 1)
        # The command line option; with --allow and no --allow-env, no name at all.
        for extra, allowed in ((["--allow-env", "APP_*"], True), ([], False)):
            _, address = self.spawn("worker", "--listen", "127.0.0.1:0", "--scheduler", "",
                                    "--state-dir", self.tempdir(), "--allow", "env", *extra)
            cli_client = self.client(address)
            error = fault_of(cli_client.start, "env", "", {"env": {"APP_ONE": "1"}})
            self.assertEqual(error is None, allowed, error)
            self.assertIn("LD_PRELOAD", str(fault_of(cli_client.start, "env", "",
                                                     {"env": {"LD_PRELOAD": "x.so"}})))

    def test_token_file_that_is_not_a_regular_file_is_refused_as_such(self):
        directory = self.tempdir()
        fifo = os.path.join(directory, "fifo")
        os.mkfifo(fifo, 0o600)
        os.chmod(directory, 0o700)
        for path in (directory, fifo):
            with self.subTest(path=path):
                done = self.cli("workers", "--token-file", path, "--scheduler", "127.0.0.1:1",
                                timeout=15)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn("token file %s is not a regular file" % path, done.stderr.decode())
                self.assertNotIn("chmod", done.stderr.decode())

    def test_job_group_is_killed_before_the_job_is_recorded_done(self):
        client = self.client(self.worker(None))
        pidfile = os.path.join(self.tempdir(), "pid")
        # The leader exits at once; a process it left in its group writes as fast as it can.
        job_id = client.start("sh", "", sh_args(
            '(trap "" TERM HUP; while :; do echo tick; done) & echo $! > "$1"; exit 0', pidfile))
        job = self.wait_done(client, job_id)
        writer = read_pidfile(pidfile)
        self.addCleanup(lambda: pid_alive(writer) and os.kill(writer, signal.SIGKILL))
        self.assertFalse(pid_alive(writer), "a process of the job's group outlived it")
        self.assertEqual((job["state"], job["exit_code"]), ("succeeded", 0))
        output = b"".join(client.follow(job_id))
        self.assertEqual(len(output), job["output_bytes"])
        self.assertEqual(client.query(job_id)["output_bytes"], job["output_bytes"])

    def patch_waitid_and_signals(self, held):
        """Instrument the worker's process calls: the waiter's blocking waitid() on a pid in held
        waits for released after the exit; every signal_group() notes whether the group's leader
        was still unreaped. Returns (exited, released, checked, signals)."""
        real_waitid = os.waitid
        exited, released, checked, signals = (threading.Event(), threading.Event(),
                                              threading.Event(), [])

        def unreaped(pid):
            try:
                real_waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                return True
            except ChildProcessError:
                return False

        def waitid(idtype, pid, options):
            result = real_waitid(idtype, pid, options)
            if pid in held and options & os.WNOHANG:
                checked.set()  # someone asked whether the leader has exited
            elif pid in held:
                exited.set()
                released.wait(20)
            return result

        real_signal_group = jobsched.signal_group

        def signal_group(pgid, signum):
            signals.append((pgid, signum, unreaped(pgid)))
            checked.set()
            real_signal_group(pgid, signum)
        os.waitid, jobsched.signal_group = waitid, signal_group
        self.addCleanup(setattr, jobsched, "signal_group", real_signal_group)
        self.addCleanup(setattr, os, "waitid", real_waitid)
        self.addCleanup(released.set)
        return exited, released, checked, signals

    @unittest.skipUnless(hasattr(os, "waitid"), "needs os.waitid")
    def test_stop_after_the_job_exited_on_its_own_records_how_it_exited(self):
        worker = self.worker(None)
        client = self.client(worker)
        held = set()
        exited, released, checked, signals = self.patch_waitid_and_signals(held)
        fifo = os.path.join(self.tempdir(), "fifo")
        os.mkfifo(fifo)
        job_id = client.start("sh", "", sh_args(': < "$1"', fifo))  # exits 0 once fifo is opened
        pid = client.query(job_id)["pid"]
        held.add(pid)
        os.close(os.open(fifo, os.O_WRONLY))
        self.assertTrue(exited.wait(10), "the job did not exit")
        # The leader is a zombie its waiter has not looked at yet: now the stop comes.
        answers = []
        stopper = threading.Thread(target=lambda: answers.append(self.client(worker).stop(job_id)))
        stopper.start()
        self.addCleanup(stopper.join, 20)
        self.assertTrue(checked.wait(10), "stop neither checked the leader nor signalled")
        released.set()
        stopper.join(20)
        self.assertEqual(answers, [True])
        job = client.query(job_id)
        self.assertEqual((job["state"], job.get("exit_code"), job["error_text"]),
                         ("succeeded", 0, ""))
        self.assertTrue(signals and all(unreaped for _, _, unreaped in signals), signals)
        self.assertNotIn(signal.SIGTERM, [signum for _, signum, _ in signals])

    @unittest.skipUnless(hasattr(os, "waitid"), "needs os.waitid")
    def test_stop_racing_exit_never_signals_a_reaped_group(self):
        worker = self.worker(None, slots=8)
        client = self.client(worker)
        _, _, _, signals = self.patch_waitid_and_signals(set())
        ids = []
        for _ in range(100):
            ids.append(client.start("true", ""))
            client.stop(ids[-1])
        terminated = {pgid for pgid, signum, _ in signals if signum == signal.SIGTERM}
        for job_id in ids:
            job = client.query(job_id)
            self.assertTrue(job["done"])
            if job["state"] == "stopped":  # only when the signal was sent while it ran
                self.assertIn(job["pid"], terminated)
            else:
                self.assertEqual((job["state"], job["exit_code"]), ("succeeded", 0))
        self.assertEqual([s for s in signals if not s[2]], [], "a signal reached a reaped group")

    def test_timeouts_hold_one_thread_and_nothing_once_the_job_ended(self):
        import gc
        worker = self.worker(None, slots=8)
        client = self.client(worker)
        before = threading.active_count()
        running = [client.start("sleep", "", {"args": ["300"], "timeout": 300}) for _ in range(5)]
        for job_id in running:
            self.addCleanup(client.stop, job_id)
        self.assertLessEqual(threading.active_count() - before, 2)  # timeouts + a connection
        self.assertEqual([t for t in threading.enumerate() if isinstance(t, threading.Timer)], [])
        quick = client.start("sleep", "", {"args": ["300"], "timeout": 0.2})  # sooner than all
        self.assertEqual(self.wait_done(client, quick)["state"], "timeout")
        for job_id in running:
            client.stop(job_id)
        for _ in range(5):
            self.wait_done(client, client.start("true", "", {"timeout": 300}))
        self.assertEqual([o for o in gc.get_objects() if isinstance(o, threading.Timer)], [])

    def test_record_that_cannot_be_written_is_retried_when_the_next_job_ends(self):
        state_dir = self.tempdir()
        client = self.client(self.worker(None, state_dir=state_dir))
        job_id = str(uuid.uuid4())
        blocker = os.path.join(state_dir, job_id + ".json.tmp")
        os.mkdir(blocker)  # the record cannot be written, as on a full disk
        client.start("sh", "", dict(sh_args("echo kept; exit 3"), job_id=job_id))
        self.assertEqual(self.wait_done(client, job_id)["exit_code"], 3)
        self.assertFalse(os.path.exists(os.path.join(state_dir, job_id + ".json")))
        os.rmdir(blocker)  # room again
        self.wait_done(client, client.start("true", ""))
        wait_until(lambda: os.path.exists(os.path.join(state_dir, job_id + ".json")),
                   message="the record to be written when the next job ended")
        with open(os.path.join(state_dir, job_id + ".json")) as f:
            self.assertEqual((json.load(f)["state"]), "failed")

    def test_job_without_record_is_never_forgotten(self):
        self.addCleanup(setattr, jobsched, "JOURNAL_LIMIT", jobsched.JOURNAL_LIMIT)
        jobsched.JOURNAL_LIMIT = 1  # rewrite the journal before every start
        state_dir = self.tempdir()
        worker = self.worker(None, state_dir=state_dir, keep_jobs=1)
        client = self.client(worker)
        job_id = str(uuid.uuid4())
        blocker = os.path.join(state_dir, job_id + ".json.tmp")
        os.mkdir(blocker)
        client.start("sh", "", dict(sh_args("echo kept; exit 3"), job_id=job_id))
        self.wait_done(client, job_id)
        for _ in range(2):  # more recorded jobs than --keep-jobs, and journal rewrites
            done_id = self.wait_done(client, client.start("true", ""))["job_id"]
            # Retention goes by the order records are written: the next job must not end first.
            wait_until(lambda: os.path.exists(os.path.join(state_dir, done_id + ".json")),
                       message="the record of %s" % done_id)
        self.assertTrue(os.path.exists(os.path.join(state_dir, job_id + ".out")))
        def final_line():  # appended by the waiter when the record fails, just after the end
            with open(os.path.join(state_dir, "journal"), "rb") as f:
                return any(record["job_id"] == job_id and record.get("exit_code") == 3
                           for record in map(json.loads, f))
        wait_until(final_line, message="the job's final line in the journal")
        self.assertEqual(client.query(job_id)["exit_code"], 3)
        # A crash now, then a restart with room on the disk again: the job is as it ended.
        # (Retention may still be removing the files of the `true` jobs: a file gone during the
        # copy is left out, as a crash at that moment would leave it out.)
        crashed = os.path.join(self.tempdir(), "copy")
        os.mkdir(crashed)
        for name in os.listdir(state_dir):
            if name != job_id + ".json.tmp":
                try:
                    shutil.copy2(os.path.join(state_dir, name), os.path.join(crashed, name))
                except FileNotFoundError:
                    pass
        restarted = self.client(self.worker(None, state_dir=crashed))
        job = restarted.query(job_id)
        self.assertEqual((job["state"], job["exit_code"]), ("failed", 3))
        self.assertEqual(restarted.output(job_id)["data"], b"kept\n")
        self.assertTrue(os.path.exists(os.path.join(crashed, job_id + ".json")))
        # And the worker itself writes it at shutdown (once the other jobs' waiters, whose
        # records retry this one first, are done: a record written then is expired at once).
        def others_recorded():
            with worker.state.lock:
                return set(worker.state._unrecorded) == {job_id}
        wait_until(others_recorded, message="the other jobs' records")
        os.rmdir(blocker)
        worker.close()
        with open(os.path.join(state_dir, job_id + ".json")) as f:
            self.assertEqual(json.load(f)["exit_code"], 3)

    def test_start_up_touches_only_the_files_it_owns(self):
        state_dir = self.tempdir()
        foreign = ["notes.out", "notes.tmp", "backup.json", "x.json.tmp", "README",
                   str(uuid.uuid4()) + ".out.bak", str(uuid.uuid4()).upper() + ".out"]
        for name in foreign:
            with open(os.path.join(state_dir, name), "w") as f:
                f.write("keep me " + name)
        leftovers = [str(uuid.uuid4()) + ".json.tmp", "journal.tmp"]
        for name in leftovers:
            with open(os.path.join(state_dir, name), "w") as f:
                f.write("{")
        orphan = str(uuid.uuid4())  # an output whose journal line was lost: kept, not deleted
        with open(os.path.join(state_dir, orphan + ".out"), "wb") as f:
            f.write(b"orphan\n")
        client = self.client(self.worker(None, state_dir=state_dir))
        for name in foreign:
            with open(os.path.join(state_dir, name)) as f:
                self.assertEqual(f.read(), "keep me " + name)
        for name in leftovers:
            self.assertFalse(os.path.exists(os.path.join(state_dir, name)), name)
        job = client.query(orphan)
        self.assertEqual((job["state"], job["output_bytes"]), ("lost", 7))
        self.assertEqual(client.output(orphan)["data"], b"orphan\n")
        self.assertEqual([j["job_id"] for j in client.jobs()], [orphan])

    def test_stop_waits_for_the_workers_grace_period(self):
        scheduler, _, _ = self.cluster(stop_grace=1.5)
        client = self.client(scheduler, timeout=0.5)
        stubborn = sh_args('trap "" TERM; echo ready; while :; do sleep 0.05; done')
        job_id = client.start("", "sh", "", stubborn)
        wait_until(lambda: client.output(job_id)["data"], message="the trap to be set")
        self.assertEqual(client.query(job_id)["stop_grace"], 1.5)
        self.assertIs(client.stop(job_id), True)  # longer than the client's own timeout
        job = client.query(job_id)
        self.assertEqual((job["state"], job["signal"]), ("stopped", signal.SIGKILL))
        self.assertNotIn("stop_grace", job)
        job_id = client.start("", "sh", "", stubborn)
        wait_until(lambda: client.output(job_id)["data"], message="the trap to be set")
        done = self.cli("stop", job_id, "--scheduler", scheduler.address, "--rpc-timeout", "0.5")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(client.query(job_id)["state"], "stopped")


# ---------------------------------------------------------------------------------------------
# Hardening of the scheduler and the transport: exactly-once starts, strict HTTP, integers,
# odd peers, TLS keep-alive, connection lifetimes, the wall clock
# ---------------------------------------------------------------------------------------------

class _ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False


class ScriptedPeer(http.server.BaseHTTPRequestHandler):
    """An XML-RPC peer whose answers a test scripts: ``server.answer(method, params, n)`` (n
    counts the requests) returns the reply body, (HTTP status, body), or None to close without
    answering."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        params, method = xmlrpc.client.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((method, params))
        reply = self.server.answer(method, params, len(self.server.requests))
        if reply is None:
            self.close_connection = True
            return
        status, reply = reply if isinstance(reply, tuple) else (200, reply)
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def scripted_peer(case, answer):
    """A ScriptedPeer serving in a thread until cleanup; returns (server, HOST:PORT)."""
    server = _ThreadingHTTPServer(("127.0.0.1", 0), ScriptedPeer)
    server.requests, server.answer = [], answer
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    case.addCleanup(server.server_close)
    case.addCleanup(thread.join, 10)
    case.addCleanup(server.shutdown)
    return server, "127.0.0.1:%d" % server.server_address[1]


def read_to_end(sock):
    """Everything the peer sends until it closes (a reset counts as a close)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def xml_request(method, *values):
    """An XML-RPC request body with each value given as its raw XML (e.g. "<i8>5</i8>")."""
    return ("<?xml version='1.0'?><methodCall><methodName>%s</methodName><params>%s</params>"
            "</methodCall>" % (method, "".join("<param><value>%s</value></param>" % v
                                               for v in values))).encode()


class ExactlyOnceTest(ClusterTestCase):
    """The scheduler names a job before placing it, and starts it on another worker only when
    the first certainly did not start it."""

    def test_stopped_worker_runs_the_job_once_and_query_tells_the_truth(self):
        scheduler = self.scheduler(rpc_timeout=1.0)
        # The stopped worker has the most free slots, so automatic placement tries it first.
        stopped, stopped_address = self.spawn(*worker_args(
            scheduler.address, self.tempdir(), "--slots", "8", "--heartbeat", "30"))

        def resume_and_stop():
            if stopped.poll() is None:
                stopped.send_signal(signal.SIGCONT)
                stopped.terminate()
                stopped.wait(timeout=15)
        self.addCleanup(resume_and_stop)
        other = self.worker(scheduler, slots=1, heartbeat=30)
        client = self.client(scheduler)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 2,
                   message="workers to register")
        stopped_id = self.client(stopped_address).info()["worker_id"]
        marker = os.path.join(self.tempdir(), "runs")

        stopped.send_signal(signal.SIGSTOP)
        error = fault_of(client.start, "", "sh", "", sh_args('echo ran >> "$1"', marker))
        self.assertIs(type(error), jobsched.Unavailable, error)  # fault 3, not a job on `other`
        found = re.search(r"outcome unknown: job (\S+) may have started on worker (\S+)", str(error))
        self.assertIsNotNone(found, str(error))
        job_id, worker_id = found.groups()
        self.assertEqual(worker_id, stopped_id)
        stopped.send_signal(signal.SIGCONT)  # the worker reads the start it was sent, and runs it
        wait_until(lambda: fault_of(client.query, job_id) is None, message="the job to start")
        job = self.wait_done(client, job_id)
        self.assertEqual((job["state"], job["worker_id"]), ("succeeded", stopped_id))
        with open(marker) as f:
            self.assertEqual(f.read(), "ran\n")
        self.assertEqual(self.client(other).jobs(), [])

    def test_no_answer_is_asked_again_with_the_same_job_id(self):
        def answer(method, params, count):
            if count == 1:
                return None  # the request was read, the connection closed: outcome unknown
            return xmlrpc.client.dumps((params[2]["job_id"],), methodresponse=True).encode()
        peer, address = scripted_peer(self, answer)
        scheduler = self.scheduler()
        client = self.client(scheduler)
        client.register(address, {"slots": 4})
        job_id = client.start("", "true", "", {"args": ["x"]})
        self.assertEqual(str(uuid.UUID(job_id)), job_id)
        self.assertEqual([method for method, _ in peer.requests], ["start", "start"])
        (first, second) = [params for _, params in peer.requests]
        self.assertEqual(first, second)
        self.assertEqual(first, ("true", "", {"args": ["x"], "job_id": job_id}))

    def test_a_fault_after_no_answer_is_not_taken_for_certain(self):
        # The unanswered request may still wait unread in the worker's socket: a "full" from
        # the next ask does not mean the job will not start.
        full = xmlrpc.client.dumps(xmlrpc.client.Fault(3, "worker is full (1 slots)")).encode()
        peer, address = scripted_peer(self, lambda method, params, count: None if count == 1 else full)
        scheduler = self.scheduler(rpc_timeout=0.5)
        client = self.client(scheduler)
        peer_id = client.register(address, {"slots": 100})
        other = self.worker(scheduler, slots=1, heartbeat=30)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 2,
                   message="workers to register")
        error = fault_of(client.start, "", "true", "")
        self.assertIs(type(error), jobsched.Unavailable)
        self.assertIn("may have started on worker %s" % peer_id, str(error))
        self.assertGreaterEqual(len(peer.requests), 2)
        self.assertEqual(len({params[2]["job_id"] for _, params in peer.requests}), 1)
        self.assertEqual(self.client(other).jobs(), [])

    def test_callers_job_id_is_placed_once(self):
        scheduler, workers, client = self.cluster(2, heartbeat=30)
        job_id, marker = str(uuid.uuid4()), os.path.join(self.tempdir(), "runs")
        options = dict(sh_args('echo ran >> "$1"', marker), job_id=job_id.upper())
        self.assertEqual(client.start("", "sh", "", options), job_id)
        placed = self.wait_done(client, job_id)["worker_id"]
        for _ in range(3):  # a caller retrying its start: the same worker answers, nothing runs
            self.assertEqual(client.start("", "sh", "", options), job_id)
        with open(marker) as f:
            self.assertEqual(f.read(), "ran\n")
        elsewhere = [w.worker_id for w in workers if w.worker_id != placed][0]
        self.assertIs(type(fault_of(client.start, elsewhere, "sh", "", options)), jobsched.BadRequest)
        self.assertEqual([j["job_id"] for j in client.jobs()], [job_id])

    def test_a_refused_connection_moves_on_to_the_next_worker(self):
        scheduler = self.scheduler()
        client = self.client(scheduler)
        client.register("127.0.0.1:%d" % free_port(), {"slots": 100})  # nothing listens there
        worker = self.worker(scheduler, slots=1, heartbeat=30)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 2,
                   message="workers to register")
        job_id = client.start("", "true", "")
        self.assertEqual(self.wait_done(client, job_id)["worker_id"], worker.worker_id)

    def test_client_tells_not_sent_from_no_answer(self):
        refused = self.client("127.0.0.1:%d" % free_port(), timeout=2.0)
        self.assertIs(type(fault_of(refused.info)), jobsched.Unreachable)
        silent = socket.socket()  # listens, never accepts: the kernel takes the request
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        unanswered = self.client("127.0.0.1:%d" % silent.getsockname()[1], timeout=0.3)
        error = fault_of(unanswered.info)
        self.assertIs(type(error), jobsched.OutcomeUnknown)
        self.assertIn("timed out", str(error))

    def test_kept_alive_connection_closed_by_the_server_is_used_again_once(self):
        scheduler = self.scheduler(read_timeout=0.3)
        scheduler.server.park_after = 0.05
        client = self.client(scheduler)
        client.check_after = 3600.0  # no look before use: the request meets the closed connection
        self.assertEqual(client.info()["role"], "scheduler")
        sock = client._idle[-1].sock
        wait_until(lambda: select.select([sock], [], [], 0)[0],
                   message="the server to close the idle connection")
        self.assertEqual(client.info()["role"], "scheduler")


class StrictHTTPTest(ClusterTestCase):
    """Requests whose framing two parsers could read differently get 400 and a close; one
    deadline covers the whole of a request."""

    def exchange(self, address, data):
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(data)
            return read_to_end(sock)

    def assert_refused(self, address, request, reason):
        reply = self.exchange(address, request)
        self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), (request, reply[:200]))
        self.assertEqual(reply.count(b"HTTP/1.1 "), 1, reply)  # nothing in it read as a request
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nConnection: close\r\n", head + b"\r\n")
        self.assertIn(reason, json.loads(body.decode())["error"])

    def test_ambiguous_framing_is_400_and_close(self):
        scheduler = self.scheduler(read_timeout=1.0)
        worker = self.worker(None, read_timeout=1.0)
        for role in (scheduler, worker):
            address = role.address
            smuggled = b"GET /jobs HTTP/1.1\r\nConnection: close\r\n\r\n"
            body = rpc_body("info")
            for request, reason in [
                    (b"GET /workers HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                     + smuggled, "must not have a body"),
                    (b"PUT /RPC2 HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                     + smuggled, "must not have a body"),
                    (b"POST /RPC2 HTTP/1.1\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n"
                     % (len(body), len(body)) + body, "more than one Content-Length"),
                    (b"POST /RPC2 HTTP/1.1\r\nContent-Length: %d\r\nContent-Length: 0\r\n\r\n"
                     % len(body) + body, "more than one Content-Length"),
                    (b"POST /RPC2 HTTP/1.1\r\nContent-Length : %d\r\n\r\n" % len(body) + body,
                     "whitespace before a header's colon"),
                    (b"POST /RPC2 HTTP/1.1\r\nX-A: b\r\n c: d\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body, "folded header line"),
                    (b"POST /RPC2 HTTP/1.1\r\nTransfer-Encoding: identity\r\nContent-Length: %d"
                     b"\r\n\r\n" % len(body) + body, "Transfer-Encoding"),
                    (b"POST /RPC2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body)
                     + body + b"\r\n0\r\n\r\n", "Transfer-Encoding"),
                    (b"GET /workers HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                     "Transfer-Encoding")]:
                with self.subTest(role=type(role).__name__, request=request[:60]):
                    self.assert_refused(address, request, reason)
            reply = self.exchange(address, b"GET /nowhere HTTP/1.1\r\nContent-Length: 0\r\n"
                                           b"Connection: close\r\n\r\n")
            self.assertTrue(reply.startswith(b"HTTP/1.1 404 "), reply[:100])
            self.assertEqual(xml_call(address, body)["version"], jobsched.__version__)

    def test_a_trickled_request_is_cut_off_at_the_read_timeout(self):
        scheduler = self.scheduler(read_timeout=0.5)
        host, port = scheduler.address.rsplit(":", 1)
        # A header line that never ends, and a body that never does; a byte every 50 ms
        # keeps any per-recv() timeout from firing.
        for start in (b"GET /workers HTTP/1.1\r\nX-Slow: ",
                      b"POST /RPC2 HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"):
            sock = socket.create_connection((host, int(port)), timeout=10)
            self.addCleanup(sock.close)
            sock.sendall(start)
            stop = threading.Event()

            def trickle():
                while not stop.wait(0.05):
                    try:
                        sock.send(b"x")
                    except OSError:
                        return
            thread = threading.Thread(target=trickle)
            thread.start()
            self.addCleanup(thread.join, 10)
            self.addCleanup(stop.set)
            self.assertEqual(read_to_end(sock), b"")  # closed without an answer, well within 10 s
            stop.set()
        self.assertEqual(self.client(scheduler).info()["role"], "scheduler")


class WireIntegerTest(ClusterTestCase):
    """Numbers past 32 bits, as <i8> or <int>, are answered or refused (fault 2), never fault 4."""

    def test_output_offsets_past_2_gib_through_the_scheduler(self):
        scheduler, _, client = self.cluster(1)
        job_id = client.start("", "sh", "", sh_args("printf abc"))
        self.wait_done(client, job_id)
        big = "3000000000"
        for offset, max_bytes, wait in [("<i8>%s</i8>" % big, "<i8>10</i8>", "<i8>0</i8>"),
                                        ("<int>%s</int>" % big, "<int>%s</int>" % big, "<int>0</int>"),
                                        ("<double>%s.0</double>" % big, "<int>10</int>",
                                         "<i8>%s</i8>" % big)]:
            with self.subTest(offset=offset, max_bytes=max_bytes, wait=wait):
                reply = xml_call(scheduler.address, xml_request(
                    "output", "<string>%s</string>" % job_id, offset, max_bytes, wait))
                self.assertNotIsInstance(reply, xmlrpc.client.Fault)
                self.assertEqual((reply["data"].data, reply["offset"], reply["eof"]),
                                 (b"", int(big), True))
        reply = xml_call(scheduler.address, xml_request(
            "output", "<string>%s</string>" % job_id, "<i8>1</i8>", "<i8>%s</i8>" % big))
        self.assertEqual((reply["data"].data, reply["offset"]), (b"bc", 3))
        self.assertEqual(client.output(job_id, 3000000000, 10)["offset"], 3000000000)

    def test_out_of_range_worker_info_is_fault_2_and_workers_keeps_answering(self):
        scheduler = self.scheduler()
        client = self.client(scheduler)
        worker_id = client.register("127.0.0.1:1", {"slots": 2, "heartbeat": 30})
        for member in ("<name>slots</name><value><i8>4294967296</i8></value>",
                       "<name>running</name><value><int>4294967296</int></value>",
                       "<name>slots</name><value><int>-1</int></value>",
                       "<name>slots</name><value><double>1.5</double></value>",
                       "<name>slots</name><value><string>4</string></value>",
                       "<name>heartbeat</name><value><double>1e300</double></value>",
                       "<name>heartbeat</name><value><double>nan</double></value>",
                       "<name>stop_grace</name><value><double>-1</double></value>",
                       "<name>tls</name><value><int>1</int></value>"):
            info = "<struct><member>%s</member></struct>" % member
            for request in (xml_request("heartbeat", "<string>%s</string>" % worker_id, info),
                            xml_request("register", "<string>127.0.0.1:1</string>", info)):
                with self.subTest(request=request):
                    fault = xml_call(scheduler.address, request)
                    self.assertIsInstance(fault, xmlrpc.client.Fault)
                    self.assertEqual(fault.faultCode, 2, fault.faultString)
                    self.assertIn("info.", fault.faultString)
        (listed,) = client.workers()
        self.assertEqual((listed["worker_id"], listed["slots"], listed["online"]), (worker_id, 2, True))
        self.assertIs(client.heartbeat(worker_id, {"slots": 2 ** 31 - 1, "running": 0}), True)
        self.assertEqual(client.workers()[0]["slots"], 2 ** 31 - 1)


class OddPeerTest(ClusterTestCase):
    """Nothing one worker does hangs the scheduler; an address that cannot be dialled is refused."""

    def test_a_worker_answering_nonsense_cannot_hang_the_scheduler(self):
        nonsense = (b"<?xml version='1.0'?><methodResponse><params><param><value><int>zz</int>"
                    b"</value></param></params></methodResponse>")
        peer, address = scripted_peer(self, lambda method, params, count: nonsense)
        scheduler = self.scheduler(rpc_timeout=1.0)
        healthy = self.worker(scheduler, heartbeat=30)
        client = self.client(scheduler, timeout=5.0)  # a hang shows as this client's timeout
        odd_id = client.register(address, {"slots": 0})
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 2,
                   message="workers to register")
        baseline = threading.active_count()
        job_id = client.start(healthy.worker_id, "true", "")
        for _ in range(3):
            self.assertEqual([j["job_id"] for j in client.jobs()], [job_id])
        error = fault_of(client.query, str(uuid.uuid4()))  # asked of every worker
        self.assertIs(type(error), jobsched.Unavailable)
        self.assertIn("did not", str(error))
        error = fault_of(client.start, odd_id, "true", "")
        self.assertIs(type(error), jobsched.Unavailable)
        self.assertIn("outcome unknown", str(error))
        self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")
        wait_until(lambda: threading.active_count() <= baseline, message="no thread left behind")

    def test_a_reply_with_a_dtd_is_refused_not_expanded(self):
        laughs = (b"<?xml version='1.0'?><!DOCTYPE r [<!ENTITY a 'aaaaaaaaaa'>"
                  b"<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>]><methodResponse><params><param>"
                  b"<value><string>&b;</string></value></param></params></methodResponse>")
        peer, address = scripted_peer(self, lambda method, params, count: laughs)
        client = jobsched.Client(address, timeout=5.0)
        self.addCleanup(client.close)
        for call in (client.info, lambda: client.output(str(uuid.uuid4()))):
            error = fault_of(call)
            self.assertIsInstance(error, jobsched.Unreachable)
            self.assertIn("DTDs and entity declarations are not allowed" if call == client.info
                          else "not XML-RPC", str(error))

    def test_register_refuses_an_address_that_is_not_host_port(self):
        scheduler = self.scheduler()
        for bad in ("node1..example.org:1", "-node.example.org:1", "node_1.example.org:1",
                    "a b:1", "1.2.3.999:1", "[1.2.3.4]:1", "[::1:1", "node:0", ":1",
                    "x" * 64 + ".example.org:1", "node.example.org"):
            with self.subTest(address=bad):
                code, message = raw_fault(scheduler.address, "register", bad)
                self.assertEqual(code, 2)
                self.assertIn("is not HOST:PORT", message)
        client = self.client(scheduler)
        for good in ("node1.example.org:1", "localhost:1", "127.0.0.1:1", "[::1]:1",
                     "https://node-2.example.org.:443"):
            client.register(good)
        self.assertEqual(len(client.workers()), 5)

    def test_worker_with_an_advertise_address_that_is_not_host_port_exits_2(self):
        result = self.cli(*worker_args("127.0.0.1:%d" % free_port(), self.tempdir(),
                                       "--advertise", "node1..example.org:1"), timeout=20)
        stderr = result.stderr.decode()
        self.assertEqual(result.returncode, 2, stderr)
        self.assertIn("--advertise 'node1..example.org:1' is not HOST:PORT", stderr)
        self.assertNotIn("Traceback", stderr)

    def test_worker_exits_2_when_the_scheduler_refuses_to_register_it(self):
        def register(address, info=None):
            raise jobsched.BadRequest("no room for %s" % address)
        refusing = jobsched.RPCServer("127.0.0.1:0", jobsched.Security(), {"register": register})
        refusing.serve_in_thread()
        self.addCleanup(refusing.close)
        result = self.cli(*worker_args(refusing.address, self.tempdir()), timeout=20)
        stderr = result.stderr.decode()
        self.assertEqual(result.returncode, 2, stderr)
        self.assertIn("jobsched: error: scheduler %s refused to register this worker: no room for "
                      "127.0.0.1:" % refusing.address, stderr)
        self.assertNotIn("Traceback", stderr)


    def test_an_http_refusal_is_not_retried_and_a_busy_answer_is(self):
        """A 4xx answer (but 408 and 429) is Refused: not a jobsched server, or a proxy on the
        way; clients that ride out an unreachable peer give up at once, and a worker that
        cannot register exits 2. A 429 may pass: it is retried."""
        _, refusing = scripted_peer(self, lambda method, params, n: (
            404, b'{"error": "no such route: POST /RPC2"}'))
        _, busy = scripted_peer(self, lambda method, params, n: (429, b"busy"))
        error = fault_of(jobsched.Client(refusing).info)
        self.assertIs(type(error), jobsched.Refused)
        self.assertIsInstance(error, jobsched.Unreachable)
        self.assertIn("refused the request: HTTP 404 Not Found (no such route: POST /RPC2)",
                      str(error))
        submitted = self.cli("submit", "--scheduler", refusing, "--reconnect", "600", "--", "true")
        stderr = submitted.stderr.decode()
        self.assertEqual(submitted.returncode, 1, stderr)
        self.assertEqual(submitted.stdout, b"")
        self.assertIn("HTTP 404 Not Found", stderr)
        self.assertNotIn("retrying", stderr)
        self.assertNotIn("Traceback", stderr)
        submitted = self.cli("submit", "--scheduler", busy, "--reconnect", "1", "--", "true")
        stderr = submitted.stderr.decode()
        self.assertEqual(submitted.returncode, 1, stderr)
        self.assertIn("answered HTTP 429 Too Many Requests; retrying for up to 1 s", stderr)
        self.assertIn("nothing was queued", stderr)
        worker = self.cli(*worker_args(refusing, self.tempdir()), timeout=20)
        stderr = worker.stderr.decode()
        self.assertEqual(worker.returncode, 2, stderr)
        self.assertIn("refused to register this worker: %s refused the request: HTTP 404"
                      % refusing, stderr)


    def test_a_registered_worker_rides_out_a_refused_registration(self):
        # After a scheduler restart ("unknown worker"), a proxy's 404 to the registration is
        # retried: only a worker that never registered gives up (and would stop its jobs).
        ok = xmlrpc.client.dumps((True,), methodresponse=True).encode()
        calls, refusals = [], [2]

        def answer(method, params, count):
            calls.append(method)
            if method == "heartbeat" and calls.count("register") == 1:
                return xmlrpc.client.dumps(xmlrpc.client.Fault(1, "unknown worker"),
                                           methodresponse=True).encode()
            if method == "register" and calls.count("register") > 1 and refusals[0]:
                refusals[0] -= 1
                return 404, b"default backend - 404"
            return ok
        _, address = scripted_peer(self, answer)
        worker = self.worker(address, heartbeat=0.1)
        wait_until(lambda: calls.count("register") >= 4 and calls[-1] == "heartbeat",
                   message="the worker to register again after two refusals")
        self.assertIsNone(worker.fatal_error)
        self.assertEqual(self.client(worker).jobs(), [])  # still serving

    def test_an_http_refusal_message_is_one_line(self):
        _, address = scripted_peer(self, lambda method, params, n: (
            404, b'{"error": "x\\njobsched: forged line\\r\\u2028end"}'))
        error = str(fault_of(jobsched.Client(address).info))
        self.assertIn("HTTP 404 Not Found (x jobsched: forged line end);", error)
        self.assertEqual(error.splitlines(), [error])

    def test_a_5xx_answer_may_have_been_acted_on_by_the_proxy(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        client = self.client(scheduler)

        def answer(method, params, n):  # a proxy that passes the call on, then times out
            client.call(method, *params)
            return 504, b"Gateway Timeout"
        _, proxy = scripted_peer(self, answer)
        error = fault_of(jobsched.Client(proxy).info)
        self.assertIs(type(error), jobsched.OutcomeUnknown)
        done = self.cli("submit", "--scheduler", proxy, "--reconnect", "0", "--", "true")
        (job_id,) = [job["job_id"] for job in client.jobs()]
        self.assertEqual((done.returncode, done.stdout), (255, job_id.encode() + b"\n"))
        self.assertIn("answered HTTP 504 Gateway Timeout; job %s may have been queued" % job_id,
                      done.stderr.decode())


class TLSKeepAliveTest(CertificatesTestCase):
    """Idle TLS connections end with close_notify and a half-close, and no call fails on one;
    a failed handshake is a certain failure."""

    def files(self, name):
        return {"tls_cert": os.path.join(self.a, name + ".pem"),
                "tls_key": os.path.join(self.a, name + ".key"),
                "tls_ca": os.path.join(self.a, "ca.pem")}

    def test_stock_client_reconnects_after_the_server_closed_an_idle_connection(self):
        files = self.files("scheduler")
        scheduler = self.scheduler(read_timeout=0.3, tls_cert=files["tls_cert"],
                                   tls_key=files["tls_key"])
        scheduler.server.park_after = 0.05
        context = ssl.create_default_context(cafile=files["tls_ca"])
        proxy = xmlrpc.client.ServerProxy(
            "https://localhost:%s/RPC2" % scheduler.address.rsplit(":", 1)[1], context=context)
        self.addCleanup(proxy("close"))
        self.assertEqual(proxy.info()["role"], "scheduler")
        sock = proxy("transport")._connection[1].sock
        wait_until(lambda: select.select([sock], [], [], 0)[0],
                   message="the server to close the idle connection")
        # Python 3.10-3.12 raise SSLEOFError here if the connection was simply closed.
        self.assertEqual(proxy.info()["role"], "scheduler")

    def test_scheduler_never_fails_a_call_on_a_connection_the_worker_closed(self):
        scheduler = self.scheduler(**self.files("scheduler"))
        worker = self.worker(scheduler, read_timeout=0.3, **self.files("worker"))
        worker.server.park_after = 0.05
        client = self.client(scheduler, **self.files("client"))
        wait_until(lambda: [w["online"] for w in client.workers()] == [True],
                   message="worker to register")
        pool = scheduler._workers[worker.worker_id].client
        pool.check_after = 3600.0  # no look before use: the start meets the closed connection
        self.wait_done(client, client.start("", "true", ""))
        sock = pool._idle[-1].sock
        wait_until(lambda: select.select([sock], [], [], 0)[0],
                   message="the worker to close the idle connection")
        job_id = client.start("", "true", "")  # was: "no worker has a free slot"
        self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")

    def test_a_worker_refusing_the_schedulers_certificate_did_not_start_the_job(self):
        scheduler = self.scheduler(rpc_timeout=2.0, **self.files("scheduler"))
        # It wants client certificates from the other CA; TLS 1.3 tells the scheduler so only
        # after the request was sent, as an alert.
        refusing = self.worker(None, tls_cert=os.path.join(self.a, "worker.pem"),
                               tls_key=os.path.join(self.a, "worker.key"),
                               tls_ca=os.path.join(self.b, "ca.pem"))
        worker = self.worker(scheduler, slots=1, heartbeat=30, **self.files("worker"))
        client = self.client(scheduler, **self.files("client"))
        client.register(refusing.address, {"tls": True, "slots": 100, "heartbeat": 0})
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 2,
                   message="workers to register")
        job_id = client.start("", "true", "")  # tried on the refusing worker first, then here
        self.assertEqual(self.wait_done(client, job_id)["worker_id"], worker.worker_id)


class ConnectionLifetimeTest(ClusterTestCase):
    """The scheduler closes its connections to workers that left and those idle for long."""

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "counting open files needs /proc")
    def test_departed_workers_leave_no_connection_open(self):
        scheduler = self.scheduler(rpc_timeout=2.0)
        client = self.client(scheduler)
        peers = []
        for _ in range(4):
            peer = jobsched.RPCServer("127.0.0.1:0", jobsched.Security(), {"jobs": lambda: []})
            peer.serve_in_thread()
            self.addCleanup(peer.close)
            peers.append(peer.address)
        client.register(peers[0], {"worker_id": "stays", "heartbeat": 0})
        client.jobs()  # its connection is what the remaining worker needs

        def open_files():
            return len(os.listdir("/proc/self/fd"))
        baseline = open_files()
        for i in range(100):
            worker_id = "comes-and-goes-%d" % i
            client.register(peers[1 + i % 3], {"worker_id": worker_id, "heartbeat": 60})
            self.assertEqual(client.jobs(), [])  # a connection to it, and the one to "stays"
            if i % 3 == 0:
                client.deregister(worker_id)
            elif i % 3 == 1:  # registers elsewhere, is asked there, then leaves
                client.register(peers[1 + (i + 1) % 3], {"worker_id": worker_id, "heartbeat": 60})
                self.assertEqual(client.jobs(), [])
                client.deregister(worker_id)
            else:  # falls silent: offline three short intervals after this heartbeat
                client.heartbeat(worker_id, {"heartbeat": 0.05})
        wait_until(lambda: [w["worker_id"] for w in client.workers() if w["online"]] == ["stays"],
                   message="the silent workers to go offline")
        wait_until(lambda: open_files() <= baseline, message="connections to be closed (%d open "
                   "files, %d before)" % (open_files(), baseline))

    def test_pooled_connections_idle_for_long_are_closed(self):
        self.addCleanup(setattr, jobsched.RPCClient, "idle_timeout", jobsched.RPCClient.idle_timeout)
        jobsched.RPCClient.idle_timeout = 0.2
        scheduler, (worker,), client = self.cluster(1, heartbeat=30)
        self.wait_done(client, client.start("", "true", ""))
        pool = scheduler._workers[worker.worker_id].client
        self.assertTrue(pool._idle)
        sock = pool._idle[-1].sock
        wait_until(lambda: not pool._idle and sock.fileno() == -1,
                   message="the idle connection to be closed")
        self.assertEqual(self.wait_done(client, client.start("", "true", ""))["state"], "succeeded")


class WallClockTest(ClusterTestCase):
    """Worker liveness is measured on the monotonic clock."""

    def step_wall_clock(self, seconds):
        real = jobsched.time

        class SteppedTime:
            def __getattr__(self, name):
                return getattr(real, name)

            def time(self):
                return real.time() + seconds
        jobsched.time = SteppedTime()
        self.addCleanup(setattr, jobsched, "time", real)

    def online(self, client):
        return [w["online"] for w in client.workers()]

    def test_stepping_the_wall_clock_changes_no_worker_state(self):
        scheduler = self.scheduler()
        client = self.client(scheduler)
        client.register("127.0.0.1:1", {"worker_id": "steady", "heartbeat": 30})
        client.register("127.0.0.1:2", {"worker_id": "silent", "heartbeat": 0.1})
        self.step_wall_clock(-3600)  # back an hour: the silent worker still goes offline
        wait_until(lambda: self.online(client) == [True, False], timeout=5,
                   message="the silent worker to go offline")
        self.step_wall_clock(7200)  # an hour ahead of the real time: the steady one stays online
        self.assertEqual(self.online(client), [True, False])
        client.heartbeat("silent", {"heartbeat": 30})
        self.assertEqual(self.online(client), [True, True])
        self.assertGreater(client.workers()[1]["last_seen"], time.time() + 3000)  # shown as is


class LabelsTest(ClusterTestCase):
    """Worker labels and a job's ``on``: three workers with different labels."""

    LABELS = {"a": {"gpu": "1", "rack": "a"}, "b": {"gpu": "0", "rack": "b"},
              "c": {"rack": "a", "ssd": "yes"}}

    def labelled_cluster(self, **worker_kwargs):
        """A scheduler and workers a, b, c with LABELS, all online: (scheduler, {name: worker}, client)."""
        scheduler = self.scheduler()
        workers = {name: self.worker(scheduler, labels=labels, **worker_kwargs)
                   for name, labels in sorted(self.LABELS.items())}
        client = self.client(scheduler)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 3, message="workers to register")
        return scheduler, workers, client

    def placed_on(self, client, workers, options, times=6):
        """The names of the workers that `times` starts with these options ran on."""
        names = {w.worker_id: name for name, w in workers.items()}
        return {names[client.query(client.start("", "true", "", options))["worker_id"]]
                for _ in range(times)}

    def test_labels_match_and_format(self):
        labels = {"gpu": "1", "rack": "a"}
        self.assertTrue(jobsched.labels_match(labels, {}))
        self.assertTrue(jobsched.labels_match(labels, {"gpu": "1", "rack": "*"}))
        self.assertFalse(jobsched.labels_match(labels, {"gpu": "1", "ssd": "*"}))
        self.assertFalse(jobsched.labels_match(labels, {"gpu": "0"}))
        self.assertEqual(jobsched.format_labels({"rack": "a", "gpu": "1"}), "gpu=1,rack=a")
        self.assertEqual(jobsched.parse_on([]), {})

    def test_labels_in_info_worker_struct_and_workers_command(self):
        scheduler, workers, client = self.labelled_cluster()
        builtin = {"host": socket.gethostname(), "os": sys.platform, "arch": platform.machine()}
        self.assertEqual(workers["a"].info()["labels"], dict(builtin, gpu="1", rack="a"))
        listed = {w["worker_id"]: w["labels"] for w in client.workers()}
        for name, worker in workers.items():
            self.assertEqual(listed[worker.worker_id], dict(builtin, **self.LABELS[name]))
        env = {"JOBSCHED_SCHEDULER": scheduler.address}
        table = self.cli("workers", env=env)
        self.assertEqual(table.returncode, 0, table.stderr)
        lines = table.stdout.decode().splitlines()
        self.assertIn("LABELS", lines[0].split())
        self.assertTrue(any(line.split()[0] == workers["c"].worker_id and line.endswith(
            "arch=%s,host=%s,os=%s,rack=a,ssd=yes" % (builtin["arch"], builtin["host"], builtin["os"]))
            for line in lines[1:]), lines)
        filtered = self.cli("workers", "--on", "rack=a", "--on", "gpu=*", "--json", env=env)
        self.assertEqual(filtered.returncode, 0, filtered.stderr)
        self.assertEqual([w["worker_id"] for w in json.loads(filtered.stdout.decode())["workers"]],
                         [workers["a"].worker_id])

    def test_bad_labels_are_refused_by_worker_and_scheduler(self):
        for labels, reason in (({"host": "elsewhere"}, "built in"), ({"bad key": "1"}, "key"),
                               ({"k" * 65: "1"}, "key"), ({"k": "v" * 257}, "256"),
                               ({"k": "a\nb"}, "printable"), ({"k": 1}, "string")):
            with self.assertRaises(jobsched.ConfigError) as caught:
                jobsched.Worker("127.0.0.1:0", scheduler=None, state_dir=self.tempdir(), labels=labels)
            self.assertIn(reason, str(caught.exception))
        state_dir = self.tempdir()
        cases = [(("--label", "gpu"), "KEY=VALUE"), (("--label", "host=elsewhere"), "built in"),
                 (("--label", "a b=1"), "key"), (("--label", "k=" + "v" * 257), "256")]
        procs = [(popen_jobsched(self, worker_args("127.0.0.1:1", state_dir, *extra)), reason)
                 for extra, reason in cases]
        for proc, reason in procs:
            out, err = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 2, err)
            self.assertIn(reason, err.decode())
            self.assertEqual(len(err.decode().strip().splitlines()), 1, err)
        scheduler = self.scheduler()
        worker_id = self.client(scheduler).register("127.0.0.1:1", {"labels": []})
        self.assertEqual(raw_fault(scheduler.address, "register", "127.0.0.1:1",
                                   {"labels": {"bad key": "1"}})[0], 2)
        code, message = raw_fault(scheduler.address, "heartbeat", worker_id, {"labels": {"k": 5}})
        self.assertEqual(code, 2)
        self.assertIn("info.labels.k", message)

    def test_placement_honours_every_constraint(self):
        scheduler, workers, client = self.labelled_cluster()
        self.assertEqual(self.placed_on(client, workers, {"on": {"gpu": "1"}}), {"a"})
        self.assertLessEqual(self.placed_on(client, workers, {"on": {"gpu": "*"}}), {"a", "b"})
        self.assertLessEqual(self.placed_on(client, workers, {"on": {"rack": "a"}}), {"a", "c"})
        self.assertEqual(self.placed_on(client, workers, {"on": {"rack": "a", "ssd": "*"}}), {"c"})
        fault = fault_of(client.start, "", "true", "", {"on": {"rack": "a", "gpu": "0"}})
        self.assertIsInstance(fault, jobsched.Unavailable)
        self.assertEqual(str(fault), "no online worker matches gpu=0,rack=a")
        fault = fault_of(client.start, workers["b"].worker_id, "true", "", {"on": {"gpu": "1"}})
        self.assertIsInstance(fault, jobsched.Unavailable)
        self.assertIn("does not match gpu=1", str(fault))
        job_id = client.start(workers["a"].worker_id, "true", "", {"on": {"gpu": "1"}})
        self.assertEqual(client.query(job_id)["worker_id"], workers["a"].worker_id)
        for on in ({"bad key": "1"}, {"gpu": 1}, "gpu=1"):
            self.assertIsInstance(fault_of(client.start, "", "true", "", {"on": on}), jobsched.BadRequest)
        status, reply = http_call(scheduler.address, "POST", "/start",
                                  {"command": "true", "on": {"ssd": "yes"}})
        self.assertEqual(status, 201, reply)
        self.assertEqual(client.query(reply["job_id"])["worker_id"], workers["c"].worker_id)
        self.assertEqual(http_call(scheduler.address, "POST", "/start",
                                   {"command": "true", "on": {"ssd": "no"}}),
                         (503, {"error": "no online worker matches ssd=no"}))
        result = self.cli("start", "--on", "ssd=yes", "--", "true",
                          env={"JOBSCHED_SCHEDULER": scheduler.address})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(client.query(result.stdout.decode().strip())["worker_id"], workers["c"].worker_id)
        workers["a"].close()  # deregisters: offline at once
        wait_until(lambda: not [w for w in client.workers() if w["worker_id"] == workers["a"].worker_id
                                and w["online"]], message="worker a offline")
        fault = fault_of(client.start, "", "true", "", {"on": {"gpu": "1"}})
        self.assertEqual((type(fault), str(fault)), (jobsched.Unavailable, "no online worker matches gpu=1"))

    def test_full_matching_worker_refuses_without_trying_others(self):
        scheduler, workers, client = self.labelled_cluster(slots=1)
        job_id = client.start("", "sleep", "", {"args": ["300"], "on": {"gpu": "1"}})
        self.addCleanup(client.stop, job_id)
        fault = fault_of(client.start, "", "true", "", {"on": {"gpu": "1"}})
        self.assertIsInstance(fault, jobsched.Unavailable)
        self.assertEqual(len(client.jobs()), 1)  # b and c had free slots but do not match


JOB_SCRIPTS = {
    # run --all --path out.sh -- sh: a and b print the same, c differs and ends without a newline
    "out.sh": {"a": "echo one; echo same; exit 0", "b": "echo one; echo same; exit 0",
               "c": "echo one; printf 'c partial'; exit 3"},
    "status.sh": {"a": "exit 0", "b": "echo b; exit 2", "c": "kill -KILL $$"},
    "wait.sh": {"a": "echo started; exec sleep 300", "b": "echo started; exec sleep 300",
                "c": "echo started; exec sleep 300"},
}


def finished(proc):
    """(status, stdout, stderr) of a process once it has ended, its output decoded."""
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out.decode(), err.decode()


class FanOutTest(ClusterTestCase):
    """start_all and run/start --all: each worker has its own jobs dir, so the same --path runs
    a different script on each (a, b and c share this host's name: prefixes are HOST/ID)."""

    LABELS = LabelsTest.LABELS

    def labelled_cluster(self, **worker_kwargs):
        self.jobs_dirs = {}
        for name in self.LABELS:
            self.jobs_dirs[name] = self.tempdir()
            for script, bodies in JOB_SCRIPTS.items():
                with open(os.path.join(self.jobs_dirs[name], script), "w") as f:
                    f.write(bodies[name] + "\n")
        scheduler = self.scheduler()
        workers = {name: self.worker(scheduler, labels=labels, jobs_dir=self.jobs_dirs[name],
                                     **worker_kwargs)
                   for name, labels in sorted(self.LABELS.items())}
        client = self.client(scheduler)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 3, message="workers to register")
        self.env = {"JOBSCHED_SCHEDULER": scheduler.address}
        self.names = {name: "%s/%s" % (socket.gethostname(), w.worker_id[:8]) for name, w in workers.items()}
        return scheduler, workers, client

    def run_all(self, *args):
        return self.cli("run", "--all", *args, env=self.env)

    def run_all_at_once(self, *commands):
        """`run --all ARGS` for each ARGS in commands, all at once: [(status, stdout, stderr)]."""
        procs = [popen_jobsched(self, ("run", "--all") + args, env=dict(os.environ, **self.env))
                 for args in commands]
        return [finished(proc) for proc in procs]

    def test_start_all_places_one_job_on_each_matching_worker(self):
        scheduler, workers, client = self.labelled_cluster()
        refusing = self.worker(scheduler, labels={"rack": "a"}, allow=["true"])
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 4, message="worker d")
        registered = [w["worker_id"] for w in client.workers()]  # the order of the answers
        answer = client.start_all("sh", "", {"args": ["-c", "echo $0", "x"], "on": {"rack": "a"}})
        rack_a = [worker_id for worker_id in registered if worker_id in (workers["a"].worker_id,
                                                                         workers["c"].worker_id)]
        self.assertEqual([e["worker_id"] for e in answer], rack_a + [refusing.worker_id])
        self.assertEqual({e["hostname"] for e in answer}, {socket.gethostname()})
        started, refused = answer[:2], answer[2]
        self.assertEqual(len({e["job_id"] for e in started}), 2)
        for entry in started:
            self.assertEqual(set(entry), {"worker_id", "hostname", "job_id"})
            self.assertEqual(scheduler._job_index.get(entry["job_id"]), entry["worker_id"])
            job = self.wait_done(client, entry["job_id"])
            self.assertEqual((job["worker_id"], job["state"]), (entry["worker_id"], "succeeded"))
            self.assertEqual(client.output(entry["job_id"])["data"], b"x\n")
        self.assertEqual(set(refused), {"worker_id", "hostname", "error"})
        self.assertIn("not allowed", refused["error"])
        self.assertEqual(len(client.start_all("true", "")), 4)
        fault = fault_of(client.start_all, "true", "", {"on": {"rack": "z"}})
        self.assertEqual((type(fault), str(fault)), (jobsched.Unavailable, "no online worker matches rack=z"))
        job_id = str(uuid.uuid4())
        self.assertIsInstance(fault_of(client.start_all, "true", "", {"job_id": job_id}), jobsched.BadRequest)
        self.assertIsInstance(fault_of(client.start_all, "true", "", {"on": {"a b": "1"}}),
                              jobsched.BadRequest)
        status, reply = http_call(scheduler.address, "POST", "/start_all",
                                  {"command": "true", "on": {"gpu": "*"}, "timeout": 60})
        self.assertEqual(status, 201, reply)
        self.assertEqual([e["worker_id"] for e in reply["jobs"]], [
            worker_id for worker_id in registered if worker_id in (workers["a"].worker_id,
                                                                   workers["b"].worker_id)])
        self.assertEqual(http_call(scheduler.address, "POST", "/start_all",
                                   {"command": "true", "on": {"gpu": "2"}}),
                         (503, {"error": "no online worker matches gpu=2"}))
        self.assertEqual(http_call(scheduler.address, "POST", "/start_all",
                                   {"command": "true", "worker_id": ""})[0], 400)

    def test_run_all_prefixes_every_line(self):
        scheduler, workers, client = self.labelled_cluster()
        (status, out, err), (one_status, one_out, one_err), (_, bare, _) = self.run_all_at_once(
            ("--path", "out.sh", "--", "sh"),
            ("--on", "ssd=yes", "--path", "out.sh", "--", "sh"),  # one worker: its host alone
            ("--no-prefix", "--on", "rack=*", "--path", "out.sh", "--", "sh"))
        self.assertEqual(status, 3, err)
        expected = sorted("%s: %s" % (self.names[name], line) for name, lines in (
            ("a", ["one", "same"]), ("b", ["one", "same"]), ("c", ["one", "c partial"]))
            for line in lines)
        self.assertEqual(sorted(out.splitlines()), expected)
        self.assertTrue(out.endswith("\n"))
        self.assertEqual(err, "jobsched: %s: exit status 3\n" % self.names["c"])
        host = socket.gethostname()
        self.assertEqual((one_status, one_out, one_err), (
            3, "%s: one\n%s: c partial\n" % (host, host), "jobsched: %s: exit status 3\n" % host))
        self.assertEqual(sorted(bare.splitlines()), sorted(["one", "same"] * 2 + ["one", "c partial"]))

    def test_run_all_exits_with_the_highest_status(self):
        scheduler, workers, client = self.labelled_cluster()
        (status, out, err), (ok_status, ok_out, ok_err) = self.run_all_at_once(
            ("--path", "status.sh", "--", "sh"), ("--on", "gpu=0", "--", "true"))
        self.assertEqual(status, 128 + 9, err)
        self.assertEqual(out, "%s: b\n" % self.names["b"])
        self.assertEqual(sorted(err.splitlines()), sorted([
            "jobsched: %s: exit status 2" % self.names["b"],
            "jobsched: %s: signal: killed" % self.names["c"]]))
        self.assertEqual((ok_status, ok_out, ok_err), (0, "", ""))

    def test_run_all_gather_groups_identical_outputs(self):
        scheduler, workers, client = self.labelled_cluster()
        result = self.run_all("--gather", "--path", "out.sh", "--", "sh")
        self.assertEqual(result.returncode, 3, result.stderr)
        first, second = sorted([",".join(sorted([self.names["a"], self.names["b"]])), self.names["c"]])
        groups = {self.names["c"]: "---- %s (exit 3) ----\none\nc partial\n" % self.names["c"]}
        groups[first if first != self.names["c"] else second] = (
            "---- %s (exit 0) ----\none\nsame\n" % ",".join(sorted([self.names["a"], self.names["b"]])))
        self.assertEqual(result.stdout.decode(), "".join(groups[key] for key in sorted(groups)))
        self.assertEqual(result.stderr.decode(), "jobsched: %s: exit status 3\n" % self.names["c"])

    def test_refusals_are_reported_and_start_all_prints_a_line_per_job(self):
        scheduler, workers, client = self.labelled_cluster()
        refusing = self.worker(scheduler, labels={"rack": "d"}, allow=["true"])
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 4, message="worker d")
        refused = "%s/%s: command 'sh' is not allowed on this worker\n" % (
            socket.gethostname(), refusing.worker_id[:8])
        env = dict(os.environ, **self.env)
        procs = [popen_jobsched(self, args, env=env) for args in (
            ("run", "--all", "--on", "rack=*", "--path", "status.sh", "--", "sh"),
            ("run", "--all", "--on", "rack=d", "--", "sh", "-c", "true"),
            ("start", "--all", "--on", "rack=*", "--", "true"),
            ("start", "--all", "--on", "rack=d", "--", "sh", "-c", "true"))]
        (status, _, err), (only_status, _, only_err), (start_status, out, start_err), \
            (refused_status, refused_out, refused_err) = [finished(proc) for proc in procs]
        self.assertEqual(status, 128 + 9, err)
        self.assertIn("jobsched: " + refused, err)
        self.assertEqual((only_status, only_err), (1, "jobsched: %s: " % socket.gethostname()
                                                   + refused.split(": ", 1)[1]))
        self.assertEqual(start_status, 0, start_err)
        lines = [line.split(" ") for line in out.splitlines()]
        self.assertEqual([line[1:] for line in lines], [[w["worker_id"], socket.gethostname()]
                                                        for w in client.workers()])
        for job_id, worker_id, _ in lines:
            self.assertEqual(self.wait_done(client, job_id)["worker_id"], worker_id)
        self.assertEqual((refused_status, refused_out), (1, ""))
        self.assertEqual(refused_err, "jobsched: %s: " % socket.gethostname() + refused.split(": ", 1)[1])

    def test_closed_stdout_stops_every_job(self):
        scheduler, workers, client = self.labelled_cluster()
        marker = uuid.uuid4().hex
        proc = popen_jobsched(self, ("run", "--all", "--", "sh", "-c",
                                     "while :; do echo tick; sleep 0.05; done", marker),
                              env=dict(os.environ, **self.env))
        read_until(proc, b"tick\n")
        proc.stdout.close()  # as `run --all ... | head -1` does
        self.assertEqual(proc.wait(timeout=30), 141)
        err = proc.stderr.read()
        self.assertNotIn(b"Traceback", err)
        self.assertNotIn(b"Exception", err)
        jobs = [j for j in client.jobs() if marker in j["args"]]
        self.assertEqual(len(jobs), 3)
        self.assertEqual({j["state"] for j in jobs}, {"stopped"})

    def test_a_worker_that_does_not_answer_has_an_unknown_outcome(self):
        scheduler, workers, client = self.labelled_cluster()
        scheduler.rpc_timeout = 1.0  # for the ghost's client and its retries
        refusing = socket.socket()  # bound, not listening: nothing was sent, nothing started
        self.addCleanup(refusing.close)
        refusing.bind(("127.0.0.1", 0))
        refuser = client.register("127.0.0.1:%d" % refusing.getsockname()[1],
                                  {"hostname": "refuser", "labels": {"rack": "refused"}})
        (entry,) = client.start_all("true", "", {"on": {"rack": "refused"}})
        self.assertEqual((entry["worker_id"], entry["hostname"]), (refuser, "refuser"))
        self.assertNotIn("job_id", entry)
        self.assertIn("cannot reach", entry["error"])
        client.deregister(refuser)
        silent = socket.socket()  # listening, never answering: the call cannot tell if it started
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        ghost = client.register("127.0.0.1:%d" % silent.getsockname()[1],
                                {"hostname": "ghost", "labels": {"rack": "gone"}})
        (entry,) = client.start_all("true", "", {"on": {"rack": "gone"}})
        self.assertEqual((entry["worker_id"], entry["hostname"]), (ghost, "ghost"))
        self.assertIn("outcome unknown: job %s may have started on worker %s" % (entry["job_id"], ghost),
                      entry["error"])
        self.assertEqual(scheduler._job_index.get(entry["job_id"]), ghost)
        status, out, err = self.run_all_at_once(("--on", "rack=*", "--path", "out.sh", "--", "sh"))[0]
        self.assertEqual(status, 255, err)
        self.assertEqual(len(out.splitlines()), 6)
        self.assertRegex(err, r"(?m)^jobsched: ghost: outcome unknown: job [-0-9a-f]{36} may have "
                              r"started on worker %s \(no answer from " % ghost)

    def test_bad_fan_out_command_lines_exit_2_and_start_nothing(self):
        scheduler, workers, client = self.labelled_cluster()
        cases = [("run", "--gather", "--", "true"), ("start", "--all"),
                 ("run", "--all", "--worker", workers["a"].worker_id, "--", "true"),
                 ("run", "--all", "--on", "gpu", "--", "true")]
        procs = [popen_jobsched(self, args, env=dict(os.environ, **self.env)) for args in cases]
        for args, proc in zip(cases, procs):
            out, err = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 2, (args, out, err))
            self.assertEqual(len(err.decode().strip().splitlines()), 1, (args, err))
        self.assertEqual(client.jobs(), [])

    def run_all_started(self, marker):
        """`jobsched run --all` of wait.sh (marked with marker), once its 3 jobs have started."""
        proc = popen_jobsched(self, ("run", "--all", "--path", "wait.sh", "--", "sh", marker),
                              env=dict(os.environ, **self.env))
        seen = b""
        while seen.count(b"started\n") < 3:
            seen += read_until(proc, b"started\n")
        return proc

    def test_run_all_ctrl_c_stops_every_job(self):
        scheduler, workers, client = self.labelled_cluster()
        marker = uuid.uuid4().hex
        proc = self.run_all_started(marker)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 128 + 15, err)
        self.assertNotIn(b"Traceback", err)
        jobs = [j for j in client.jobs() if marker in j["args"]]
        self.assertEqual(sorted(j["worker_id"] for j in jobs), sorted(w.worker_id for w in workers.values()))
        self.assertEqual({j["state"] for j in jobs}, {"stopped"})
        self.assertIn("jobsched: stopping 3 jobs", err.decode())
        for name in workers:
            self.assertIn("jobsched: %s: signal: terminated\n" % self.names[name], err.decode())

    def test_run_all_sigterm_and_sighup_stop_every_job(self):
        scheduler, workers, client = self.labelled_cluster()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            marker = uuid.uuid4().hex
            proc = self.run_all_started(marker)
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 128 + signum, err)
            self.assertNotIn(b"Traceback", err)
            jobs = [j for j in client.jobs() if marker in j["args"]]
            self.assertEqual(len(jobs), 3)
            self.assertEqual({j["state"] for j in jobs}, {"stopped"})


def append_job(path, text, **spec):
    """A submit() spec whose job appends the line text to path (unique markers show each run)."""
    return dict(spec, command="sh", args=["-c", 'echo "$1" >> "$2"', "sh", text, path])


def read_lines(path):
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


class QueueTest(ClusterTestCase):
    """The queue through the library: order, dependencies, arrays, pinning, cancel, failures,
    the submit contract, and what a restart on the same state dir keeps."""

    def queue_cluster(self, workers=1, slots=1):
        scheduler = self.scheduler(state_dir=self.tempdir())
        started = [self.worker(scheduler, slots=slots) for _ in range(workers)]
        client = self.client(scheduler)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == workers,
                   message="workers to register")
        return scheduler, started, client

    def test_jobs_that_together_are_over_a_workers_max_request_are_started_in_smaller_calls(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        self.worker(scheduler, slots=16, max_request=64 * 1024)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        env = {"PAD": "x" * 12000}  # 16 of them are three times the worker's limit
        ids = client.submit([{"command": "true", "env": env} for _ in range(16)]
                            + [{"command": "true", "env": {"A": "x" * 40000, "B": "x" * 40000}}])
        for job_id in ids[:16]:
            self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")
        alone = self.wait_done(client, ids[16])  # too large on its own: refused, once
        self.assertEqual(alone["state"], "failed")
        self.assertIn("larger than its --max-request (HTTP 413)", alone["error_text"])

    def test_a_job_over_one_workers_max_request_goes_to_another(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        small = self.worker(scheduler, slots=8, max_request=64 * 1024, labels={"rack": "a"})
        large = self.worker(scheduler, slots=1, labels={"rack": "b"})  # fewest free slots
        client = self.client(scheduler)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 2,
                   message="workers to register")
        env = {"A": "x" * 40000, "B": "x" * 40000}  # over the small worker's limit
        ids = client.submit([{"command": "true", "env": env},
                             {"command": "true", "env": env, "array": 2},
                             {"command": "true", "env": env, "on": {"rack": "a"}},
                             {"command": "true"}])
        for job_id in ids[:3]:
            job = self.wait_done(client, job_id)
            self.assertEqual((job["state"], job["worker_id"]), ("succeeded", large.worker_id), job)
        only_small = self.wait_done(client, ids[3])  # no other worker may take it: refused
        self.assertEqual((only_small["state"], only_small["worker_id"]), ("failed", small.worker_id))
        self.assertIn("larger than its --max-request (HTTP 413)", only_small["error_text"])
        self.assertEqual(self.wait_done(client, ids[4])["state"], "succeeded")
        # start (not queued) moves on to the next worker as well
        job_id = client.start("", "true", "", {"env": env})
        self.assertEqual(self.wait_done(client, job_id)["worker_id"], large.worker_id)

    def test_a_job_waits_for_the_one_worker_whose_max_request_it_fits(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        small = self.worker(scheduler, slots=4, max_request=64 * 1024)
        large = self.worker(scheduler, slots=1)
        client = self.client(scheduler)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 2,
                   message="workers to register")
        holder, release = self.hold_slot(client, worker_id=large.worker_id)
        env = {"A": "x" * 40000, "B": "x" * 40000}  # over the small worker's limit
        big, plain = client.submit([{"command": "true", "env": env}, {"command": "true"}])
        wait_until(lambda: "over their --max-request" in client.query(big).get("reason", ""),
                   message="the big job to wait for the large worker")
        queued = client.query(big)
        self.assertEqual(queued["state"], "queued")
        self.assertEqual(queued["reason"], "waiting for a free slot on a worker other than %s "
                                           "(over their --max-request)" % small.worker_id)
        self.assertEqual(self.wait_done(client, plain)["worker_id"], small.worker_id)  # not held up
        release()
        job = self.wait_done(client, big)
        self.assertEqual((job["state"], job["worker_id"]), ("succeeded", large.worker_id))

    def hold_slot(self, client, **spec):
        """Queue a job that keeps its slot until the returned release() is called."""
        gate = os.path.join(self.tempdir(), "gate")
        (job_id,) = client.submit([dict(spec, command="sh", args=[
            "-c", 'while [ ! -e "$1" ]; do sleep 0.02; done', "sh", gate])])
        release = functools.partial(open, gate, "a")
        self.addCleanup(lambda: release().close())
        wait_until(lambda: client.query(job_id)["state"] == "running", message="the holder to run")
        return job_id, lambda: release().close()

    def test_priority_then_submission_order_on_one_slot(self):
        _, _, client = self.queue_cluster()
        holder, release = self.hold_slot(client, name="holder", priority=7)
        running = client.query(holder)
        self.assertEqual((running["state"], running["name"], running["priority"]), ("running", "holder", 7))
        self.assertIn("submitted_at", running)
        out = os.path.join(self.tempdir(), "order")
        names = ["low", "high-1", "mid", "high-2", "negative"]
        ids = client.submit([append_job(out, name, name=name, priority=priority)
                             for name, priority in zip(names, [0, 5, 1, 5, -1])])
        self.assertEqual(len(set(ids)), 5)
        queued = [job for job in client.jobs() if job["state"] == "queued"]
        self.assertEqual([job["name"] for job in queued], ["high-1", "high-2", "mid", "low", "negative"])
        self.assertEqual([job["position"] for job in queued], [1, 2, 3, 4, 5])
        job = client.query(ids[0])
        self.assertEqual(set(job), {"job_id", "worker_id", "command", "path", "args", "name",
                                    "priority", "after", "state", "done", "error", "error_text",
                                    "submitted_at", "position", "reason"})
        self.assertEqual((job["state"], job["done"], job["position"], job["reason"], job["args"][3]),
                         ("queued", False, 4, "waiting for a free slot", "low"))
        output = client.output(ids[0], 0, 100, 0.2)  # waits, then: nothing yet, not the end
        self.assertEqual((output["data"], output["eof"]), (b"", False))
        release()
        for job_id in ids:
            self.assertEqual(self.wait_done(client, job_id)["state"], "succeeded")
        self.assertEqual(read_lines(out), ["high-1", "high-2", "mid", "low", "negative"])
        job = client.query(ids[1])
        self.assertEqual((job["name"], job["priority"], job["exit_code"]), ("high-1", 5, 0))
        self.assertIn("submitted_at", job)

    def test_dependencies_chain_and_failure_cascade(self):
        _, _, client = self.queue_cluster(slots=4)
        out = os.path.join(self.tempdir(), "chain")
        first, release = self.hold_slot(client)
        (a,) = client.submit([append_job(out, "a", after=[first])])
        (b,) = client.submit([append_job(out, "b", after=[a])])
        (c,) = client.submit([append_job(out, "c", after=[first, b])])
        self.assertEqual(client.query(b)["reason"], "waiting for %s" % a)
        self.assertEqual(client.query(c)["reason"], "waiting for %s" % first)
        self.assertEqual(client.query(c)["after"], [first, b])
        release()
        self.assertEqual(self.wait_done(client, c)["state"], "succeeded")
        self.assertEqual(read_lines(out), ["a", "b", "c"])

        (failing,) = client.submit([{"command": "sh", "args": ["-c", "exit 3"]}])
        (g,) = client.submit([append_job(out, "g", after=[failing])])
        (h,) = client.submit([append_job(out, "h", after=[g]), append_job(out, "i", array=2, after=[g])])[:1]
        job = self.wait_done(client, h)
        self.assertEqual((job["state"], job["done"], job["error"], job["error_text"]),
                         ("cancelled", True, True, "cancelled: dependency %s ended cancelled" % g))
        self.assertEqual(client.query(g)["error_text"], "cancelled: dependency %s ended failed" % failing)
        (late,) = client.submit([{"command": "true", "after": [failing]}])  # ended already
        self.assertEqual(self.wait_done(client, late)["state"], "cancelled")
        output = client.output(g, 0, 100, 5)
        self.assertEqual((output["data"], output["eof"]), (b"", True))

        started = client.start("", "sh", "", {"args": ["-c", "exit 4"]})  # not from the queue
        (d,) = client.submit([{"command": "true", "after": [started]}])
        self.assertEqual(self.wait_done(client, d)["error_text"],
                         "cancelled: dependency %s ended failed" % started)
        self.assertEqual(read_lines(out), ["a", "b", "c"])

        before = len(client.jobs())
        unknown = str(uuid.uuid4())
        error = fault_of(client.submit, [{"command": "true"}, {"command": "true", "after": [unknown]}])
        self.assertIsInstance(error, jobsched.NotFound)
        self.assertEqual(str(error), "jobs[1].after: unknown job %s" % unknown)
        self.assertEqual(len(client.jobs()), before)  # all or nothing

    def test_array_jobs_get_their_index(self):
        _, _, client = self.queue_cluster(slots=4)
        ids = client.submit([{"command": "sh", "args": ["-c", "echo $JOBSCHED_ARRAY_INDEX"],
                              "array": 5, "name": "sweep"}])
        self.assertEqual(len(set(ids)), 5)
        for index, job_id in enumerate(ids):
            self.assertEqual(str(uuid.UUID(job_id)), job_id)
            job = self.wait_done(client, job_id)
            self.assertEqual((job["state"], job["name"]), ("succeeded", "sweep"))
            self.assertEqual(client.output(job_id)["data"], b"%d\n" % index)

    def test_pinned_jobs_wait_for_their_worker_without_holding_up_others(self):
        scheduler, (w1, w2), client = self.queue_cluster(workers=2)
        out = os.path.join(self.tempdir(), "pinned")
        _, release = self.hold_slot(client, worker_id=w1.worker_id)
        pinned, free = client.submit([append_job(out, "pinned", worker_id=w1.worker_id),
                                      append_job(out, "free")])
        self.assertEqual(self.wait_done(client, free)["worker_id"], w2.worker_id)
        job = client.query(pinned)
        self.assertEqual((job["state"], job["worker_id"], job["reason"]),
                         ("queued", w1.worker_id, "waiting for a free slot"))
        release()
        self.assertEqual(self.wait_done(client, pinned)["worker_id"], w1.worker_id)
        w2.close()  # deregisters: offline
        (offline,) = client.submit([append_job(out, "offline", worker_id=w2.worker_id)])
        self.assertEqual(client.query(offline)["reason"], "waiting for worker %s (offline)" % w2.worker_id)
        error = fault_of(client.submit, [{"command": "true", "worker_id": "no-such-worker"}])
        self.assertIsInstance(error, jobsched.NotFound)
        self.assertEqual(str(error), "jobs[0].worker_id: worker not found: 'no-such-worker'")

    def test_stop_cancels_queued_jobs_and_array_elements(self):
        _, _, client = self.queue_cluster()
        out = os.path.join(self.tempdir(), "cancel")
        _, release = self.hold_slot(client)
        single, = client.submit([append_job(out, "single")])
        array = client.submit([{"command": "sh", "args": ["-c", 'echo "a$JOBSCHED_ARRAY_INDEX" >> "$1"',
                                                          "sh", out], "array": 3}])
        self.assertIs(client.stop(single), True)
        self.assertIs(client.stop(array[1]), True)
        self.assertIs(client.stop(single), True)  # again: still true
        job = client.query(single)
        self.assertEqual((job["state"], job["done"], job["error"], job["error_text"]),
                         ("cancelled", True, True, "cancelled"))
        output = client.output(single, 0, 100, 5)
        self.assertEqual((output["data"], output["eof"]), (b"", True))
        self.assertEqual(client.query(array[2])["position"], 2)
        listed = {job["job_id"]: job["state"] for job in client.jobs()}
        self.assertEqual((listed[single], listed[array[1]], listed[array[0]]), ("cancelled", "cancelled", "queued"))
        release()
        self.assertEqual([self.wait_done(client, j)["state"] for j in array],
                         ["succeeded", "cancelled", "succeeded"])
        self.assertEqual(read_lines(out), ["a0", "a2"])

    def test_a_job_its_worker_cannot_start_fails_without_exit_code(self):
        _, (worker,), client = self.queue_cluster()
        (job_id,) = client.submit([{"command": "/nonexistent/jobsched-test"}])
        job = self.wait_done(client, job_id)
        self.assertEqual((job["state"], job["done"], job["error"], job["worker_id"]),
                         ("failed", True, True, worker.worker_id))
        self.assertTrue(job["error_text"].startswith("cannot start '/nonexistent/jobsched-test'"), job)
        self.assertNotIn("exit_code", job)
        self.assertEqual(client.output(job_id)["eof"], True)
        self.assertEqual(client.wait([job_id], 1), [{"job_id": job_id, "state": "failed"}])

    def test_a_submit_served_after_close_is_refused_not_lost(self):
        # close() stops accepting, but a kept-alive connection's thread may still read one more
        # request (here it waits 5 s for it): that submit must not be acknowledged unwritten.
        state_dir = self.tempdir()
        scheduler = self.scheduler(state_dir=state_dir)
        scheduler.server.park_after = 5.0
        client = self.client(scheduler)
        (before,) = client.submit([{"command": "true"}])
        reporter = jobsched.RPCClient(scheduler.address)  # a worker's kept-alive connection
        reporter.call("info")
        scheduler.close()
        error = fault_of(client.submit, [{"command": "true"}])
        self.assertIsInstance(error, jobsched.Unavailable)
        self.assertIn("shutting down: nothing was done", str(error))
        error = fault_of(client.stop, before)
        self.assertIsInstance(error, jobsched.Unavailable)
        # A worker's report of an end is refused too: the worker keeps it for the next scheduler.
        error = fault_of(reporter.call, "job_ended", "w1", [{"job_id": before, "state": "failed"}])
        self.assertIsInstance(error, jobsched.Unavailable)
        self.assertIn("shutting down: nothing was done", str(error))
        reporter.close()
        client.close()
        again = self.client(self.scheduler(state_dir=state_dir))
        self.assertEqual(again.query(before)["state"], "queued")  # no worker: still waiting

    def test_a_submit_sent_again_with_its_job_ids_queues_each_job_once(self):
        state_dir = self.tempdir()
        scheduler = self.scheduler(state_dir=state_dir)
        client = self.client(scheduler)  # no worker: every job stays queued
        one = str(uuid.uuid4())
        array = str(uuid.uuid4())[:24] + "000000000000"
        specs = [{"command": "true", "job_id": one},
                 {"command": "echo", "args": ["x"], "array": 3, "job_id": array.upper()}]
        ids = [one] + [array[:24] + "%012x" % i for i in range(3)]
        self.assertEqual(client.submit(specs), ids)
        self.assertEqual(client.submit(specs), ids)  # its answer was lost: sent again
        (other,) = client.submit([{"command": "true"}])  # made by the scheduler, as before
        inside = str(uuid.uuid4())[:24]  # a single job, then an array whose range holds its id
        client.submit([{"command": "true", "job_id": inside + "000000000002"}])
        error = fault_of(client.submit, [{"command": "true", "array": 3,
                                          "job_id": inside + "000000000000"}])
        self.assertEqual(str(error), "job_id %s000000000002 is taken by another job: give each "
                                     "job a new UUID" % inside)
        self.assertEqual(client.submit(specs[:1] + [{"command": "true"}])[0], one)
        self.assertEqual(len(client.jobs()), 7)
        cases = [
            ([{"command": "false", "job_id": one}], "job_id %s is taken by another job" % one),
            ([{"command": "false", "job_id": other}], "job_id %s is taken by another job" % other),
            ([{"command": "true", "job_id": array}], "job_id %s is taken by another job" % array),
            ([{"command": "true", "job_id": "x"}], "jobs[0].job_id must be a UUID, not 'x'"),
            ([{"command": "true", "array": 2, "job_id": one}],
             "jobs[0].job_id of an array must end in -000000000000"),
            ([{"command": "true", "all": True, "job_id": array}],
             "jobs[0].job_id cannot be given with all"),
            ([{"command": "true", "job_id": array[:24] + "00000000000a"}] * 2,
             "a job_id is given twice in one submit"),
            ([{"command": "true", "array": 2, "job_id": other[:24] + "000000000000"}],
             "job_id %s is taken by another job" % other),  # the id of its index 0
            ([{"command": "true", "array": 9, "job_id": array[:24] + "000000000000"}],
             "job_id %s is taken by another job" % array),
        ]
        for jobs, message in cases:
            with self.subTest(jobs=jobs):
                error = fault_of(client.submit, jobs)
                self.assertIsInstance(error, jobsched.BadRequest)
                self.assertEqual(str(error)[:len(message)], message)
        self.assertEqual(len(client.jobs()), 7)
        client.close()
        scheduler.close()
        # The journal keeps the ids given: after a restart, the same submit is still a retry.
        again = self.client(self.scheduler(state_dir=state_dir))
        self.assertEqual(again.submit(specs), ids)
        self.assertEqual(len(again.jobs()), 7)
        self.assertEqual(again.query(array[:24] + "000000000002")["args"], ["x"])

    def reopened(self, queue, state_dir, rewrite=False):
        """queue closed (its journal rewritten first if rewrite) and opened again: a restart."""
        if rewrite:
            with queue.journal_lock:
                queue._compact()
        queue.close()
        queue = jobsched.JobQueue(state_dir)
        self.addCleanup(queue.close)
        return queue

    def short_history(self, n):
        self.addCleanup(setattr, jobsched, "QUEUE_HISTORY", jobsched.QUEUE_HISTORY)
        jobsched.QUEUE_HISTORY = n  # the ended jobs the queue remembers

    def end_one(self, queue, worker_id, count=1):
        """Hand count jobs to worker_id's slots (JobQueue directly) and report them ended."""
        starts, _ = queue.plan([(worker_id, count, {})])
        jobs = starts[worker_id]
        queue.started(worker_id, jobs, [job.job_id for job in jobs])
        queue.jobs_ended(worker_id, [{"job_id": job.job_id, "state": "succeeded"} for job in jobs])
        return [job.job_id for job in jobs]

    def test_jobs_too_large_for_the_free_workers_wait_apart_without_holding_up_others(self):
        queue = jobsched.JobQueue()
        self.addCleanup(queue.close)
        big = queue.submit([{"command": "big"} for _ in range(3)], {})
        big += queue.submit([{"command": "big", "array": 2}], {})
        big[3:] = [big[3] + "000000000000", big[3] + "000000000001"]
        starts, _ = queue.plan([("small", 8, {}), ("large", 1, {})])
        self.assertEqual([job.job_id for job in starts["small"]], big)  # most free slots
        refusal = jobsched._TooLarge("small refused the request: larger than its --max-request")
        queue.started("small", starts["small"], [refusal] * 5)  # "large" may take them: queued
        self.assertEqual(len(queue), 5)
        (plain,) = queue.submit([{"command": "plain"}], {})
        for round_n in range(3):  # "large" is full: the big jobs wait apart, the plain one goes
            starts, _ = queue.plan([("small", 8, {}), ("large", 0, {})])
            self.assertEqual({w: [job.job_id for job in jobs] for w, jobs in starts.items()},
                             {"small": [plain]} if round_n == 0 else {})
        self.assertEqual(sum(len(items) for items in queue._parked.values()), 5)
        struct = queue.describe(big[0], {"small": {}, "large": {}})[0]
        self.assertEqual((struct["state"], struct["reason"]), ("queued", (
            "waiting for a free slot on a worker other than small (over their --max-request)")))
        struct = queue.describe(big[0], {"small": {}})[0]  # "large" went offline: it waits
        self.assertEqual(struct["reason"], "no online worker takes it: over the --max-request "
                                           "of small")
        taken = []
        for left in range(4, -1, -1):  # "large" has a free slot again: each big job once, in
            starts, _ = queue.plan([("small", 8, {}), ("large", 1, {})])  # order, one a round
            (job,) = starts["large"]
            self.assertNotIn("small", starts)
            self.assertEqual(sum(len(items) for items in queue._parked.values()), left)
            queue.started("large", [job], [job.job_id])
            queue.jobs_ended("large", [{"job_id": job.job_id, "state": "succeeded"}])
            taken.append(job.job_id)
        self.assertEqual(taken, big)
        self.assertEqual((len(queue), queue._parked), (0, {}))

    def test_a_cancelled_parked_job_is_let_go(self):
        queue = jobsched.JobQueue()
        self.addCleanup(queue.close)
        big = queue.submit([{"command": "big"} for _ in range(3)], {})
        starts, _ = queue.plan([("small", 8, {}), ("large", 0, {})])
        refusal = jobsched._TooLarge("small refused the request: larger than its --max-request")
        queue.started("small", starts["small"], [refusal] * 3)
        queue.plan([("small", 8, {}), ("large", 0, {})])  # parked: "large" is full
        self.assertEqual(sum(len(items) for items in queue._parked.values()), 3)
        for job_id in big:  # "large" never comes back: its jobs are stopped
            self.assertIs(queue.cancel(job_id), True)
        queue.plan([("small", 8, {})])
        self.assertEqual((len(queue), queue._parked), (0, {}))

    def test_an_array_sent_again_once_its_first_job_is_forgotten_is_not_queued_again(self):
        self.short_history(3)
        queue = jobsched.JobQueue(self.tempdir())
        self.addCleanup(queue.close)
        array = {"command": "echo", "array": 3, "worker_id": "w1",
                 "job_id": str(uuid.uuid4())[:24] + "000000000000"}
        queue.submit([dict(array)], {})
        self.assertEqual(self.end_one(queue, "w1"), [array["job_id"]])
        for _ in range(3):  # three more ends: index 0 leaves the history
            queue.submit([{"command": "true", "worker_id": "w2"}], {})
            self.end_one(queue, "w2")
        self.assertFalse(queue.knows(array["job_id"]))
        queue.submit([dict(array)], {})
        self.assertEqual(len(queue), 2)  # indices 1 and 2, once each
        starts, _ = queue.plan([("w1", 10, {})])
        self.assertEqual(sorted(job.index for job in starts["w1"]), [1, 2])

    def test_a_forgotten_job_id_given_again_is_queued_and_survives_compaction_and_restart(self):
        self.short_history(2)
        state_dir = self.tempdir()
        queue = jobsched.JobQueue(state_dir)
        x, y = str(uuid.uuid4()), str(uuid.uuid4())
        for job_id in (y, x):
            queue.submit([{"command": "true", "job_id": job_id, "worker_id": "w1"}], {})
        starts, _ = queue.plan([("w1", 2, {})])
        queue.started("w1", starts["w1"], [job.job_id for job in starts["w1"]])
        for job_id in (x, y):  # x ends first: it is forgotten first
            queue.jobs_ended("w1", [{"job_id": job_id, "state": "succeeded"}])
        with queue.journal_lock:
            queue._compact()  # as when the journal has grown
        queue.submit([{"command": "true", "worker_id": "w2"}], {})
        self.end_one(queue, "w2")
        self.assertFalse(queue.knows(x))
        self.assertTrue(queue.knows(y))
        queue.submit([{"command": "true", "job_id": x, "worker_id": "w1"}], {})  # acknowledged
        queue.submit([{"command": "true", "job_id": y, "worker_id": "w1"}], {})  # a retry
        self.assertEqual((len(queue), queue.describe(x)[0]["state"]), (1, "queued"))
        queue = self.reopened(queue, state_dir)
        self.assertEqual((len(queue), queue.describe(x)[0]["state"]), (1, "queued"))
        self.assertEqual(queue.describe(y)[0]["state"], "succeeded")

    def test_a_restarted_queue_counts_the_bytes_to_keep_as_the_running_one_did(self):
        # The count decides when the journal is rewritten. Replaying a journal whose history
        # forgot its oldest jobs must not subtract them: it never counted them.
        self.short_history(8)  # the array and its jobs, then the cancelled one: remembered
        state_dir = self.tempdir()
        queue = jobsched.JobQueue(state_dir)
        for _ in range(8):  # specs of some size: their bytes are most of a rewrite's
            queue.submit([{"command": "true", "args": ["x" * 2000], "worker_id": "w1"}], {})
            self.end_one(queue, "w1")
        # An array's spec is in each of its jobs' records, however small the entries beside it.
        queue.submit([{"command": "true", "args": ["y" * 3000], "array": 6, "worker_id": "w1"}], {})
        self.end_one(queue, "w1", 6)
        queue.submit([{"command": "sleep", "args": ["9"], "worker_id": "w2"},
                      {"command": "x", "array": 4, "worker_id": "w3"}], {})
        (cancelled,) = queue.submit([{"command": "c", "worker_id": "w4"}], {})
        queue.cancel(cancelled)
        running = queue._live_bytes
        self.assertEqual(queue._bytes_to_keep(), running)
        queue = self.reopened(queue, state_dir)
        self.assertEqual(queue._live_bytes, running)
        # From a rewritten journal, whose lines carry each remembered job's spec: about its size.
        queue = self.reopened(queue, state_dir, rewrite=True)
        size = os.path.getsize(os.path.join(state_dir, "queue.journal"))
        self.assertLess(abs(queue._live_bytes - size), size / 10, (queue._live_bytes, size))

    def test_a_rewritten_journal_keeps_the_history_in_its_order(self):
        # The same steps on two queues, one of them compacted and restarted half way: each step
        # after that must find the same ids known, and the same submits sent again answered.
        self.short_history(4)
        one = str(uuid.uuid4())
        array = {"command": "k", "array": 2, "job_id": str(uuid.uuid4())[:24] + "000000000000"}
        cancelled = {"command": "c", "worker_id": "w9", "job_id": str(uuid.uuid4())}
        states = []
        for restart in (False, True):
            state_dir = self.tempdir()
            queue = jobsched.JobQueue(state_dir)
            queue.submit([{"command": "true", "job_id": one, "worker_id": "w1"}], {})
            self.end_one(queue, "w1")                            # history: one
            queue.submit([dict(array)], {})
            self.end_one(queue, "w1")                            # the array used up, index 0
            queue.cancel(array["job_id"][:24] + "000000000001")  # its index 1 cancelled
            queue.submit([dict(cancelled)], {})
            queue.cancel(cancelled["job_id"])
            if restart:
                with queue.journal_lock:
                    queue._compact()
                queue.close()
                queue = jobsched.JobQueue(state_dir)
            seen = []
            for _ in range(4):  # each end forgets the oldest item of the history
                seen.append([queue.knows(job_id) for job_id in (one, array["job_id"],
                                                                cancelled["job_id"])])
                queue.submit([dict(array), dict(cancelled)], {})  # sent again: answered
                seen.append(len(queue))
                (other,) = queue.submit([{"command": "x", "worker_id": "w9"}], {})
                queue.cancel(other)
            queue.close()
            states.append(seen)
        self.assertEqual(states[1], states[0])
        # (one is forgotten first; the array is answered by its entry until that goes too)
        self.assertEqual(states[0], [[False, True, True], 0, [False, False, True], 0,
                                     [False, False, True], 0, [False, False, True], 2])

    def test_a_restarted_queue_keeps_the_order_of_jobs_and_of_what_it_remembers(self):
        self.short_history(3)
        for compact in (False, True):
            with self.subTest(compact=compact):
                state_dir = self.tempdir()
                queue = jobsched.JobQueue(state_dir)
                # A job refused as full is back in the queue; a later one must come after it.
                (old,) = queue.submit([{"command": "old", "worker_id": "w1"}], {})
                starts, _ = queue.plan([("w1", 1, {})])
                queue.started("w1", starts["w1"], [{"faultCode": 3, "faultString": "full"}])
                # Two ends, each causing a cancel: remembered end, cancel, end, cancel.
                d1, d2, e1, e2 = (str(uuid.uuid4()) for _ in range(4))
                queue.submit([{"command": "d", "job_id": d1, "worker_id": "w2"},
                              {"command": "d", "job_id": d2, "worker_id": "w2"},
                              {"command": "e", "job_id": e1, "after": [d1]},
                              {"command": "e", "job_id": e2, "after": [d2]}], {})
                starts, _ = queue.plan([("w2", 2, {})])
                queue.started("w2", starts["w2"], [d1, d2])
                queue.jobs_ended("w2", [{"job_id": d1, "state": "failed"},
                                        {"job_id": d2, "state": "failed"}])
                # A job whose dependency had succeeded before it came: met for good.
                (dep,) = self.end_one_submitted(queue, "w2")
                (met,) = queue.submit([{"command": "m", "after": [dep], "worker_id": "w9"}], {})
                queue = self.reopened(queue, state_dir, rewrite=compact)
                # remembered: d1, e1, d2, e2, dep; the last three are kept
                self.assertEqual([queue.knows(job_id) for job_id in (d1, d2, e1, e2)],
                                 [False, True, False, True])
                (new,) = queue.submit([{"command": "new", "worker_id": "w1"}], {})
                starts, _ = queue.plan([("w1", 2, {}), ("w9", 1, {})])
                self.assertEqual([job.job_id for job in starts["w1"]], [old, new])
                self.assertEqual([job.job_id for job in starts["w9"]], [met])

    def test_a_restart_after_a_rewrite_numbers_new_jobs_after_the_old_ones(self):
        state_dir = self.tempdir()
        queue = jobsched.JobQueue(state_dir)
        (old,) = queue.submit([{"command": "old"}], {})
        starts, _ = queue.plan([("w1", 1, {})])
        queue.started("w1", starts["w1"], [{"faultCode": 3, "faultString": "full"}])
        queue = self.reopened(queue, state_dir, rewrite=True)  # old's job, no entry waiting
        (new,) = queue.submit([{"command": "new"}], {})
        starts, _ = queue.plan([("w1", 1, {})])
        self.assertEqual([job.job_id for job in starts["w1"]], [old])
        queue.started("w1", starts["w1"], [{"faultCode": 3, "faultString": "full"}])
        queue.try_again("w1")
        starts, _ = queue.plan([("w1", 2, {})])
        self.assertEqual([job.job_id for job in starts["w1"]], [old, new])

    def test_a_dependency_met_before_submit_stays_met_once_forgotten(self):
        self.short_history(2)
        state_dir = self.tempdir()
        queue = jobsched.JobQueue(state_dir)
        (dep,) = self.end_one_submitted(queue, "w1")
        (job,) = queue.submit([{"command": "e", "after": [dep], "worker_id": "w9"}], {})
        for _ in range(2):  # dep leaves the history
            self.end_one_submitted(queue, "w1")
        queue = self.reopened(queue, state_dir)
        self.assertFalse(queue.knows(dep))
        starts, _ = queue.plan([("w9", 1, {})])
        self.assertEqual([job.job_id for job in starts["w9"]], [job])
        self.assertEqual(list(queue.dependencies_to_ask()), [])

    def test_a_dependency_met_stays_met_once_forgotten_while_another_is_waited_for(self):
        self.short_history(2)
        for compact in (False, True):
            with self.subTest(compact=compact):
                state_dir = self.tempdir()
                queue = jobsched.JobQueue(state_dir)
                (first,) = queue.submit([{"command": "d", "worker_id": "w1"}], {})
                (second,) = queue.submit([{"command": "d", "worker_id": "w2"}], {})
                (job,) = queue.submit([{"command": "e", "after": [first, second],
                                        "worker_id": "w9"}], {})
                self.assertEqual(self.end_one(queue, "w1"), [first])
                for _ in range(2):  # first leaves the history
                    self.end_one_submitted(queue, "w3")
                queue = self.reopened(queue, state_dir, rewrite=compact)
                self.assertFalse(queue.knows(first))
                self.assertEqual(list(queue.dependencies_to_ask()), [])
                self.assertEqual(self.end_one(queue, "w2"), [second])
                starts, _ = queue.plan([("w9", 1, {})])
                self.assertEqual([job.job_id for job in starts["w9"]], [job])

    def test_the_queue_says_why_a_job_waits_when_asked_without_online_workers(self):
        queue = jobsched.JobQueue(self.tempdir())  # as a library caller may use it
        self.addCleanup(queue.close)
        (job_id,) = queue.submit([{"command": "x", "on": {"gpu": "1"}}], {})
        self.assertEqual(queue.describe(job_id)[0]["reason"], "no online worker matches gpu=1")
        self.assertEqual([job["job_id"] for job in queue.listing()[0]], [job_id])

    def end_one_submitted(self, queue, worker_id):
        queue.submit([{"command": "true", "worker_id": worker_id}], {})
        return self.end_one(queue, worker_id)

    def test_a_job_id_of_a_job_started_without_the_queue_is_refused(self):
        scheduler, (worker,), c = self.cluster(workers=1)
        running = c.start("", "sleep", "", {"args": ["30"]})
        self.addCleanup(c.stop, running)
        ended = c.start("", "true", "")
        for job_id in (running, ended, ended):  # and once its end has been reported
            error = fault_of(c.submit, [{"command": "true", "job_id": job_id}])
            self.assertIsInstance(error, jobsched.BadRequest)
            self.assertRegex(str(error), r"job_id %s is taken by (another job|a job placed on "
                                         r"worker %s)" % (job_id, worker.worker_id))
            wait_until(lambda: c.wait([ended], 0), message="the end to be reported")

    def test_a_pinned_job_sent_again_to_a_restarted_scheduler_is_found_not_refused(self):
        state_dir = self.tempdir()
        scheduler = self.scheduler(state_dir=state_dir)
        worker = self.worker(scheduler, heartbeat=30.0)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        (dep,) = client.submit([{"command": "sleep", "args": ["30"]}])
        self.addCleanup(lambda: fault_of(self.client(worker).stop, dep))
        spec = {"command": "true", "worker_id": worker.worker_id, "after": [dep],
                "job_id": str(uuid.uuid4())}
        self.assertEqual(client.submit([spec]), [spec["job_id"]])
        client.close()
        scheduler.close()
        # Its worker has not registered again yet: the spec was checked when it was queued.
        again = self.client(self.scheduler(state_dir=state_dir))
        self.assertEqual(again.submit([spec]), [spec["job_id"]])
        error = fault_of(again.submit, [dict(spec, job_id=str(uuid.uuid4()))])
        self.assertIsInstance(error, jobsched.NotFound)  # a new job is checked as before

    def test_submit_refuses_bad_specs_naming_them(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        client = self.client(scheduler)
        cases = [
            ("x", "jobs must be an array of job specs"),
            ([{"command": "true", "bogus": 1}], "jobs[0]: unknown field 'bogus'"),
            ([{"command": "true"}, {"args": []}], "jobs[1].command is required"),
            ([{"command": "true", "array": 0}], "jobs[0].array must be a finite number >= 1"),
            ([{"command": "true", "array": 100001}], "jobs[0].array must be at most 100000"),
            ([{"command": "true", "array": 60000}] * 2, "at most 100000 jobs per submit"),
            ([{"command": "true", "priority": "high"}], "jobs[0].priority must be a number, not str"),
            ([{"command": "true", "after": ["nope"]}], "jobs[0].after[0] must be a UUID, not 'nope'"),
            ([{"command": "true", "env": {"A=B": "c"}}], "jobs[0].env name 'A=B' must not contain '='"),
            ([{"command": "true", "timeout": 0}], "jobs[0].timeout must be a finite number >= 0.001"),
        ]
        for jobs, message in cases:
            with self.subTest(jobs=jobs):
                error = fault_of(client.submit, jobs)
                self.assertIsInstance(error, jobsched.BadRequest)
                self.assertEqual(str(error)[:len(message)], message)
        self.assertEqual(client.jobs(), [])
        self.assertEqual(client.submit([]), [])
        status, reply = http_call(scheduler.address, "POST", "/submit",
                                  {"jobs": [{"command": "true", "array": 2}, {"command": "true"}]})
        self.assertEqual((status, len(reply["job_ids"])), (201, 3))
        status, reply = http_call(scheduler.address, "POST", "/submit", {"jobs": [{}]})
        self.assertEqual((status, reply), (400, {"error": "jobs[0].command is required"}))
        self.assertEqual([job["state"] for job in client.jobs()], ["queued"] * 3)

    def test_restart_keeps_order_priorities_dependencies_and_cancels(self):
        state_dir = self.tempdir()
        first = jobsched.Scheduler("127.0.0.1:0", state_dir=state_dir).start_serving()
        client = jobsched.Client(first.address)
        (a,) = client.submit([{"command": "true", "name": "a"}])
        ids = client.submit([{"command": "echo", "args": ["x y"], "priority": 3, "array": 2},
                             {"command": "true", "after": [a], "env": {"K": "v"}, "cwd": "/",
                              "timeout": 5, "path": "p"},
                             {"command": "true", "priority": -2}])
        client.stop(ids[3])
        before = client.jobs()
        client.close()
        first.close()
        again = self.scheduler(state_dir=state_dir)
        self.assertEqual(self.client(again).jobs(), before)
        self.assertEqual([job["state"] for job in before], ["queued"] * 4 + ["cancelled"])
        self.assertEqual([job["job_id"] for job in before[:4]], ids[:2] + [a, ids[2]])

    def test_second_scheduler_on_a_state_dir_exits_2(self):
        state_dir = self.tempdir()
        self.spawn("scheduler", "--listen", "127.0.0.1:0", "--state-dir", state_dir)
        done = self.cli("scheduler", "--listen", "127.0.0.1:0", "--state-dir", state_dir)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("state dir %s is in use by another scheduler" % state_dir, done.stderr.decode())
        self.assertEqual(stat.S_IMODE(os.stat(state_dir).st_mode), 0o700)

    def test_journal_is_compacted_and_keeps_what_is_live(self):
        for name, value in (("COMPACT_MIN_BYTES", 4096), ("QUEUE_HISTORY", 10)):
            self.addCleanup(setattr, jobsched, name, getattr(jobsched, name))
            setattr(jobsched, name, value)
        state_dir = self.tempdir()
        journal = os.path.join(state_dir, "queue.journal")
        scheduler = jobsched.Scheduler("127.0.0.1:0", state_dir=state_dir).start_serving()
        self.addCleanup(scheduler.close)
        self.worker(scheduler, slots=4)
        worker = self.worker(scheduler, slots=1)  # its one slot is held below
        client = self.client(scheduler)
        wait_until(lambda: len(client.workers()) == 2, message="the workers to register")
        sizes = []
        for _ in range(6):
            ids = client.submit([{"command": "true", "name": "batch"}] * 20)
            for job_id in ids:
                self.wait_done(client, job_id)
            sizes.append(os.path.getsize(journal))
        self.assertLess(max(sizes), 8 * 4096, sizes)  # rewritten: 120 jobs wrote more than that
        _, release = self.hold_slot(client, worker_id=worker.worker_id)
        waiting = client.submit([{"command": "true", "priority": 2, "worker_id": worker.worker_id},
                                 {"command": "true", "array": 3, "worker_id": worker.worker_id}])
        client.stop(waiting[2])
        last_done = ids[-1]
        with open(journal, "rb") as f:
            lines = f.read().splitlines()
        self.assertTrue(any(line.startswith(b'{"j":') for line in lines))  # a rewritten journal
        before = [client.query(job_id) for job_id in waiting + [last_done]]
        scheduler.close()
        again = self.scheduler(state_dir=state_dir)  # no worker registered yet: from the journal
        after = [self.client(again).query(job_id) for job_id in waiting + [last_done]]
        for job in before:  # the reason changes: the pinned worker is not back yet
            if job["state"] == "queued":
                job["reason"] = "waiting for worker %s (offline)" % worker.worker_id
        self.assertEqual(after, before)
        self.assertEqual([job["state"] for job in after], ["queued", "queued", "cancelled", "queued", "succeeded"])


class QueueProcessTest(ClusterTestCase):
    """The queue with real processes: the command line, and kill -9 of the scheduler during a
    large submit and during dispatch (every acknowledged job runs exactly once)."""

    def cluster_processes(self, state_dir, workers=2, slots=4):
        """A scheduler process on state_dir and worker processes; (proc, address, client)."""
        proc, address = self.spawn("scheduler", "--listen", "127.0.0.1:0", "--state-dir", state_dir)
        for _ in range(workers):
            worker, _ = self.spawn(*worker_args(address, self.tempdir(), "--slots", str(slots)))
            self.addCleanup(worker.terminate)  # stops its jobs before the cleanup's kill
        client = self.client(address)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == workers, timeout=20,
                   message="workers to register")
        return proc, address, client

    def restart_after_kill9(self, proc, address, state_dir, workers=2):
        proc.kill()
        proc.wait(timeout=10)
        _, again = self.spawn("scheduler", "--listen", address, "--state-dir", state_dir)
        client = self.client(again)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == workers, timeout=20,
                   message="workers to register again")
        return client

    def assert_each_ran_once(self, out, expected):
        wait_until(lambda: set(read_lines(out)) >= set(expected), timeout=60,
                   message="every acknowledged job to run")
        lines = read_lines(out)
        self.assertEqual([line for line in set(lines) if lines.count(line) > 1], [])

    def test_kill9_during_a_large_submit(self):
        state_dir = self.tempdir()
        proc, address, client = self.cluster_processes(state_dir)
        out = os.path.join(self.tempdir(), "runs")
        acknowledged, errors, killed = [], [], threading.Event()

        def submit_batches():
            submitter = jobsched.Client(address, timeout=5)
            for batch in range(1000):
                if killed.is_set():
                    break
                specs = [append_job(out, "s%d-%d" % (batch, i)) for i in range(20)]
                specs.append({"command": "sh", "args": ["-c", 'echo "a$1-$JOBSCHED_ARRAY_INDEX" >> "$2"',
                                                        "sh", str(batch), out], "array": 40})
                try:
                    submitter.submit(specs)
                except jobsched.JobschedError as e:  # the scheduler was killed mid-call
                    errors.append(e)
                    break
                acknowledged.extend(["s%d-%d" % (batch, i) for i in range(20)] +
                                    ["a%d-%d" % (batch, i) for i in range(40)])
            submitter.close()
        thread = threading.Thread(target=submit_batches)
        thread.start()
        wait_until(lambda: len(acknowledged) >= 3 * 60, message="a few submits")
        proc.kill()
        killed.set()
        thread.join(timeout=30)
        self.assertLessEqual(len(errors), 1)  # the call cut short, if the kill met one
        client = self.restart_after_kill9(proc, address, state_dir)
        self.assert_each_ran_once(out, acknowledged)

    def test_kill9_during_dispatch(self):
        state_dir = self.tempdir()
        proc, address, client = self.cluster_processes(state_dir)
        out = os.path.join(self.tempdir(), "runs")
        markers = ["j%d" % i for i in range(150)]
        ids = client.submit([append_job(out, marker) for marker in markers])
        wait_until(lambda: len(read_lines(out)) >= 20, message="some jobs to run")
        client = self.restart_after_kill9(proc, address, state_dir)
        self.assert_each_ran_once(out, markers)
        self.assertEqual({self.wait_done(client, job_id)["state"] for job_id in ids}, {"succeeded"})

    def test_a_restarted_worker_has_its_queue_jobs_end_lost(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        client = self.client(scheduler)
        state_dir = self.tempdir()
        proc, _ = self.spawn(*worker_args(scheduler.address, state_dir, "--slots", "1"))
        wait_until(lambda: client.workers(), message="the worker to register")
        long_job, short_job = client.submit([{"command": "sleep", "args": ["300"]}, {"command": "true"}])
        wait_until(lambda: client.query(long_job)["state"] == "running", message="the job to run")
        self.assertEqual(client.query(short_job)["state"], "queued")
        proc.kill()
        proc.wait(timeout=10)
        proc, _ = self.spawn(*worker_args(scheduler.address, state_dir, "--slots", "1"))
        self.addCleanup(proc.terminate)
        # wait() answers from the queue; a query may meet the dead worker's address meanwhile
        wait_until(lambda: client.wait([long_job], 5), message="the job to end")
        job = client.query(long_job)
        self.assertEqual((job["state"], job["error_text"]),
                         ("lost", "lost: the worker restarted while the job was running"))
        self.assertEqual(self.wait_done(client, short_job)["state"], "succeeded")
        # done as its worker says: the scheduler's queue learns it from the end report, just after
        wait_until(lambda: client.wait([short_job], 5), message="the queue to learn the end")
        self.assertEqual(client.wait([long_job, short_job], 1),
                         [{"job_id": long_job, "state": "lost"}, {"job_id": short_job, "state": "succeeded"}])

    def test_submit_wait_and_jobs_state_from_the_command_line(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        worker = self.worker(scheduler, slots=1)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        env = {"JOBSCHED_SCHEDULER": scheduler.address}
        gate = os.path.join(self.tempdir(), "gate")
        self.addCleanup(lambda: open(gate, "a").close())
        done = self.cli("submit", "--name", "holder", "--priority", "9", "--", "sh", "-c",
                        'while [ ! -e "$1" ]; do sleep 0.02; done', "sh", gate, env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        (holder,) = done.stdout.decode().split()
        jobs_file = os.path.join(self.tempdir(), "jobs.txt")
        with open(jobs_file, "w") as f:
            f.write("# a comment, then a blank line\n\nsh -c 'echo \"$K one\"'\n  true  # trailing\n"
                    "sh -c 'exit 3'\n")
        done = self.cli("submit", "--file", jobs_file, "--env", "K=v", "--after", holder, env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        one, plain, failing = done.stdout.decode().split()
        job = client.query(one)
        self.assertEqual((job["command"], job["args"], job["after"], job["reason"]),
                         ("sh", ["-c", 'echo "$K one"'], [holder], "waiting for %s" % holder))
        self.assertEqual(client.query(plain)["args"], [])
        done = self.cli("submit", "--array", "2", "--file", "-", env=env, input=b"echo from stdin\n")
        self.assertEqual((done.returncode, len(done.stdout.split())), (0, 2), done.stderr)
        done = self.cli("jobs", "--state", "queued", env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        listed = done.stdout.decode().splitlines()
        self.assertEqual(len(listed), 1 + 5)  # header and the queued jobs
        self.assertNotIn(holder, done.stdout.decode())
        for bad, message in ((b"sh -c 'unclosed\n", "-, line 1: No closing quotation"),
                             (b"# nothing\n", "- holds no job")):
            done = self.cli("submit", "--file", "-", env=env, input=bad)
            self.assertEqual(done.returncode, 2)
            self.assertIn("jobsched: error: %s" % message, done.stderr.decode())
        self.assertEqual(len([j for j in client.jobs() if j["state"] == "queued"]), 5)
        waiter = popen_jobsched(self, ["wait", "--scheduler", scheduler.address, one, failing])
        open(gate, "a").close()
        out, err = waiter.communicate(timeout=30)
        self.assertEqual(waiter.returncode, 1, err)
        self.assertEqual(sorted(out.decode().splitlines()), sorted(["%s succeeded" % one, "%s failed" % failing]))
        self.assertEqual(client.output(one)["data"], b"v one\n")
        done = self.cli("wait", env=env)  # every queued and running job
        self.assertEqual(done.returncode, 0, done.stderr)
        done = self.cli("wait", one, plain, env=env)
        self.assertEqual((done.returncode, sorted(done.stdout.decode().split())),
                         (0, sorted([one, "succeeded", plain, "succeeded"])))
        done = self.cli("wait", str(uuid.uuid4()), env=env)
        self.assertEqual(done.returncode, 1)
        self.assertIn("jobsched: error: job not found", done.stderr.decode())

    def test_run_waits_in_the_queue_then_follows(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        self.worker(scheduler, slots=1)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        gate = os.path.join(self.tempdir(), "gate")
        self.addCleanup(lambda: open(gate, "a").close())
        (holder,) = client.submit([{"command": "sh", "args": [
            "-c", 'while [ ! -e "$1" ]; do sleep 0.02; done', "sh", gate]}])
        wait_until(lambda: client.query(holder)["state"] == "running", message="the holder to run")
        env = dict(os.environ, JOBSCHED_SCHEDULER=scheduler.address)
        env.pop("JOBSCHED_TOKEN", None)
        proc = popen_jobsched(self, ["run", "--", "sh", "-c", "echo hello; exit 4"], env=env)
        line = proc.stderr.readline().decode()
        self.assertRegex(line, r"^jobsched: job [0-9a-f-]{36} queued \(position 1: waiting for a free slot\)\n$")
        self.assertIsNone(proc.poll())
        open(gate, "a").close()
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, out), (4, b"hello\n"), err)
        self.assertRegex(err.decode(), r"^jobsched: job [0-9a-f-]{36} on [0-9a-f-]{36} \(.+\)\n$")
        proc = popen_jobsched(self, ["run", "--", "/nonexistent/jobsched-test"], env=env)
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, out), (1, b""))
        self.assertRegex(err.decode(), r"^jobsched: error: cannot start '/nonexistent/jobsched-test' on worker .*\n$")


class QueueLabelsTest(ClusterTestCase):
    """Queued jobs placed by labels: `on` in a spec, the reason while none matches, and `all`."""

    def test_on_places_queued_jobs_and_says_why_they_wait(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        cpu = self.worker(scheduler, slots=2, labels={"kind": "cpu"})
        client = self.client(scheduler)
        wait_until(lambda: len(client.workers()) == 1, message="the cpu worker to register")
        out = self.tempdir()
        ids = client.submit([{"command": "sh", "args": ["-c", 'echo "$JOBSCHED_WORKER_ID" > "$1"',
                                                         "sh", os.path.join(out, name)],
                              "on": {"kind": kind}}
                             for name, kind in (("a", "gpu"), ("b", "cpu"), ("c", "*"))])
        self.assertEqual(self.wait_done(client, ids[1])["worker_id"], cpu.worker_id)
        self.assertEqual(self.wait_done(client, ids[2])["state"], "succeeded")
        waiting = client.query(ids[0])
        self.assertEqual((waiting["state"], waiting["reason"]),
                         ("queued", "no online worker matches kind=gpu"))
        gpu = self.worker(scheduler, slots=1, labels={"kind": "gpu"})
        self.assertEqual(self.wait_done(client, ids[0])["worker_id"], gpu.worker_id)
        with open(os.path.join(out, "a")) as f:
            self.assertEqual(f.read().strip(), gpu.worker_id)
        with self.assertRaises(jobsched.BadRequest) as caught:
            client.submit([{"command": "true", "on": {"bad key": "1"}}])
        self.assertIn("jobs[0].on", str(caught.exception))

    def test_all_queues_one_pinned_job_per_matching_worker(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        workers = [self.worker(scheduler, slots=1, labels={"rack": rack}) for rack in "aab"]
        client = self.client(scheduler)
        wait_until(lambda: sum(w["online"] for w in client.workers()) == 3,
                   message="workers to register")
        ids = client.submit([{"command": "true", "all": True, "on": {"rack": "a"}},
                             {"command": "true", "all": True}])
        self.assertEqual(len(ids), 5)
        placed = [self.wait_done(client, job_id)["worker_id"] for job_id in ids]
        self.assertEqual(sorted(placed[:2]), sorted(w.worker_id for w in workers[:2]))
        self.assertEqual(sorted(placed[2:]), sorted(w.worker_id for w in workers))
        with self.assertRaises(jobsched.Unavailable) as caught:
            client.submit([{"command": "true", "all": True, "on": {"rack": "z"}}])
        self.assertIn("no online worker matches rack=z", str(caught.exception))
        with self.assertRaises(jobsched.BadRequest):
            client.submit([{"command": "true", "all": "yes"}])


class OutputReplyTest(unittest.TestCase):
    """Client.output reads output() replies with a regular expression; any other shape of the
    same reply, and faults, go through the XML parser."""

    def test_fast_path_reads_every_shape_of_the_reply(self):
        for data in (os.urandom(70000), b"", b"<&>]]>"):
            for offset in (0, 5, 3000000000):
                for eof in (True, False):
                    struct = {"data": xmlrpc.client.Binary(data), "offset": jobsched.wire_int(offset),
                              "eof": eof}
                    ours = jobsched.dumps_response(struct)
                    direct = jobsched.dumps_output_reply(struct)  # what a worker answers
                    stock = xmlrpc.client.dumps((struct,), methodresponse=True).encode()
                    self.assertEqual(xmlrpc.client.loads(direct), xmlrpc.client.loads(stock))
                    for body in (ours, direct, stock):  # one base64 line, or 76 columns
                        self.assertEqual(jobsched.parse_output_reply(body),
                                         {"data": data, "offset": offset, "eof": eof})
        fault = xmlrpc.client.dumps(xmlrpc.client.Fault(1, "job not found"), methodresponse=True)
        self.assertIsNone(jobsched.parse_output_reply(fault.encode()))
        other = xmlrpc.client.dumps(({"data": "text", "offset": 1, "eof": True},), methodresponse=True)
        self.assertIsNone(jobsched.parse_output_reply(other.encode()))

    def test_client_output_and_its_faults(self):
        state_dir = tempfile.mkdtemp(prefix="jobsched-test-")
        self.addCleanup(shutil.rmtree, state_dir, ignore_errors=True)
        worker = jobsched.Worker("127.0.0.1:0", scheduler=None, state_dir=state_dir).start_serving()
        self.addCleanup(worker.close)
        client = jobsched.Client(worker.address)
        self.addCleanup(client.close)
        job_id = client.start("sh", "", {"args": ["-c", "printf 'a\\0b'"]})
        wait_until(lambda: client.query(job_id)["done"], message="the job to end")
        self.assertEqual(client.output(job_id), {"data": b"a\0b", "offset": 3, "eof": True})
        self.assertEqual(client.output(job_id, 1, 1)["data"], b"\0")
        with self.assertRaises(jobsched.NotFound):
            client.output(str(uuid.uuid4()))
        with self.assertRaises(jobsched.BadRequest):
            client.output(job_id, -1)


class QueueCommandLineTest(ClusterTestCase):
    """The queue from the command line: prefixes, stopping queued jobs, bad input, metrics."""

    def signalled_while_retrying(self, argv, env, signum):
        """Run the command until it says it retries, send signum; returns (status, out, err)."""
        proc = popen_jobsched(self, argv, env=env)
        stderr = type("Stderr", (), {"stdout": proc.stderr})  # read_until reads .stdout
        self.assertIn(b"retrying for up to 60 s", read_until(stderr, b" s\n"))
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        return proc.returncode, out, err

    def test_run_sends_a_submit_whose_answer_was_lost_again_and_the_job_runs_once(self):
        answers = []
        class LosesAnswers(jobsched.Scheduler):
            slow = 1  # how many answers come after the client gave up on them
            def _submit(self, jobs):  # what submit() and its fast reply both call
                answer = super()._submit(jobs)
                answers.append(list(jobsched.expand_job_ids(*answer)))
                if self.slow:  # queued (or found queued); answered too late
                    self.slow -= 1
                    time.sleep(2.5)
                return answer
        scheduler = self.scheduler(LosesAnswers, state_dir=self.tempdir())
        self.worker(scheduler)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        done = self.cli("run", "--rpc-timeout", "1", "--", "echo", "once", env=env)
        self.assertEqual((done.returncode, done.stdout), (0, b"once\n"), done.stderr)
        self.assertIn(b"timed out", done.stderr)
        self.assertIn(b"jobsched: reconnected", done.stderr)
        self.assertEqual(len(answers), 2)
        self.assertEqual(answers[0], answers[1])
        self.assertEqual([job["job_id"] for job in client.jobs()], answers[0])
        # Given up after tries that may have reached it: the line names the job to look for.
        scheduler.slow = 10
        done = self.cli("run", "--rpc-timeout", "1", "--reconnect", "1.5", "--", "true", env=env)
        self.assertEqual(done.returncode, 255, done.stderr)
        self.assertRegex(done.stderr.decode(), r"jobsched: error: no answer from [^\n]*; job "
                         r"([-0-9a-f]{36}) may have been queued: see jobsched.py query \1, and "
                         r"stop it if it was\n$")
        # Given up after tries that never reached it: nothing was queued.
        scheduler.close()
        done = self.cli("run", "--reconnect", "0.5", "--", "true", env=env)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertRegex(done.stderr.decode(), r"\njobsched: error: cannot reach [^\n]*; nothing "
                                               r"was queued\n$")
        # Ctrl-C between two tries: no more tries.
        status, _, err = self.signalled_while_retrying(("run", "--", "true"), env, signal.SIGINT)
        self.assertEqual((status, err), (130, b"jobsched: interrupted; nothing was queued\n"))

    def test_submit_sends_a_submit_whose_answer_was_lost_again_and_queues_once(self):
        answers = []
        class LosesAnswers(jobsched.Scheduler):
            slow = 1  # how many answers come after the client gave up on them
            def _submit(self, jobs):
                answer = super()._submit(jobs)
                answers.append(list(jobsched.expand_job_ids(*answer)))
                if self.slow:
                    self.slow -= 1
                    time.sleep(2.5)
                return answer
        scheduler = self.scheduler(LosesAnswers, state_dir=self.tempdir())
        client = self.client(scheduler)  # no worker: the jobs stay queued, to be counted
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        lines = self.tempdir()
        with open(os.path.join(lines, "jobs"), "w") as f:
            f.write("echo one\necho two\n")
        done = self.cli("submit", "--rpc-timeout", "1", "--file", os.path.join(lines, "jobs"),
                        env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"timed out", done.stderr)
        self.assertIn(b"jobsched: reconnected", done.stderr)
        printed = done.stdout.decode().split()
        self.assertEqual(len(answers), 2)
        self.assertEqual(answers, [printed, printed])
        self.assertEqual(sorted(job["job_id"] for job in client.jobs()), sorted(printed))
        self.assertEqual(client.info()["queued"], 2)
        # An array gets the id of its index 0; sent again, it is queued once too.
        scheduler.slow = 1
        done = self.cli("submit", "--rpc-timeout", "1", "--array", "3", "--", "true", env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        printed = done.stdout.decode().split()
        self.assertEqual(len(printed), 3)
        self.assertTrue(printed[0].endswith("-000000000000"), printed)
        self.assertEqual(answers[-2:], [printed, printed])
        self.assertEqual(client.info()["queued"], 5)
        # Ctrl-C while the answer is on its way: it is waited for, and the ids are printed.
        scheduler.slow, sent = 1, len(answers)
        proc = popen_jobsched(self, ("submit", "--", "true"), env=env)
        wait_until(lambda: len(answers) > sent, message="the submit to be queued")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, out.split(), err),
                         (130, [answers[-1][0].encode()],
                          b"jobsched: interrupted; the jobs were queued\n"))
        # Given up after tries that may have reached it: the line says which job to query.
        scheduler.slow = 10
        done = self.cli("submit", "--rpc-timeout", "1", "--reconnect", "1.5", "--file",
                        os.path.join(lines, "jobs"), env=env)
        self.assertEqual(done.returncode, 255, done.stderr)
        printed = done.stdout.decode().split()  # every id, to query and to stop
        self.assertEqual(len(printed), 2)
        self.assertRegex(done.stderr.decode(), r"jobsched: error: no answer from [^\n]*; the 2 "
                         r"jobs printed may have been queued, all of them or none: see "
                         r"jobsched.py query %s \(the first\), and stop them if they were\n$"
                         % printed[0])
        done = self.cli("submit", "--rpc-timeout", "1", "--reconnect", "1.5", "--array", "3",
                        "--", "true", env=env)
        printed = done.stdout.decode().split()  # an array's too, each of them
        self.assertEqual((done.returncode, [job_id[24:] for job_id in printed]),
                         (255, ["00000000000%d" % i for i in range(3)]), done.stderr)
        self.assertIn("the 3 jobs printed may have been queued", done.stderr.decode())
        # Its reader gone (| head -1): the warning all the same, and 255.
        proc = popen_jobsched(self, ("submit", "--rpc-timeout", "1", "--reconnect", "1.5",
                                     "--array", "20000", "--", "true"), env=env)
        self.assertTrue(proc.stdout.readline().endswith(b"-000000000000\n"))
        proc.stdout.close()  # 20000 ids do not fit in the pipe: the rest meet a closed one
        err = proc.stderr.read()
        self.assertEqual(proc.wait(timeout=30), 255, err)
        self.assertIn(b"the 20000 jobs printed may have been queued", err)
        # Ctrl-C after such a try: no more tries, and the same warning.
        status, out, err = self.signalled_while_retrying(
            ("submit", "--rpc-timeout", "1", "--", "true"), env, signal.SIGINT)
        self.assertEqual(status, 130, err)
        self.assertEqual(err, b"jobsched: interrupted; job %s may have been queued: see jobsched.py "
                              b"query %s, and stop it if it was\n" % (out.strip(), out.strip()))
        # Given up after tries that never reached it: nothing was queued.
        scheduler.close()
        done = self.cli("submit", "--reconnect", "0.5", "--", "true", env=env)
        self.assertEqual((done.returncode, done.stdout), (1, b""), done.stderr)
        self.assertRegex(done.stderr.decode(), r"\njobsched: error: cannot reach [^\n]*; nothing "
                                               r"was queued\n$")
        # Ctrl-C between two tries: no more tries.
        self.assertEqual(self.signalled_while_retrying(("submit", "--", "true"), env,
                                                       signal.SIGTERM),
                         (128 + signal.SIGTERM, b"", b"jobsched: interrupted; nothing was queued\n"))

    def test_submit_gives_up_at_once_on_a_final_refusal_and_a_signal_is_never_lost(self):
        refused = []
        class SlowToRefuse(jobsched.Scheduler):
            def _submit(self, jobs):
                if any(job.get("name") == "refuse" for job in jobs):
                    refused.append(1)
                    time.sleep(1.5)
                    raise jobsched.BadRequest("jobs[0]: refused")
                return super()._submit(jobs)
        scheduler = self.scheduler(SlowToRefuse, state_dir=self.tempdir(), max_request=4096)
        client = self.client(scheduler)
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        # "Not found" and "too large" answer the submit itself: no retry, nothing queued.
        for argv, said in ((("--after", str(uuid.uuid4())), b"unknown job"),
                           (("--worker", str(uuid.uuid4())), b"worker not found"),
                           (("--env", "X=" + "x" * 5000), b"larger than its --max-request "
                                                          b"(HTTP 413)")):
            done = self.cli("submit", *argv, "--", "true", env=env)
            self.assertEqual((done.returncode, done.stdout), (1, b""), done.stderr)
            self.assertIn(said, done.stderr)
            self.assertNotIn(b"retrying", done.stderr)
        # Far larger than the socket buffers, it is read (and dropped) while the refusal waits.
        with self.assertRaises(jobsched.BadRequest) as caught:
            client.submit([{"command": "true", "args": ["x" * 60000]}] * 150)
        self.assertIn("larger than its --max-request (HTTP 413)", str(caught.exception))
        # Ctrl-C during a call that is then refused: the signal ends it, nothing was queued.
        proc = popen_jobsched(self, ("submit", "--name", "refuse", "--", "true"), env=env)
        wait_until(lambda: refused, message="the submit to arrive")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, out, err),
                         (130, b"", b"jobsched: interrupted; nothing was queued\n"))
        self.assertEqual(client.info()["queued"], 0)

    def test_submit_prints_every_id_when_a_signal_comes_while_they_go_out(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        client = self.client(scheduler)
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        proc = popen_jobsched(self, ("submit", "--array", "5000", "--", "true"), env=env)
        pipe = proc.stdout.fileno()

        def pipe_full():  # the ids fill the pipe: submit waits for room
            return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4))[0] >= 65536
        wait_until(pipe_full, message="the pipe to fill")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, err),
                         (128 + signal.SIGTERM, b"jobsched: interrupted; the jobs were queued\n"))
        self.assertEqual(out.split(), [job_id.encode() for job_id in jobsched.expand_job_ids(
            [out.split()[0].decode()[:24]], [{"array": 5000}])])
        self.assertEqual(client.info()["queued"], 5000)

    def submit_with_fake_client(self, on_call, on_ids, stdout=subprocess.PIPE):
        """`submit` of two jobs by _submit_lines in a process of its own, whose client's submit
        runs on_call (Python source) before it answers, and whose answer's ids run on_ids as
        they are read to be printed; returns (status, stdout, stderr, job_ids)."""
        script = (
            "import os, signal, sys\n"
            "sys.path.insert(0, %r)\n"
            "import jobsched\n"
            "class Ids(list):\n"
            "    def __iter__(self):\n"
            "        %s\n"
            "        return list.__iter__(self)\n"
            "class Client:\n"
            "    def submit(self, specs):\n"
            "        %s\n"
            "        print(*[spec['job_id'] for spec in specs], file=sys.stderr)\n"
            "        return Ids(spec['job_id'] for spec in specs)\n"
            "args = jobsched.build_parser().parse_args(['submit', '--', 'true'])\n"
            "sys.exit(jobsched._with_stop_signals(jobsched._submit_lines, Client(), args,\n"
            "                                     [['true'], ['false']]))\n" % (HERE, on_ids, on_call))
        done = subprocess.run([sys.executable, "-c", script], stdout=stdout,
                              stderr=subprocess.PIPE, timeout=60)
        ids, _, said = done.stderr.decode().partition("\n")
        return done.returncode, done.stdout, said, ids.split()

    def test_submit_prints_the_ids_when_a_signal_comes_between_the_answer_and_the_write(self):
        # The answer's ids signal as they are read to be printed: between the submit call's
        # held block and the first write, which the hold now spans.
        status, out, err, ids = self.submit_with_fake_client(
            "pass", "os.kill(os.getpid(), signal.SIGTERM)")
        self.assertEqual((status, err), (128 + signal.SIGTERM,
                                         "jobsched: interrupted; the jobs were queued\n"))
        self.assertEqual(out.decode().split(), ids)

    def test_submit_ends_on_a_second_signal_after_one_during_its_call(self):
        # One signal during the call, one as the ids are made ready, stdout full: the second
        # ends submit (it would wait for room in stdout for ever), naming the jobs.
        read_end, write_end = full_pipe(self)
        status, _, err, ids = self.submit_with_fake_client(
            "os.kill(os.getpid(), signal.SIGINT)", "os.kill(os.getpid(), signal.SIGINT)",
            stdout=write_end)
        os.close(write_end)
        self.assertEqual((status, err), (130, "jobsched: interrupted before every id was "
                                              "written; the 2 jobs were queued, the first is %s\n"
                                         % ids[0]))

    def test_submit_whose_stdout_stays_full_ends_on_a_second_signal(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        client = self.client(scheduler)
        read_end, write_end = full_pipe(self)
        proc = popen_jobsched(self, ("submit", "--", "true"), stdout=write_end,
                              env=cli_env(JOBSCHED_SCHEDULER=scheduler.address))
        os.close(write_end)
        wait_until(lambda: client.info()["queued"] == 1, message="the job to be queued")
        (job_id,) = [job["job_id"] for job in client.jobs()]
        for _ in range(20):  # the first is noted (the id is still to go), a later one ends it
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
        self.assertIsNotNone(proc.returncode, "submit still runs after 20 SIGINTs")
        err = proc.stderr.read()
        self.assertEqual((proc.returncode, err), (130, (
            "jobsched: interrupted before every id was written; job %s was queued\n"
            % job_id).encode()))

    def test_a_file_of_jobs_is_split_as_shlex_splits_each_line(self):
        # Plain lines take a quicker way than shlex: the words must come out the same.
        rng = random.Random(7)
        alphabet = ["a", "b", "1", " ", "\t", "'", '"', "\\", "#", "\xa0", "\u3000", "é",
                    "$", "|", ";", "*", "=", "-", "{", "}"]
        lines, expected = [], []
        for _ in range(20000):
            line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # an open quote: such a line makes the whole file exit 2
                continue
            lines.append(line)
            if words:
                expected.append(words)
        plain = sum(not jobsched._SHLEX_SPECIAL.search(line) for line in lines)
        self.assertTrue(1000 < plain < len(lines) - 1000, (plain, len(lines)))  # both ways
        path = os.path.join(self.tempdir(), "jobs")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        self.assertEqual(jobsched._read_job_lines(path), expected)
        # Lines end at a newline (or \r\n) only, as a shell reads them: \v and the like are text.
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("echo a\x0bb c\x1cd\r\necho 'e\u2028f'\n")
        self.assertEqual(jobsched._read_job_lines(path),
                         [["echo", "a\x0bb", "c\x1cd"], ["echo", "e\u2028f"]])

    def test_queued_jobs_from_the_command_line(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        worker = self.worker(scheduler, slots=1)
        client = self.client(scheduler)
        wait_until(lambda: client.workers(), message="the worker to register")
        env = cli_env(JOBSCHED_SCHEDULER=scheduler.address)
        holder = client.submit([{"command": "sleep", "args": ["30"]}])[0]
        self.addCleanup(client.stop, holder)
        wait_until(lambda: client.query(holder)["state"] == "running", message="the holder to run")
        queued = self.cli("submit", "--", "true", env=env).stdout.decode().strip()
        done = self.cli("stop", queued[:10], env=env)
        self.assertEqual((done.returncode, done.stdout.decode()), (0, "%s cancelled\n" % queued))
        # Ctrl-C of a run whose job still waits: the job is cancelled, run says so and exits 130
        proc = popen_jobsched(self, ("run", "--", "true"), env=env)
        stderr = type("Stderr", (), {"stdout": proc.stderr})  # read_until reads .stdout
        line = read_until(stderr, b")\n")
        self.assertIn(b"queued (position", line)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 130, err)
        self.assertRegex(err.decode(), r"jobsched: job [-0-9a-f]{36} cancelled\n$")
        client.stop(holder)
        later = self.cli("submit", "--", "true", env=env).stdout.decode().strip()
        done = self.cli("wait", later[:12], env=env, timeout=60)
        self.assertEqual((done.returncode, done.stdout.decode()), (0, "%s succeeded\n" % later))
        done = self.cli("jobs", "--state", "runing", env=env)
        self.assertEqual(done.returncode, 2, done.stderr)
        # the scheduler counts the queue's starts and the ends its workers report
        types, samples = parse_metrics(jobsched.scheduler_metrics(scheduler).decode())
        self.assertGreaterEqual(metric(samples, "jobsched_jobs_started_total"), 2)
        wait_until(lambda: metric(parse_metrics(jobsched.scheduler_metrics(scheduler).decode())[1],
                                  "jobsched_jobs_finished_total", state="succeeded") >= 1,
                   message="the end to be counted")

    def test_a_file_of_as_many_jobs_as_a_submit_takes_is_queued_with_the_defaults(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        path = os.path.join(self.tempdir(), "jobs")
        with open(path, "w") as f:  # 37 MB of XML-RPC with their ids: over the 32 MiB of 1.0
            f.writelines("/bin/echo step-%06d\n" % i for i in range(jobsched.MAX_SUBMIT_JOBS))
        done = self.cli("submit", "--file", path, env=cli_env(JOBSCHED_SCHEDULER=scheduler.address),
                        timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        job_ids = done.stdout.split()
        self.assertEqual(len(set(job_ids)), jobsched.MAX_SUBMIT_JOBS)
        self.assertEqual(scheduler.info()["queued"], jobsched.MAX_SUBMIT_JOBS)
        self.assertEqual(scheduler.query(job_ids[-1].decode())["args"], ["step-099999"])

    def test_submit_file_over_the_limit_is_refused_whole(self):
        scheduler = self.scheduler(state_dir=self.tempdir())
        path = os.path.join(self.tempdir(), "jobs")
        with open(path, "w") as f:
            f.write("true\n" * (jobsched.MAX_SUBMIT_JOBS + 1))
        done = self.cli("submit", "--file", path, env=cli_env(JOBSCHED_SCHEDULER=scheduler.address))
        self.assertEqual((done.returncode, done.stdout), (2, b""), done.stderr)
        self.assertIn(b"at most 100000", done.stderr)
        self.assertEqual(self.client(scheduler).jobs(), [])


if __name__ == "__main__":
    unittest.main()
