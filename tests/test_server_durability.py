"""kill -9 the server with jobs queued and running, restart it: every job completes or fails with a reason."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, tiny_model, port: int) -> subprocess.Popen:
    env = {**os.environ, "SDSTUDIO_HOME": str(tmp_path / "home"), "SDSTUDIO_DEVICE": "cpu",
           "SDSTUDIO_MODEL": str(tiny_model)}
    return subprocess.Popen([sys.executable, "-m", "sdstudio", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "data")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(url + "/api/v1/jobs", timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("server did not start")


def test_kill_9_loses_no_job(tmp_path, tiny_model):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(tmp_path, tiny_model, port)
    try:
        wait_up(url, server)
        ids = [httpx.post(url + "/api/v1/jobs", json={"request": {"prompt": f"job {k}", "steps": steps, "seed": k}}
                          ).json()["id"] for k, steps in enumerate([150, 2, 3, 2])]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/api/v1/jobs/{ids[0]}").json()["status"] != "running":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.05)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    server = start(tmp_path, tiny_model, port)
    try:
        wait_up(url, server)
        deadline = time.monotonic() + 240
        views = []
        while time.monotonic() < deadline:
            views = [httpx.get(f"{url}/api/v1/jobs/{i}").json() for i in ids]
            if all(v["status"] in ("done", "failed") for v in views):
                break
            time.sleep(0.2)
        assert [v["status"] for v in views] == ["done"] * 4, views  # the running one was re-queued and finished
        assert all(len(v["result"]["images"]) == 1 for v in views)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
