#!/usr/bin/env python3
"""Soak check: many short jobs across several workers while a worker and the scheduler are each
killed (kill -9) and restarted once; at the end every job id started is accounted for.

    python3 examples/soak.py                       # 200 jobs, 3 workers, at most 120 s
    python3 examples/soak.py --jobs 500 --workers 4 --time-limit 300

It runs a real scheduler and real workers (``python3 jobsched.py ...``) on loopback port 0 in a
temporary directory. Job i runs ``sh -c 'sleep S; exit i%7'``; every tenth job instead sleeps
20 s and is stopped through the scheduler at the end. A third of the way in, worker 1 is killed
with SIGKILL, seen offline, and restarted on its state dir; two thirds in, the scheduler is
killed and restarted on the same address. Then each job id that `start` returned must be:

    finished  succeeded/failed with exactly the exit code it was given
    stopped   one of the jobs stopped on purpose
    lost      a job that was running on the killed worker (error_text says it restarted)

Anything else is "wrong" (unexpected state or exit code) or "missing" (unknown, unreachable or
still running at the time limit). It prints the count of each and exits 1 unless wrong and
missing are both 0. Every process it starts is stopped at the end (by pid), also on failure or
Ctrl-C; the jobs the killed worker orphaned are killed by its restart, or by this script.

License: MIT (see LICENSE).
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
JOBSCHED = os.path.join(os.path.dirname(HERE), "jobsched.py")
sys.path.insert(0, os.path.dirname(HERE))  # jobsched.py lives one directory up

import jobsched  # noqa: E402

STOP_EVERY = 10      # every tenth job is a long one, stopped on purpose
LONG_SLEEP = "20"    # how long a to-be-stopped job would otherwise run


class Soak:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.deadline = time.monotonic() + args.time_limit
        self.started = time.monotonic()
        self.procs = []            # every process started, for cleanup by pid
        self.orphans = []          # (pid, start token) of the killed worker's running jobs
        self.expected = {}         # job_id -> exit code it was given, or "stop"
        self.killed_worker_id = None
        self.client = None

    # -- processes -----------------------------------------------------------------------------

    def say(self, text):
        print("[%6.2fs] %s" % (time.monotonic() - self.started, text), flush=True)

    def remaining(self):
        return self.deadline - time.monotonic()

    def spawn(self, name, *args):
        log = open(os.path.join(self.tmp, name + ".log"), "ab")
        proc = subprocess.Popen([sys.executable, JOBSCHED] + list(args), stdout=subprocess.PIPE,
                                stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        line = proc.stdout.readline().decode()  # the banner; the process exits if it cannot bind
        if "listening on" not in line:
            raise RuntimeError("%s did not start (see %s.log)" % (name, name))
        return proc, line.split("listening on ")[1].split()[0]

    def spawn_scheduler(self, listen="127.0.0.1:0"):
        return self.spawn("scheduler", "scheduler", "--listen", listen,
                          "--state-dir", os.path.join(self.tmp, "scheduler"),
                          "--rpc-timeout", str(self.args.rpc_timeout))

    def spawn_worker(self, n):
        return self.spawn("worker%d" % n, "worker", "--listen", "127.0.0.1:0",
                          "--scheduler", self.scheduler_address,
                          "--state-dir", os.path.join(self.tmp, "worker%d" % n),
                          "--heartbeat", str(self.args.heartbeat), "--slots", str(self.args.slots),
                          "--stop-grace", "1", "--rpc-timeout", str(self.args.rpc_timeout))

    def wait_for(self, what, predicate, limit=30.0):
        """Poll predicate (errors count as false) until true, within limit and the time limit."""
        deadline = min(self.deadline, time.monotonic() + limit)
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except jobsched.JobschedError:
                pass
            time.sleep(0.05)
        raise RuntimeError("timed out waiting for " + what)

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # a worker stops its jobs, then deregisters
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        for pid, token in self.orphans:  # only if the restart did not get them
            if token is not None and jobsched.process_start_time(pid) == token:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass

    # -- the run -------------------------------------------------------------------------------

    def online(self):
        return sorted(w["worker_id"] for w in self.client.workers() if w["online"])

    def start_job(self, i):
        """Start job i, retrying while no worker has a slot or the scheduler is down."""
        if i % STOP_EVERY == STOP_EVERY - 1:
            script, expected = "exec sleep " + LONG_SLEEP, "stop"
        else:
            expected = i % 7
            script = "sleep %.2f; exit %d" % (random.uniform(0.02, 0.4), expected)
        delay = 0.02
        while self.remaining() > 0:
            try:
                job_id = self.client.start("", "sh", "", {"args": ["-c", script]})
                self.expected[job_id] = expected
                return
            except jobsched.Unavailable:  # no free slot now, or scheduler restarting
                time.sleep(delay)
                delay = min(0.5, delay * 2)
        raise RuntimeError("time limit reached after starting %d jobs" % len(self.expected))

    def kill_worker(self, n):
        proc, address = self.workers[n]
        victim = jobsched.Client(address, timeout=self.args.rpc_timeout)
        self.killed_worker_id = victim.info()["worker_id"]
        for job in victim.jobs():  # remembered so cleanup can kill them if the restart cannot
            if not job["done"]:
                self.orphans.append((job["pid"], jobsched.process_start_time(job["pid"])))
        victim.close()
        proc.kill()
        proc.wait()
        self.say("kill -9 worker %d (%s) with %d jobs running"
                 % (n, self.killed_worker_id[:8], len(self.orphans)))
        self.wait_for("the scheduler to show worker %d offline" % n,
                      lambda: self.killed_worker_id not in self.online())
        self.say("scheduler shows worker %d offline" % n)
        self.workers[n] = self.spawn_worker(n)
        self.wait_for("worker %d to come back" % n,
                      lambda: self.killed_worker_id in self.online())
        self.say("worker %d restarted at %s, online again under the same id"
                 % (n, self.workers[n][1]))

    def kill_scheduler(self):
        self.scheduler_proc.kill()
        self.scheduler_proc.wait()
        self.say("kill -9 scheduler")
        self.scheduler_proc, _ = self.spawn_scheduler(self.scheduler_address)
        self.wait_for("the workers to re-register", lambda: len(self.online()) == self.args.workers)
        self.say("scheduler restarted on %s; all %d workers re-registered"
                 % (self.scheduler_address, self.args.workers))

    def run(self):
        args = self.args
        self.scheduler_proc, self.scheduler_address = self.spawn_scheduler()
        self.client = jobsched.Client(self.scheduler_address, timeout=args.rpc_timeout + 5)
        self.workers = [self.spawn_worker(n) for n in range(args.workers)]
        self.wait_for("the workers to register", lambda: len(self.online()) == args.workers)
        self.say("scheduler %s, %d workers with %d slots each"
                 % (self.scheduler_address, args.workers, args.slots))
        for i in range(args.jobs):
            if i == args.jobs // 3:
                self.kill_worker(min(1, args.workers - 1))
            if i == 2 * args.jobs // 3:
                self.kill_scheduler()
            self.start_job(i)
        self.say("%d jobs started" % len(self.expected))
        to_stop = [job_id for job_id, expected in self.expected.items() if expected == "stop"]
        for job_id in to_stop:
            try:
                self.client.stop(job_id)
            except jobsched.JobschedError:
                pass  # e.g. lost with its worker: accounted for below
        self.say("stop sent to %d long jobs" % len(to_stop))
        return self.account()

    def account(self):
        """Query every job id until all are done or time is up; count each outcome."""
        jobs = {}
        while self.remaining() > 0:
            try:
                listed = {job["job_id"]: job for job in self.client.jobs()}
            except jobsched.JobschedError:
                listed = {}
            for job_id in self.expected:
                if job_id in listed:
                    jobs[job_id] = listed[job_id]
            if all(job_id in jobs and jobs[job_id]["done"] for job_id in self.expected):
                break
            time.sleep(0.1)
        counts = {"finished": 0, "stopped": 0, "lost": 0, "wrong": 0, "missing": 0}
        for job_id, expected in sorted(self.expected.items()):
            job = jobs.get(job_id)
            if job is None or not job["done"]:
                try:  # not listed: ask for it by id (routed, or asked of every worker)
                    job = self.client.query(job_id)
                except jobsched.JobschedError as e:
                    job = {"done": False, "state": "error: %s" % e}
            if not job["done"]:
                outcome = "missing"
            elif job["state"] in ("succeeded", "failed") and job.get("exit_code") == expected:
                outcome = "finished"
            elif job["state"] == "stopped" and expected == "stop":
                outcome = "stopped"
            elif (job["state"] == "lost" and job["worker_id"] == self.killed_worker_id
                  and "restarted" in job["error_text"]):
                outcome = "lost"
            else:
                outcome = "wrong"
            counts[outcome] += 1
            if outcome in ("wrong", "missing"):
                self.say("%s: job %s expected %s, got %s %s" % (
                    outcome, job_id, expected, job["state"], job.get("exit_code", "")))
        print("started: %d" % len(self.expected))
        for outcome in ("finished", "stopped", "lost", "wrong", "missing"):
            print("%s: %d" % (outcome, counts[outcome]))
        self.say("done")
        return 0 if counts["wrong"] == counts["missing"] == 0 else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200,
                        help="jobs to start (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=3, help="(default: %(default)s)")
    parser.add_argument("--slots", type=int, default=8, help="per worker (default: %(default)s)")
    parser.add_argument("--heartbeat", type=float, default=0.3, help="(default: %(default)s)")
    parser.add_argument("--rpc-timeout", type=float, default=3.0, help="(default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=120.0,
                        help="hard limit for the whole run, in seconds (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="random seed for the job durations")
    args = parser.parse_args()
    if args.jobs < 3 or args.workers < 1 or args.slots < 1:
        parser.error("need --jobs >= 3, --workers >= 1, --slots >= 1")
    random.seed(args.seed)
    print("soak: %d jobs on %d workers; worker %d and the scheduler are each killed (-9) and "
          "restarted once; time limit %g s" % (args.jobs, args.workers, min(1, args.workers - 1),
                                              args.time_limit), flush=True)
    with tempfile.TemporaryDirectory(prefix="jobsched-soak-") as tmp:
        soak = Soak(args, tmp)
        try:
            return soak.run()
        except (RuntimeError, jobsched.JobschedError) as e:
            print("soak: error: %s" % e, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("soak: interrupted", file=sys.stderr)
            return 130
        finally:
            soak.cleanup()
            if soak.client is not None:
                soak.client.close()


if __name__ == "__main__":
    sys.exit(main())
