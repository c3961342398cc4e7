"""The native HTTP job API on a live app (worker thread, SQLite queue) with the tiny model."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdstudio.pictures import image_to_b64
from sdstudio.server.app import create_app
from sdstudio.testing.live import wait_for_job as wait
from tests.conftest import make_settings, shapes_image


@pytest.fixture
def client(tmp_path, tiny_model):
    settings = make_settings(tmp_path / "home", tiny_model.parent, default_model=str(tiny_model))
    with TestClient(create_app(settings, tmp_path / "data")) as c:
        yield c


def test_submit_returns_at_once_and_the_job_completes(client):
    response = client.post("/api/v1/jobs", json={"request": {"prompt": "a red circle", "steps": 2, "seed": 5,
                                                             "batch_size": 2}})
    assert response.status_code == 202
    job = response.json()
    assert job["status"] in ("queued", "running") and len(job["id"]) >= 16
    done = wait(client, job["id"])
    assert done["status"] == "done", done
    assert done["result"]["seeds"] == [5, 6] and "Seed: 5" in done["result"]["infotexts"][0]
    png = client.get(done["result"]["images"][1])
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert client.get(f"/api/v1/images/{job['id']}/7").status_code == 404


def test_img2img_with_pictures_in_the_request(client):
    body = {"request": {"prompt": "a blue square", "init_image": image_to_b64(shapes_image()), "strength": 0.5,
                        "steps": 2, "seed": 1}}
    done = wait(client, client.post("/api/v1/jobs", json=body).json()["id"])
    assert done["status"] == "done" and done["result"]["request"]["mode"] == "img2img"


def test_bad_input_is_a_422_that_says_what_to_fix(client):
    bad = client.post("/api/v1/jobs", json={"request": {"prompt": "x", "sampler": "Eulr"}})
    assert bad.status_code == 422
    body = bad.json()
    assert "Euler" in body["detail"] and body["field"] == "sampler"
    assert client.post("/api/v1/jobs", json={"request": {"init_image": "not base64!"}}).status_code == 422
    assert client.post("/api/v1/jobs", json={"nothing": 1}).status_code == 422
    assert client.get("/api/v1/jobs/nope").status_code == 404
    image = base64.b64encode(b"GIF89a-not-really").decode()
    assert "image" in client.post("/api/v1/jobs", json={"request": {"init_image": image}}).json()["detail"]


def test_idempotency_history_and_cancel(client):
    first = client.post("/api/v1/jobs", json={"request": {"prompt": "a green diamond", "steps": 2, "seed": 1}},
                        headers={"Idempotency-Key": "abc"}).json()
    again = client.post("/api/v1/jobs", json={"request": {"prompt": "a green diamond", "steps": 2, "seed": 1}},
                        headers={"Idempotency-Key": "abc"}).json()
    assert again["id"] == first["id"]
    long_job = client.post("/api/v1/jobs", json={"request": {"prompt": "slow", "steps": 150, "seed": 2}}).json()
    queued = client.post("/api/v1/jobs", json={"request": {"prompt": "never", "steps": 2, "seed": 3}}).json()
    assert client.post(f"/api/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    client.post(f"/api/v1/jobs/{long_job['id']}/cancel")
    assert wait(client, long_job["id"])["status"] == "cancelled"
    assert wait(client, first["id"])["status"] == "done"
    page = client.get("/api/v1/jobs", params={"q": "diamond"}).json()
    assert page["total"] == 1 and page["jobs"][0]["id"] == first["id"]
    assert client.get("/api/v1/jobs", params={"limit": 1}).json()["total"] >= 3


def test_auth_covers_every_route(tmp_path, tiny_model):
    settings = make_settings(tmp_path / "home", tiny_model.parent, default_model=str(tiny_model))
    app = create_app(settings, tmp_path / "data", start_worker=False, auth={"ann": "secret"})
    with TestClient(app) as c:
        for path in ("/api/v1/jobs", "/docs", "/openapi.json", "/api/v1/jobs/x"):
            assert c.get(path).status_code == 401
        assert c.get("/api/v1/jobs", auth=("ann", "secret")).status_code == 200
        assert c.get("/api/v1/jobs", auth=("ann", "wrong")).status_code == 401


def test_a_failing_job_fails_with_its_reason_and_the_server_goes_on(client, monkeypatch):
    import torch

    engine = client.app.state.sdstudio.engine
    real = engine.generate
    calls = []

    def out_of_memory_once(job, progress=None, cancel=None):  # the worker hands generate a PreparedJob
        calls.append(job.request.prompt)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(job, progress, cancel)

    monkeypatch.setattr(engine, "generate", out_of_memory_once)
    failed = wait(client, client.post("/api/v1/jobs", json={"request": {"prompt": "huge", "steps": 2}}).json()["id"])
    assert failed["status"] == "failed" and "out of memory" in failed["error"]
    after = wait(client, client.post("/api/v1/jobs", json={"request": {"prompt": "small", "steps": 2}}).json()["id"])
    assert after["status"] == "done"


def test_limits_are_checked_before_any_work_and_paths_never_leak(client):
    for request, field in [({"prompt": "x" * 20_001}, "prompt"), ({"prompt": "x", "batch_size": 8, "n_iter": 9},
                           "n_iter"), ({"prompt": "x", "width": 4096, "height": 4096}, "width"),
                           ({"prompt": "x", "steps": 151}, "steps")]:
        response = client.post("/api/v1/jobs", json={"request": request})
        assert response.status_code == 422 and response.json()["field"] == field, response.json()
    big = client.post("/api/v1/jobs", content=b"{" + b" " * (65 << 20) + b"}",
                      headers={"content-type": "application/json"})
    assert big.status_code == 413
    home = str(client.app.state.sdstudio.settings.home)
    unknown = client.post("/api/v1/jobs", json={"request": {"prompt": "x <lora:nothere:1>"}})
    assert unknown.status_code == 422 and home not in unknown.text
    assert client.get("/api/v1/jobs", params={"offset": -1}).status_code == 422


def test_each_http_request_is_prepared_once_and_a_restart_prepares_from_the_record(client, monkeypatch):
    state = client.app.state.sdstudio
    calls = []
    real = state.engine.prepare
    monkeypatch.setattr(state.engine, "prepare", lambda request: calls.append(request.prompt) or real(request))
    native = wait(client, client.post("/api/v1/jobs", json={"request": {"prompt": "a", "steps": 2}}).json()["id"])
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "b", "steps": 2, "width": 64, "height": 64})
    assert native["status"] == "done" and a1111.status_code == 200
    assert calls == ["a", "b"]  # the door prepared each; the worker ran what the door prepared
    queued = state.store.submit("txt2img", {"prompt": "c", "steps": 2})  # as if queued before a restart
    state.worker.wake()
    assert wait(client, queued.id)["status"] == "done" and calls == ["a", "b", "c"]


def test_interrupt_keeps_the_finished_images(client):
    """POST /jobs/{id}/interrupt: the running image is finished early, no further batch is made, and the job
    ends done with what it made (cancel discards)."""
    import time

    job = client.post("/api/v1/jobs", json={"request": {"prompt": "a red circle", "steps": 150, "seed": 4,
                                                        "n_iter": 20}}).json()
    deadline = time.monotonic() + 60
    while client.get(f"/api/v1/jobs/{job['id']}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert client.post(f"/api/v1/jobs/{job['id']}/interrupt").status_code == 200
    done = wait(client, job["id"])
    assert done["status"] == "done" and 1 <= len(done["result"]["images"]) < 20
    assert client.get(done["result"]["images"][0]).status_code == 200
    again = client.post(f"/api/v1/jobs/{job['id']}/interrupt")
    assert again.status_code == 422 and "not running" in again.json()["detail"]


def test_serve_says_how_to_get_ray_and_what_workers_it_takes(monkeypatch):
    import importlib.util

    from sdstudio.cli.serve import cluster_options

    with pytest.raises(ValueError, match="--workers takes thread or ray"):
        cluster_options("gpu", None, 1.0, 1, False)
    assert cluster_options("thread", None, 1.0, 1, False) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"pip install 'sdstudio\[ray\]'"):
        cluster_options("ray", None, 1.0, 1, False)
