"""How the server's Ray workers are laid out; read by the CLI without importing Ray."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterOptions:
    """address: None starts a local Ray instance, "auto" joins the one `ray start` runs here, "ray://host:10001"
    a remote head. gpus_per_worker: GPUs per EngineActor (0.5 puts two on one GPU). On a cluster without GPUs
    there are workers_per_node actors per node, each with its share of the node's CPUs (or cpus_per_worker).
    autoscale: ask the Ray autoscaler for one worker's resources per job waiting or running, up to max_workers,
    and give back actors idle for idle_seconds."""

    address: str | None = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: float | None = None
    workers_per_node: int = 1
    autoscale: bool = False
    max_workers: int = 8
    idle_seconds: float = 300.0
    max_attempts: int = 2  # runs a job gets before it fails (the store's recovery rule)

    def __post_init__(self) -> None:
        if self.gpus_per_worker < 0 or (self.cpus_per_worker is not None and self.cpus_per_worker <= 0):
            raise ValueError("--gpus-per-worker must be 0 or more and each worker needs some CPU")
        if self.workers_per_node < 1 or self.max_workers < 1:
            raise ValueError("--workers-per-node and the worker limit must be at least 1")
