"""Load on the native job API: N concurrent clients each submit M jobs and poll them until done.

    python bench/load.py --clients 8 --jobs 4 --steps 4 [--url http://127.0.0.1:7860] [--timeout 600]

Without --url it starts `sdstudio serve` on a free loopback port with the demo model (SDSTUDIO_HOME in a
temporary folder) and stops it afterwards. Bounded in count (clients x jobs) and in time (--timeout).
Reports jobs submitted / completed / failed / lost (lost: accepted but never finished, or gone from the
server), latency percentiles from submit to done, and throughput. Exit status 1 if any job failed or was
lost. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = ("a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background", "a blue diamond on a grey background")
FINISHED = ("done", "failed", "cancelled")


@dataclass
class JobTrace:
    client: int
    index: int
    submitted: float = 0.0            # monotonic time the submit request was sent
    finished: float | None = None     # monotonic time a poll first saw it finished
    job_id: str | None = None         # None: the server did not accept it
    status: str = "unsent"            # unsent, rejected, queued/running (never finished: lost), done, failed, ...
    error: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted


def run_client(base: str, client: int, jobs: int, steps: int, deadline: float, poll: float, run_id: str,
               auth: tuple[str, str] | None, traces: list[JobTrace]) -> None:
    """Submit `jobs` jobs one after the other, then poll all of them until finished or the deadline."""
    mine = [JobTrace(client, j) for j in range(jobs)]
    traces.extend(mine)  # list.extend is atomic under the GIL
    with httpx.Client(base_url=base, timeout=30.0, auth=auth) as http:
        for trace in mine:
            body = {"request": {"prompt": PROMPTS[(client + trace.index) % len(PROMPTS)], "steps": steps,
                                "seed": 1000 * client + trace.index}}
            trace.submitted = time.monotonic()
            try:
                response = http.post("/api/v1/jobs", json=body,
                                     headers={"Idempotency-Key": f"load-{run_id}-{client}-{trace.index}"})
            except httpx.HTTPError as e:
                trace.status, trace.error = "rejected", f"{type(e).__name__}: {e}"
                continue
            if response.status_code != 202:
                trace.status, trace.error = "rejected", f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            view = response.json()
            trace.job_id, trace.status = view["id"], view["status"]
        pending = [t for t in mine if t.job_id is not None and t.status not in FINISHED]
        while pending and time.monotonic() < deadline:
            for trace in pending:
                try:
                    response = http.get(f"/api/v1/jobs/{trace.job_id}")
                except httpx.HTTPError as e:
                    trace.error = f"poll: {type(e).__name__}: {e}"  # transient: keep polling until the deadline
                    continue
                if response.status_code == 404:
                    trace.status, trace.error = "missing", "the server no longer knows this job"
                    continue
                view = response.json()
                trace.status, trace.error = view["status"], view.get("error")
                if trace.status in FINISHED:
                    trace.finished = time.monotonic()
            pending = [t for t in pending if t.status not in (*FINISHED, "missing")]
            time.sleep(poll)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def report(traces: list[JobTrace], started: float, timeout_hit: bool) -> int:
    accepted = [t for t in traces if t.job_id is not None]
    done = [t for t in traces if t.status == "done"]
    rejected = [t for t in traces if t.status in ("rejected", "unsent")]  # unsent: the deadline came first
    failed = [t for t in accepted if t.status in ("failed", "cancelled")]
    lost = [t for t in accepted if t.status not in FINISHED]
    sent = sum(t.status != "unsent" for t in traces)
    print(f"jobs: submitted {sent}  accepted {len(accepted)}  completed {len(done)}  "
          f"failed {len(failed) + len(rejected)} (rejected or unsent {len(rejected)})  lost {len(lost)}")
    latencies = sorted(t.latency for t in done if t.latency is not None)
    if latencies:
        print("latency submit->done (s): " + "  ".join(f"p{q} {percentile(latencies, q):.2f}" for q in (50, 90, 99))
              + f"  max {latencies[-1]:.2f}  min {latencies[0]:.2f}")
        span = max(t.finished for t in done if t.finished is not None) - started
        print(f"throughput: {len(done) / span:.2f} jobs/s ({len(done)} jobs in {span:.1f} s)")
    if timeout_hit:
        print("the --timeout was reached before every job finished")
    for t in (*failed, *rejected, *lost)[:20]:
        print(f"  client {t.client} job {t.index} id {t.job_id}: {t.status}: {t.error}")
    return 1 if failed or rejected or lost else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_server(start_timeout: float = 120.0) -> Iterator[str]:
    """`sdstudio serve` on a free loopback port with the demo model, its home in a temporary folder."""
    home = Path(tempfile.mkdtemp(prefix="sdstudio-load-"))
    port = free_port()
    exe = shutil.which("sdstudio", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "sdstudio"]
    env = {**os.environ, "SDSTUDIO_HOME": str(home), "SDSTUDIO_OUTPUTS": str(home / "outputs")}
    env.pop("SDSTUDIO_MODEL", None)  # the bundled demo model
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([*command, "serve", "--port", str(port), "--data-dir", str(home / "server")],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if server.poll() is not None:
                raise SystemExit(f"sdstudio serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/api/v1/jobs", params={"limit": 1}, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"sdstudio serve did not answer within {start_timeout:.0f} s")
            time.sleep(0.2)
        print(f"started sdstudio serve on {base} (home {home})")
        yield base
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on Ctrl-C
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (threads)")
    parser.add_argument("--jobs", type=int, default=4, help="jobs each client submits")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per job")
    parser.add_argument("--url", help="a running server; without it, start `sdstudio serve` with the demo model")
    parser.add_argument("--auth", help="user:password for a server started with --api-auth")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before unfinished jobs count as lost")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between status polls")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.jobs < 1 or args.steps < 1:
        parser.error("--clients, --jobs and --steps must be >= 1")
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    with (nullcontext_url(args.url) if args.url else local_server()) as base:
        print(f"{args.clients} clients x {args.jobs} jobs x {args.steps} steps against {base}")
        traces: list[JobTrace] = []
        started = time.monotonic()
        deadline = started + args.timeout
        threads = [threading.Thread(target=run_client, args=(base, c, args.jobs, args.steps, deadline, args.poll,
                                                              uuid.uuid4().hex[:8], auth, traces), daemon=True)
                   for c in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()) + 35)  # a request in flight may take its 30 s
        timeout_hit = time.monotonic() >= deadline
        return report(traces, started, timeout_hit)


@contextmanager
def nullcontext_url(url: str) -> Iterator[str]:
    yield url.rstrip("/")


if __name__ == "__main__":
    sys.exit(main())
