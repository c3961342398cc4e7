"""Throughput (images/min) and job latency (p50/p95, from submit to done) of the server's queue: the thread
worker against 1, 2 and 4 Ray EngineActors, in one run, all jobs submitted at once through the HTTP API.

On CPUs each actor takes cores / actors of the machine's CPUs (as many torch threads, at least one; the thread
worker uses all of them). With --gpu: a random-weight SD1.5 (bench/architectures.py) at 512x512
in fp16, the thread worker against two actors sharing the one GPU (--gpus-per-worker 0.5).

    .venv/bin/python bench/scale.py --jobs 12 --actors 1 2 4
    .venv/bin/python bench/scale.py --gpu --jobs 16 --actors 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from sdstudio import Settings
from sdstudio.server.app import create_app
from sdstudio.server.cluster.options import ClusterOptions
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.testing.live import wait_for_job


def settings_for(home: Path, model: Path, gpu: bool) -> Settings:
    device, dtype = (torch.device("cuda"), torch.float16) if gpu else (torch.device("cpu"), torch.float32)
    return Settings(home=home, outputs_dir=home / "outputs", models_dirs=(model.parent,), device=device,
                    dtype=dtype, default_model=model.name)


def run_jobs(settings: Settings, data: Path, cluster: ClusterOptions | None, jobs: int, steps: int,
             size: int) -> tuple[float, float, float]:
    """images/min, p50 and p95 latency in seconds, after one warm-up job per engine worker."""
    with TestClient(create_app(settings, data, cluster=cluster)) as client:
        workers = len(client.app.state.sdstudio.worker.busy_seconds())
        request = {"prompt": "a red circle on a blue background", "steps": steps, "width": size, "height": size}
        warm = [client.post("/api/v1/jobs", json={"request": {**request, "seed": -1}}).json()["id"]
                for _ in range(workers)]
        for job_id in warm:
            wait_for_job(client, job_id, timeout=1200)
        ids = [client.post("/api/v1/jobs", json={"request": {**request, "seed": i}}).json()["id"]
               for i in range(jobs)]
        done = [wait_for_job(client, job_id, timeout=3600) for job_id in ids]
    assert all(j["status"] == "done" for j in done), [j["error"] for j in done]
    latency = sorted(j["finished"] - j["created"] for j in done)
    span = max(j["finished"] for j in done) - min(j["created"] for j in done)
    return 60 * jobs / span, statistics.median(latency), latency[max(0, round(0.95 * len(latency)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpu", action="store_true", help="random-weight SD1.5 on the GPU, actors sharing it")
    args = parser.parse_args()
    import ray

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if args.gpu:
            from architectures import build  # bench/ is the script's folder, so on sys.path

            model, size = build("sd15", scratch / "models" / "sd15", torch.float16), 512
        else:
            model, size = PACKAGED_MODELS / "demo", 64
        print(f"{args.jobs} jobs of {args.steps} steps, {size}x{size}, {'GPU' if args.gpu else f'{cores} cores'}")
        print(f"  {'workers':16s} {'images/min':>10s} {'p50 s':>8s} {'p95 s':>8s}")
        configs: list[tuple[str, int | None]] = [("thread", None), *((f"ray x{n}", n) for n in args.actors)]
        for label, actors in configs:
            home = scratch / label.replace(" ", "-")
            cluster = None
            if actors is not None:
                ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
                cluster = ClusterOptions(gpus_per_worker=1 / actors if args.gpu else 0.0, workers_per_node=actors,
                                         cpus_per_worker=1.0 if args.gpu else cores / actors)
            torch.set_num_threads(cores)
            try:
                rate, p50, p95 = run_jobs(settings_for(home, model, args.gpu), home / "data", cluster, args.jobs,
                                          args.steps, size)
            finally:
                if actors is not None:
                    ray.shutdown()
            print(f"  {label:16s} {rate:10.1f} {p50:8.2f} {p95:8.2f}")


if __name__ == "__main__":
    main()
