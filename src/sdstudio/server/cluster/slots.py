"""What the dispatcher knows of each EngineActor (a Slot), and how actors are sized and placed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from sdstudio.server.cluster.actor import EngineActor
from sdstudio.server.cluster.options import ClusterOptions
from sdstudio.server.worker import JobProgress
from sdstudio.settings import Settings
from sdstudio.storage.jobs import JobRecord

START_TRIES = 3  # an actor that fails to start this many times in a row is given up (its log says why)


@dataclass
class Slot:
    """One EngineActor. The dispatcher thread changes it under RayWorker's lock; routes read snapshots."""

    name: str
    handle: Any                     # ray ActorHandle
    model: str | None = None        # the model it ran last: still loaded there (affinity)
    job: JobRecord | None = None    # running there
    run: Any = None                 # ObjectRef of that run's Outcome
    starting: Any = None            # ObjectRef of a ping while the actor (re)starts; None once it answered
    recheck: float | None = None    # when to ping again an actor Ray says is restarting (monotonic)
    asked: Any = None               # ObjectRef of an outstanding progress call
    heard: float = 0.0              # when the actor last answered about its job (monotonic)
    progress: JobProgress | None = None
    cancel_sent: bool = False
    since: float = 0.0              # when the running job started, or when the actor became idle
    busy: float = 0.0               # seconds spent on finished jobs
    failures: int = 0               # start attempts that failed in a row
    dead: bool = False              # given up after START_TRIES failed starts

    @property
    def idle(self) -> bool:
        return self.job is None and self.starting is None and self.recheck is None and not self.dead


def actor_resources(options: ClusterOptions) -> dict[str, float]:
    """What each actor asks Ray for: GPUs when the cluster has some or may get some (--autoscale), else a share
    of a node's CPUs (workers_per_node actors per node) unless cpus_per_worker says."""
    gpu = options.gpus_per_worker and (ray.cluster_resources().get("GPU", 0) or options.autoscale)
    if gpu:
        return {"num_cpus": options.cpus_per_worker or 1.0, "num_gpus": options.gpus_per_worker}
    if options.cpus_per_worker:
        return {"num_cpus": options.cpus_per_worker, "num_gpus": 0.0}
    smallest = min((n["Resources"]["CPU"] for n in cpu_nodes()), default=1.0)
    return {"num_cpus": max(1.0, smallest // options.workers_per_node), "num_gpus": 0.0}


def cpu_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0)]


def worker_count(options: ClusterOptions) -> int:
    """One per `gpus_per_worker` of the cluster's GPUs, else workers_per_node on each node with CPUs; with
    --autoscale it may be none yet (more start as nodes join)."""
    if actor_resources(options)["num_gpus"]:
        count = int(ray.cluster_resources().get("GPU", 0) / options.gpus_per_worker)
    else:
        count = options.workers_per_node * len(cpu_nodes())
    return count if options.autoscale else max(1, count)


def start_actor(name: str, settings: Settings, options: ClusterOptions) -> Slot:
    """A new EngineActor, spread over the nodes; Ray restarts it if it dies. Its threads: its CPUs."""
    resources = actor_resources(options)
    actor = ray.remote(EngineActor).options(**resources, max_restarts=-1, max_concurrency=4,
                                            scheduling_strategy="SPREAD")
    handle = actor.remote(settings, max(1, int(resources["num_cpus"])))
    return Slot(name, handle, starting=handle.ping.remote())
