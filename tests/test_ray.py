"""`serve --workers ray`: the durable queue's jobs run on EngineActors of a real local Ray cluster (2 CPUs,
one actor per CPU with one torch thread), the head saves them. Needs the `ray` extra (in the dev install)."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.server.app import create_app
from sdstudio.server.cluster.options import ClusterOptions
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.testing.live import wait_for_job
from tests.test_studio_routes import png

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module (the multi-node test makes its own cluster, in its own module)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def demo_settings(home) -> Settings:
    return Settings(home=home, outputs_dir=home / "outputs", models_dirs=(home / "models", PACKAGED_MODELS),
                    device=torch.device("cpu"), dtype=torch.float32, default_model="demo")


@pytest.fixture(scope="module")
def client(ray_cluster, tmp_path_factory):
    """A Ray-backed server with two actors, shared by the module's tests (starting actors takes ~10 s)."""
    home = tmp_path_factory.mktemp("ray-home")
    shutil.copytree(PACKAGED_MODELS / "demo", home / "models" / "demo-copy")  # a second model
    with TestClient(create_app(demo_settings(home), home / "data",
                               cluster=ClusterOptions(workers_per_node=2))) as c:
        yield c


def actors_ready(client) -> list:
    """The actors, once each has (re)built its Engine."""
    worker, deadline = client.app.state.sdstudio.worker, time.monotonic() + 120
    while any(slot.starting is not None or slot.recheck is not None for slot in worker.slots):
        assert time.monotonic() < deadline, "the engine actors did not start"
        time.sleep(0.1)
    return worker.slots


def submit(client, **request) -> str:
    answer = client.post("/api/v1/jobs", json={"request": {"prompt": PROMPT, "seed": 3, **request}})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def wait_running(client, job_id: str, step: int = 1, timeout: float = 120.0) -> None:
    """Until the job's actor has made `step` steps."""
    deadline = time.monotonic() + timeout
    while (live := client.app.state.sdstudio.worker.live(job_id)) is None or live.step < step:
        assert time.monotonic() < deadline, f"job {job_id} did not start"
        time.sleep(0.05)


def pixels(client, job_id: str, index: int = 0) -> np.ndarray:
    return np.asarray(png(client.get(f"/api/v1/images/{job_id}/{index}")))


def test_two_jobs_run_at_once_with_the_thread_workers_pixels(client, tmp_path):
    actors_ready(client)
    requests = [{"steps": 12, "seed": 3}, {"steps": 12, "seed": 9, "prompt": "a yellow square on a black background"}]
    ids = [submit(client, **r) for r in requests]
    jobs = [wait_for_job(client, i) for i in ids]
    assert [j["status"] for j in jobs] == ["done", "done"], jobs
    assert jobs[0]["started"] < jobs[1]["finished"] and jobs[1]["started"] < jobs[0]["finished"]  # overlapped
    engine = Engine(demo_settings(tmp_path / "thread"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job_id, r in zip(ids, requests, strict=True):
            reference = engine.generate(GenerationRequest(**{"prompt": PROMPT, **r}))
            assert np.array_equal(pixels(client, job_id), np.asarray(reference.images[0].image))
    finally:
        torch.set_num_threads(threads)
    history = {j["id"]: j for j in client.get("/api/v1/jobs").json()["jobs"]}
    assert all(history[i]["result"]["images"] for i in ids)
    queue = client.get("/api/v1/queue").json()
    assert queue["jobs"]["done"] >= 2 and len(queue["workers"]) == 2
    assert all(w["busy_seconds"] > 0 for w in queue["workers"])
    assert f'sdstudio_jobs{{status="done"}} {queue["jobs"]["done"]}' in client.get("/metrics").text


def test_cancel_interrupt_and_skip_reach_the_job_they_name(client):
    slow, other = submit(client, steps=60, n_iter=2), submit(client, steps=10)
    wait_running(client, slow)
    assert client.post(f"/api/v1/jobs/{slow}/cancel").status_code == 200
    assert wait_for_job(client, slow)["status"] == "cancelled"
    done = wait_for_job(client, other)
    assert done["status"] == "done" and len(done["result"]["images"]) == 1

    interrupted, skipped = submit(client, steps=60, n_iter=2), submit(client, steps=60, n_iter=2, seed=5)
    wait_running(client, interrupted, step=2)
    wait_running(client, skipped, step=2)
    assert client.post(f"/api/v1/jobs/{interrupted}/interrupt").status_code == 200
    assert client.post(f"/api/v1/jobs/{skipped}/interrupt?how=skip").status_code == 200
    first, second = wait_for_job(client, interrupted), wait_for_job(client, skipped)
    assert first["status"] == "done" and len(first["result"]["images"]) == 1  # no second batch
    assert second["status"] == "done" and len(second["result"]["images"]) == 2  # the first batch cut short only


def kill_its_actor(client, job_id: str, attempt: int) -> None:
    """Kill the actor running the job's `attempt`-th run (Ray restarts it, as it does a crashed one)."""
    worker, store = client.app.state.sdstudio.worker, client.app.state.sdstudio.store
    deadline = time.monotonic() + 300
    while store.get(job_id).attempts < attempt:  # the run before was collected and the job claimed again
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wait_running(client, job_id)
    ray.kill(worker._running(job_id)[0], no_restart=False)


def test_a_dead_actors_job_runs_again_and_a_job_that_kills_two_fails(client):
    store = client.app.state.sdstudio.store
    job_id = submit(client, steps=40)
    kill_its_actor(client, job_id, attempt=1)
    done = wait_for_job(client, job_id, timeout=300)
    assert done["status"] == "done" and store.get(job_id).attempts == 2

    doomed = submit(client, steps=150, n_iter=4)
    kill_its_actor(client, doomed, attempt=1)
    kill_its_actor(client, doomed, attempt=2)
    failed = wait_for_job(client, doomed, timeout=300)
    assert failed["status"] == "failed" and failed["error"] == "the cluster worker running this job died (attempt 2)"
    assert wait_for_job(client, submit(client, steps=4), timeout=300)["status"] == "done"  # the actors came back


def test_each_actor_loads_each_model_once_when_the_jobs_alternate(client):
    slots = actors_ready(client)
    before = [len(ray.get(slot.handle.loaded_models.remote())) for slot in slots]
    for order in (["demo", "demo-copy"], ["demo-copy", "demo"]) * 2:
        ids = [submit(client, model=model, steps=4) for model in order]
        assert all(wait_for_job(client, i)["status"] == "done" for i in ids)
    loads = [ray.get(slot.handle.loaded_models.remote())[n:] for slot, n in zip(slots, before, strict=True)]
    assert all(len(set(names)) == len(names) for names in loads), loads  # no actor loaded a model twice
    assert sum(map(len, loads)) <= 2, loads


def test_a_worker_host_with_another_file_under_the_name_refuses_the_job(client, monkeypatch):
    worker = client.app.state.sdstudio.worker
    monkeypatch.setattr(type(worker), "_model_of", lambda self, job: ("demo", "0" * 64))
    failed = wait_for_job(client, submit(client, steps=2))
    assert failed["status"] == "failed" and "is not the server's file" in failed["error"]
    assert "same models folder" in failed["error"]


def test_autoscale_asks_ray_for_a_worker_per_job_waiting(client, monkeypatch):
    import dataclasses

    from ray.autoscaler import sdk

    asked: list[list[dict]] = []
    monkeypatch.setattr(sdk, "request_resources", lambda bundles: asked.append(bundles))
    worker = client.app.state.sdstudio.worker
    actors_ready(client)
    monkeypatch.setattr(worker, "options", dataclasses.replace(worker.options, autoscale=True, max_workers=3,
                                                                 gpus_per_worker=0.0))
    ids = [submit(client, steps=20, seed=s) for s in range(4)]
    assert all(wait_for_job(client, i)["status"] == "done" for i in ids)
    deadline = time.monotonic() + 10
    while not asked or asked[-1]:
        assert time.monotonic() < deadline, asked
        time.sleep(0.05)
    assert [{"CPU": 1.0}] * 3 in asked  # four waiting, capped at max_workers
    assert len(worker.slots) == 2  # the cluster had no room for a third actor: none was started


def test_a_cluster_that_cannot_be_joined_is_a_plain_error(tmp_path, monkeypatch):
    """Joined when the app is made, before the server starts: `serve` prints this line and exits."""
    from sdstudio.errors import SdStudioError

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(SdStudioError, match=r"could not start or join the Ray cluster \(auto\): Could not find any "
                                            r"running Ray instance; check --address"):
        create_app(demo_settings(tmp_path), tmp_path / "data", cluster=ClusterOptions(address="auto"))
