"""EngineActor: one Engine kept warm in a Ray actor, running one job at a time for the head's dispatcher.

Plain Python: the dispatcher wraps it with `ray.remote` (threaded, so progress, preview and cancel calls are
served while `run` works). It returns what it made; the head saves it, so history and files look as with the
thread worker. Names resolve through the actor's own settings on its own host, and a model file whose sha256
differs from the head's is refused: two hosts holding different files under one name would make different
pictures for the same request.
"""

from __future__ import annotations

import base64
import gc
import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch

from sdstudio.engine.engine import Engine
from sdstudio.engine.hooks import CancelToken, ProgressEvent
from sdstudio.errors import Cancelled, ModelError
from sdstudio.server.payload import decode_request
from sdstudio.server.worker import JobProgress, failure_reason
from sdstudio.server.xyz_job import XYZ_KIND, make_xyz
from sdstudio.settings import Settings, resolve_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorJob:
    """What the head sends: the durable record's kind and payload, and its model file's sha256 (None: unchecked,
    as for an X/Y/Z plot whose axis may change the model)."""

    job_id: str
    kind: str
    payload: dict[str, Any]
    model_sha256: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How a run ended: status "done" with the result (GenerationResult or XYZResult), "cancelled", or
    "failed" with the reason the job's record shows."""

    status: str
    result: Any = None
    reason: str = ""


class EngineActor:
    def __init__(self, settings: Settings, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        device = torch.device("cuda" if ray.get_runtime_context().get_accelerator_ids().get("GPU") else "cpu")
        if device.type != settings.device.type:  # the GPU Ray gave this actor, or none (whatever the head has)
            settings = replace(settings, device=device, dtype=resolve_dtype("auto", device))
        self.engine = Engine(settings)
        self._one_run = threading.Lock()  # one job at a time, even if the head sends a second one
        self.loads: list[str] = []  # names of the models loaded, in order (model affinity is measured by it)
        self._lock = threading.Lock()
        self._job_id: str | None = None
        self._token: CancelToken | None = None
        self._progress: JobProgress | None = None
        self._preview: Callable[[], Any] | None = None
        self._early: tuple[str, str] | None = None  # (job id, how): a control that came before its run started

    def ping(self) -> str:
        """The actor is up (a restarted one has built its Engine again); its host name."""
        return socket.gethostname()

    def loaded_models(self) -> list[str]:
        return list(self.loads)

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()

    def run(self, job: ActorJob) -> Outcome:
        with self._one_run:
            return self._run(job)

    def _run(self, job: ActorJob) -> Outcome:
        token, started, before = CancelToken(), time.monotonic(), {id(m) for m in self.engine.models.loaded}
        with self._lock:
            self._job_id, self._token, self._preview = job.job_id, token, None
            self._progress = JobProgress(job.job_id, 0.0, 0, 0, 0, 0, 0.0)
            early, self._early = self._early, None
        if early is not None and early[0] == job.job_id:
            self.control(*early)
        try:
            on_event = self._on_event(job.job_id, started)
            if job.kind == XYZ_KIND:
                return Outcome("done", make_xyz(self.engine, job.payload, on_event, token))
            prepared = self.engine.prepare(decode_request(job.payload))
            self._check_hash(prepared.model.path, prepared.model.name, job.model_sha256)
            return Outcome("done", self.engine.generate(prepared, progress=on_event, cancel=token))
        except Cancelled:
            return Outcome("cancelled")
        except Exception as e:  # the actor outlives any job, as the thread worker does
            log.exception("job %s failed", job.job_id)
            return Outcome("failed", reason=failure_reason(e))
        finally:
            self.loads += [m.name for m in self.engine.models.loaded if id(m) not in before]
            with self._lock:
                self._job_id = self._token = self._progress = self._preview = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def control(self, job_id: str, how: str) -> bool:
        """cancel, interrupt or skip the job running here, or the one about to (the dispatcher sent it here and
        only it calls this)."""
        with self._lock:
            token = self._token if self._job_id == job_id else None
            if token is None:
                if self._early is None or self._early[0] != job_id or self._early[1] != "cancel":  # cancel wins
                    self._early = (job_id, how)
                return True
        {"cancel": token.cancel, "interrupt": token.interrupt, "skip": token.skip}[how]()
        return True

    def progress(self, job_id: str) -> JobProgress | None:
        with self._lock:
            return self._progress if self._job_id == job_id else None

    def preview_png(self, job_id: str) -> str | None:
        """The running job's live preview as base64 PNG; None when it has none (yet) or is not running here."""
        with self._lock:
            preview = self._preview if self._job_id == job_id else None
        if preview is None:
            return None
        buffer = io.BytesIO()
        preview().save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def _on_event(self, job_id: str, started: float) -> Callable[[ProgressEvent], None]:
        def on_event(e: ProgressEvent) -> None:
            elapsed = time.monotonic() - started
            eta = elapsed * (1 - e.fraction) / e.fraction if e.fraction > 0 else 0.0
            with self._lock:
                if self._job_id == job_id:
                    self._progress = JobProgress(job_id, e.fraction, e.step, e.steps, e.iteration, e.n_iter, eta)
                    self._preview = e.preview

        return on_event

    def _check_hash(self, path: Any, name: str, expected: str | None) -> None:
        if expected is None:
            return
        found = self.engine.models.hashes.model_sha256(path)
        if found != expected:
            raise ModelError(f"model {name!r} on worker host {socket.gethostname()} is not the server's file "
                             f"(sha256 {found[:10]} here, {expected[:10]} on the server): give every host the "
                             f"same models folder (a shared mount) or the same files")
