"""The one worker that owns the device: takes jobs from the durable queue, runs them, stores results.

A job's progress (step, total, ETA, a cheap preview) is kept in memory for the progress routes; the
queue in SQLite holds everything that must survive a crash. A failing job (bad input found late, out of
memory, a bug) is marked failed with its reason, memory is released, and the worker goes on.
"""

from __future__ import annotations

import base64
import gc
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdstudio.engine.engine import Engine
from sdstudio.engine.hooks import CancelToken, ProgressEvent
from sdstudio.engine.prepared import PreparedJob
from sdstudio.errors import Cancelled, SdStudioError
from sdstudio.server.payload import decode_request
from sdstudio.server.xyz_job import XYZ_KIND, run_xyz_job
from sdstudio.storage.jobs import JobRecord
from sdstudio.storage.queue import JobQueue
from sdstudio.storage.results import save_result, saved_entries

log = logging.getLogger(__name__)


@dataclass
class LiveProgress:
    """What the progress routes show about the running job (A1111's /progress reads this too)."""

    job_id: str | None = None
    fraction: float = 0.0
    step: int = 0
    steps: int = 0
    iteration: int = 0
    n_iter: int = 0
    started: float = 0.0
    preview: Callable[[], Image.Image] | None = None
    skip: bool = False                      # A1111's skip: finish the current batch early (recorded only)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def eta(self) -> float:
        if self.fraction <= 0:
            return 0.0
        elapsed = time.monotonic() - self.started
        return elapsed * (1 - self.fraction) / self.fraction


@dataclass(frozen=True)
class JobProgress:
    """A snapshot of one running job's progress, as the progress routes show it."""

    job_id: str
    fraction: float
    step: int
    steps: int
    iteration: int
    n_iter: int
    eta: float


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def failure_reason(error: Exception) -> str:
    """What a failed job's record says: the error's own message for ours, never internals for the rest."""
    if isinstance(error, SdStudioError):
        return str(error)
    if is_out_of_memory(error):
        return "out of memory: try a smaller size or batch, or --offload model"
    return f"internal error ({type(error).__name__}); see the server log"


class Worker:
    """One thread; `run_job` is separate so tests can drive it synchronously."""

    def __init__(self, engine: Engine, store: JobQueue, images_dir: Path, poll: float = 0.05):
        self.engine, self.store, self.images_dir, self.poll = engine, store, images_dir, poll
        self.progress = LiveProgress()
        self.cancel_token: CancelToken | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = threading.Condition()  # notified whenever a job ends
        self.device_lock = threading.Lock()  # held while a job runs; other device work (upscales) waits for it
        # job id -> the door's PreparedJob, so a queued request is checked once; the durable payload stays the
        # truth: a job without one here (queued before a restart, or by another process) is prepared from it
        self._prepared: dict[str, PreparedJob] = {}
        self._prepared_lock = threading.Lock()
        self._busy = 0.0  # seconds spent on finished jobs (/metrics)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sdstudio-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self.cancel_token:
            self.cancel_token.cancel()
        if self._thread:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def submit(self, kind: str, payload: dict[str, Any], prepared: PreparedJob | None = None,
               idempotency_key: str | None = None) -> JobRecord:
        """Queue a job (its payload durably) and wake the worker; `prepared`: the door's Engine.prepare of
        that payload, which the worker then runs without checking it again."""
        job = self.store.submit(kind, payload, idempotency_key)
        if prepared is not None and job.status == "queued":
            with self._prepared_lock:
                for job_id in [i for i in self._prepared if not self._queued(i)]:  # cancelled before they ran
                    del self._prepared[job_id]
                self._prepared[job.id] = prepared
        self.wake()
        return job

    def _queued(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and job.status == "queued"

    def interrupt(self, job_id: str | None = None, how: str = "cancel") -> bool:
        """Stop the running job (only `job_id` when given); True when one was running. how: "cancel" (no
        result), "interrupt" (A1111: finish the current image early, make no more) or "skip" (A1111: finish
        the current batch early, go on)."""
        token, running = self.cancel_token, self.progress.job_id
        if token is None or running is None or (job_id is not None and job_id != running):
            return False
        {"cancel": token.cancel, "interrupt": token.interrupt, "skip": token.skip}[how]()
        return True

    def live(self, job_id: str | None = None) -> JobProgress | None:
        """The running job's progress (only `job_id`'s when given); None when none runs."""
        with self.progress.lock:
            p = self.progress
            if p.job_id is None or (job_id is not None and job_id != p.job_id):
                return None
            return JobProgress(p.job_id, p.fraction, p.step, p.steps, p.iteration, p.n_iter, p.eta())

    def preview_png(self, job_id: str | None = None) -> str | None:
        """The running job's live preview as base64 PNG (only `job_id`'s when given); None if there is none."""
        with self.progress.lock:
            running, preview = self.progress.job_id, self.progress.preview
        if preview is None or (job_id is not None and job_id != running):
            return None
        buffer = io.BytesIO()
        preview().save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def wait(self, job_id: str, guard: float = 1.0) -> JobRecord | None:
        """Block until the job has ended (done, failed or cancelled); its durable record (None if unknown).
        Woken by the worker when a job ends; `guard` seconds bound each wait in case another process ended it."""
        with self._finished:
            while (job := self.store.get(job_id)) is not None and job.status in ("queued", "running"):
                self._finished.wait(guard)
        return job

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            self.run_job(job)

    def run_job(self, job: JobRecord) -> None:
        with self.device_lock:
            self._run_job(job)

    def busy_seconds(self) -> dict[str, float]:
        """Seconds each engine worker spent on jobs (here the one thread), the running job's so far included."""
        with self.progress.lock:
            running = time.monotonic() - self.progress.started if self.progress.job_id else 0.0
        return {"thread": self._busy + running}

    def _run_job(self, job: JobRecord) -> None:
        token = self.cancel_token = CancelToken()
        with self.progress.lock:
            self.progress.job_id, self.progress.fraction, self.progress.started = job.id, 0.0, time.monotonic()
            self.progress.preview = None
        try:
            if self.store.is_cancel_requested(job.id):
                raise Cancelled("cancelled before it started")
            on_event = self._on_progress(job.id, token)
            if job.kind == XYZ_KIND:
                record = run_xyz_job(self.engine, job.payload, self.images_dir, on_event, token)
            else:
                record = self._generate(job, on_event, token)
            self.store.finish(job.id, record)
        except Cancelled:
            self.store.mark_cancelled(job.id)
        except Exception as e:  # the worker must outlive any job
            if not isinstance(e, SdStudioError):
                log.exception("job %s failed", job.id)
            self.store.fail(job.id, failure_reason(e))
        finally:
            with self.progress.lock:  # busy time grows as the job's share of it leaves: /metrics never dips
                self._busy += time.monotonic() - self.progress.started
                self.progress.job_id, self.progress.preview = None, None
            self.cancel_token = None
            self.ended()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def ended(self) -> None:
        """Wake the requests waiting on a job (`wait`): one has ended."""
        with self._finished:
            self._finished.notify_all()

    def _generate(self, job: JobRecord, on_event: Callable[[ProgressEvent], None],
                  token: CancelToken) -> dict[str, Any]:
        """One generation request: run the door's prepared job (else prepare the durable payload), save; the
        history record."""
        with self._prepared_lock:
            prepared = self._prepared.pop(job.id, None)
        if prepared is None:
            prepared = self.engine.prepare(decode_request(job.payload))
        result = self.engine.generate(prepared, progress=on_event, cancel=token)
        saved = save_result(result, self.images_dir)
        return self.result_record(result, saved)

    def _on_progress(self, job_id: str, token: CancelToken) -> Callable[[ProgressEvent], None]:
        def on_event(event: ProgressEvent) -> None:
            with self.progress.lock:
                p = self.progress
                p.fraction, p.step, p.steps = event.fraction, event.step, event.steps
                p.iteration, p.n_iter, p.preview = event.iteration, event.n_iter, event.preview
            if self.store.is_cancel_requested(job_id):
                token.cancel()

        return on_event

    def result_record(self, result: Any, saved: list[Any]) -> dict[str, Any]:
        """What history keeps: image files and denoising captures (relative to the images folder), captured
        steps, seeds, infotexts, timings."""
        return {
            **saved_entries(result.images, saved, self.images_dir),
            "request": result.request.to_dict(),
            "warnings": list(result.warnings),
            "seconds": result.seconds,
        }
