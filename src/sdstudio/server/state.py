"""What every HTTP route shares: the server's state (settings, engine, job store, worker) and the job view
clients see."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstudio.engine.engine import Engine
from sdstudio.engine.requests import GenerationRequest
from sdstudio.errors import NotFound
from sdstudio.server.payload import decode_request
from sdstudio.server.worker import Worker
from sdstudio.settings import Settings
from sdstudio.storage.jobs import JobRecord
from sdstudio.storage.queue import JobQueue

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEGACY_IMAGES = "images"  # where a data folder kept its images before they went to the outputs folder


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    store: JobQueue
    worker: Worker
    images_dir: Path
    roots: dict[str, str]  # local folders -> what clients see instead
    data_dir: Path

    def decode(self, payload: dict[str, Any]) -> GenerationRequest:
        """A request payload from the network, its pictures and ControlNet units within this server's limits."""
        limits = self.settings.limits
        return decode_request(payload, limits.max_upload_pixels, limits.max_controlnet_units)

    def image_bytes(self, job_id: str, name: str, index: int) -> bytes:
        """A stored image's PNG bytes; NotFound naming it when the file is gone or is not a PNG any more.
        `name` is relative to the images folder (or, from a data folder made before images went to the
        outputs folder, to its images/), or absolute for a CLI run the history recorded (cli/history.py)."""
        if Path(name).is_absolute():
            candidates = [Path(name)]
        else:
            candidates = [root / name for root in (self.images_dir, self.data_dir / LEGACY_IMAGES)
                          if (root / name).resolve().is_relative_to(root.resolve())]
        for path in candidates:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if data.startswith(PNG_SIGNATURE):
                return data
        raise NotFound(f"image {index} of job {job_id} is missing or damaged")

    def scrub(self, message: str | None) -> str | None:
        if message is None:
            return None
        for root, label in self.roots.items():
            message = message.replace(root, label)
        return message


def job_view(job: JobRecord, state: ServerState) -> dict[str, Any]:
    request = job.payload.get("request", job.payload)  # an X/Y/Z job wraps its base request
    view: dict[str, Any] = {"id": job.id, "kind": job.kind, "status": job.status, "created": job.created,
                            "started": job.started, "finished": job.finished, "error": state.scrub(job.error),
                            "prompt": request.get("prompt", "") if isinstance(request, dict) else ""}
    if job.status == "queued":
        view["position"] = state.store.queue_position(job.id)
    if job.status == "running" and (live := state.worker.live(job.id)) is not None:
        view["progress"] = live.fraction
    if job.result:
        view["result"] = {**{k: v for k, v in job.result.items() if k != "images"},
                          "images": [f"/api/v1/images/{job.id}/{i}" for i in range(len(job.result["images"]))]}
    return view


def get_job(store: JobQueue, job_id: str) -> JobRecord:
    job = store.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job
