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


def run_limited(case, max_file_size, *args):
    """Start `jobsched.py ARGS` with RLIMIT_FSIZE: every write past max_file_size bytes fails
    with EFBIG, as on a full disk. Returns (proc, address) once listening, or the proc if it
    exited. Its log goes nowhere: it could not be written either."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))
    proc = subprocess.Popen([sys.executable, JOBSCHED] + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=limit)

    def cleanup():
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=15)
        proc.stdout.close()
        proc.stderr.close()
    case.addCleanup(cleanup)
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
            self.assertIn("worker offline", str(error))
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
        wait_until(lambda: all(isinstance(fault_of(worker.query, j), jobsched.NotFound)
                               for j in ids[:2]), message="the oldest two to expire")
        for i, job_id in enumerate(ids[2:], 2):
            self.assertEqual(worker.query(job_id)["state"], "succeeded")
            self.assertEqual(self.output_of(worker, job_id), b"job %d\n" % i)
        self.assertIs(type(fault_of(self.output_of, worker, ids[0])), jobsched.NotFound)
        files = {name for name in os.listdir(state_dir) if name.endswith((".json", ".out"))}
        self.assertEqual(files, {j + ext for j in ids[2:] for ext in (".json", ".out")})
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
        self.assertEqual(sorted(os.listdir(state_dir)), ["lock", "worker_id"])  # nothing left
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


if __name__ == "__main__":
    unittest.main()
