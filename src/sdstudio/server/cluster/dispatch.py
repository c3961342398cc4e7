"""RayWorker: the server's worker when jobs run on a Ray cluster.

The head keeps everything durable (the SQLite queue, history, images) and one dispatcher thread. Each pass:
collect runs that ended (save on the head, finish/fail/cancel the record; a dead actor's job goes back to the
queue under the store's attempt rule), pass cancel requests and progress along, then hand the next queued job
to an idle actor, preferring one that already holds the job's model (affinity) so models stay warm.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from sdstudio.engine.engine import Engine
from sdstudio.errors import SdStudioError
from sdstudio.server.cluster.actor import ActorJob, EngineActor, Outcome
from sdstudio.server.cluster.options import ClusterOptions
from sdstudio.server.worker import JobProgress, Worker
from sdstudio.server.xyz_job import XYZ_KIND, save_xyz_job
from sdstudio.storage.jobs import JobRecord
from sdstudio.storage.queue import JobQueue
from sdstudio.storage.results import save_result

log = logging.getLogger(__name__)
WATCH_EVERY = 0.2  # seconds between progress and cancel checks of the running jobs
CALL_TIMEOUT = 5.0  # seconds a route waits on an actor (preview, interrupt)
DIED = "the cluster worker running this job died"


@dataclass
class Slot:
    """One EngineActor and what the dispatcher knows of it."""

    name: str
    handle: Any                     # ray ActorHandle
    model: str | None = None        # the model it ran last: it is still loaded there (affinity)
    job: JobRecord | None = None    # running there
    run: Any = None                 # ObjectRef of that run's Outcome
    starting: Any = None            # ObjectRef of a ping while the actor (re)starts; None once it answered
    progress: JobProgress | None = None
    cancel_sent: bool = False
    since: float = 0.0              # when the running job started
    busy: float = 0.0               # seconds spent on finished jobs

    @property
    def idle(self) -> bool:
        return self.job is None and self.starting is None


class RayWorker(Worker):
    def __init__(self, engine: Engine, store: JobQueue, images_dir: Path, options: ClusterOptions,
                 poll: float = 0.05):
        super().__init__(engine, store, images_dir, poll)
        self.options = options
        self.slots: list[Slot] = []
        self._slots_lock = threading.Lock()  # the dispatcher changes slots; routes read them
        self._owns_ray = False
        self._watched = 0.0
        self._asked = 0

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.options.address, include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        self.slots = [self._new_slot(i) for i in range(self._worker_count())]
        log.info("ray: %d engine worker(s), %s each", len(self.slots), self._resources())
        super().start()

    def stop(self, timeout: float = 10.0) -> None:
        for slot in self.slots:
            if slot.job is not None:
                slot.handle.control.remote(slot.job.id, "cancel")
        super().stop(timeout)
        for slot in self.slots:
            ray.kill(slot.handle)
        if self._owns_ray:
            ray.shutdown()

    def submit(self, kind: str, payload: dict[str, Any], prepared: Any = None,
               idempotency_key: str | None = None) -> JobRecord:
        """As the thread worker; the door's PreparedJob is not kept: each actor prepares from the payload."""
        return super().submit(kind, payload, None, idempotency_key)

    def _resources(self) -> dict[str, float]:
        """What each actor asks Ray for: GPUs when the cluster has some, or may get some (--autoscale)."""
        gpu = self.options.gpus_per_worker and (ray.cluster_resources().get("GPU", 0) or self.options.autoscale)
        return {"num_cpus": self.options.cpus_per_worker, "num_gpus": self.options.gpus_per_worker if gpu else 0.0}

    def _worker_count(self) -> int:
        """One per `gpus_per_worker` of the cluster's GPUs, else workers_per_node on each node with CPUs; with
        --autoscale it may be none yet (more are started as nodes join)."""
        if self._resources()["num_gpus"]:
            count = int(ray.cluster_resources().get("GPU", 0) / self.options.gpus_per_worker)
        else:
            count = self.options.workers_per_node * sum(1 for n in ray.nodes()
                                                        if n["Alive"] and n["Resources"].get("CPU", 0))
        return count if self.options.autoscale else max(1, count)

    def _new_slot(self, index: int) -> Slot:
        threads = max(1, int(self.options.cpus_per_worker))
        actor = ray.remote(EngineActor).options(**self._resources(), max_restarts=-1, max_concurrency=4)
        handle = actor.remote(self.engine.settings, threads)
        return Slot(f"ray-{index}", handle, starting=handle.ping.remote())

    # -- the dispatcher thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._collect()
                self._watch()
                if self.options.autoscale:
                    self._autoscale()
                if not self._dispatch():
                    self._wake.wait(self.poll)
                    self._wake.clear()
            except Exception:  # the dispatcher must outlive anything one pass meets
                log.exception("ray dispatcher pass failed")
                time.sleep(1.0)

    def _collect(self) -> None:
        refs = [r for s in self.slots for r in (s.run, s.starting) if r is not None]
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for slot in self.slots:
            if slot.starting is not None and slot.starting in ready:
                self._started(slot)
            if slot.run is not None and slot.run in ready:
                self._ended(slot)

    def _started(self, slot: Slot) -> None:
        try:
            host = ray.get(slot.starting)
            slot.starting = None
            log.info("%s ready on %s", slot.name, host)
        except RayActorError:  # died while starting: it restarts (max_restarts), so ask again
            slot.starting = slot.handle.ping.remote()

    def _ended(self, slot: Slot) -> None:
        job, ref = slot.job, slot.run
        assert job is not None
        with self._slots_lock:
            slot.job = slot.run = slot.progress = None
            slot.busy += time.monotonic() - slot.since
        try:
            self._record(job, ray.get(ref))
        except RayActorError:  # the actor, its process or its node died: the job runs again elsewhere
            log.warning("%s died running job %s", slot.name, job.id)
            slot.model, slot.starting = None, slot.handle.ping.remote()
            self.store.requeue(job.id, DIED, self.options.max_attempts)
        except Exception as e:  # the run broke outside the actor's own handling, or saving failed here
            log.exception("job %s failed", job.id)
            self.store.fail(job.id, f"internal error ({type(e).__name__}); see the server log")
        finally:
            self.ended()

    def _record(self, job: JobRecord, outcome: Outcome) -> None:
        if outcome.status == "cancelled":
            self.store.mark_cancelled(job.id)
        elif outcome.status == "failed":
            self.store.fail(job.id, outcome.reason)
        elif job.kind == XYZ_KIND:
            self.store.finish(job.id, save_xyz_job(outcome.result, self.images_dir))
        else:
            result = outcome.result
            self.store.finish(job.id, self.result_record(result, save_result(result, self.images_dir)))

    def _watch(self) -> None:
        """Every WATCH_EVERY seconds: pass cancel requests to the actors and fetch each running job's progress."""
        if time.monotonic() - self._watched < WATCH_EVERY:
            return
        self._watched = time.monotonic()
        running = [s for s in self.slots if s.job is not None]
        for slot in running:
            if not slot.cancel_sent and self.store.is_cancel_requested(slot.job.id):
                slot.handle.control.remote(slot.job.id, "cancel")
                slot.cancel_sent = True
        asks = [(slot, slot.job.id, slot.handle.progress.remote(slot.job.id)) for slot in running]
        for slot, job_id, ref in asks:
            try:
                progress = ray.get(ref, timeout=CALL_TIMEOUT)
            except (RayActorError, GetTimeoutError):
                continue  # a dead actor is seen by _collect
            with self._slots_lock:
                if slot.job is not None and slot.job.id == job_id:
                    slot.progress = progress

    def _dispatch(self) -> bool:
        """Hand the next queued job to an idle actor; True when one was handed out (or ended at once)."""
        idle = [s for s in self.slots if s.idle]
        if not idle:
            return False
        job = self.store.claim_next()
        if job is None:
            return False
        if self.store.is_cancel_requested(job.id):
            self.store.mark_cancelled(job.id)
            self.ended()
            return True
        try:
            model, sha256 = self._model_of(job)
        except SdStudioError as e:
            self.store.fail(job.id, str(e))
            self.ended()
            return True
        slot = next((s for s in idle if s.model == model), next((s for s in idle if s.model is None), idle[0]))
        with self._slots_lock:
            slot.job, slot.model, slot.since, slot.cancel_sent = job, model, time.monotonic(), False
            slot.progress = JobProgress(job.id, 0.0, 0, 0, 0, 0, 0.0)
            slot.run = slot.handle.run.remote(ActorJob(job.id, job.kind, job.payload, sha256))
        return True

    def _model_of(self, job: JobRecord) -> tuple[str, str | None]:
        """The job's model name as this server resolves it, and (for a generation) its file's sha256."""
        request = job.payload.get("request", {}) if job.kind == XYZ_KIND else job.payload
        ref = self.engine.model_ref(request.get("model") or None)
        return ref.name, None if job.kind == XYZ_KIND else self.engine.models.hashes.model_sha256(ref.path)

    def _autoscale(self) -> None:
        """Ask the autoscaler for one worker's resources per job queued or running (up to max_workers), and
        start actors while the cluster has room for them."""
        from ray.autoscaler.sdk import request_resources

        counts = self.store.counts()
        wanted = min(self.options.max_workers, counts["queued"] + counts["running"])
        resources = self._resources()
        bundle = {"CPU": resources["num_cpus"], **({"GPU": resources["num_gpus"]} if resources["num_gpus"] else {})}
        if wanted != self._asked:
            request_resources(bundles=[bundle] * wanted)
            self._asked = wanted
        free = ray.available_resources()
        if len(self.slots) < wanted and all(free.get(k, 0) >= v for k, v in bundle.items()):
            self.slots.append(self._new_slot(len(self.slots)))

    # -- what the routes ask --------------------------------------------------------------------------

    def _slot_running(self, job_id: str | None) -> Slot | None:
        with self._slots_lock:
            running = sorted((s for s in self.slots if s.job is not None), key=lambda s: s.since)
        if job_id is None:
            return running[0] if running else None
        return next((s for s in running if s.job is not None and s.job.id == job_id), None)

    def live(self, job_id: str | None = None) -> JobProgress | None:
        slot = self._slot_running(job_id)
        return slot.progress if slot is not None else None

    def interrupt(self, job_id: str | None = None, how: str = "cancel") -> bool:
        slot = self._slot_running(job_id)
        if slot is None or slot.job is None:
            return False
        try:
            return bool(ray.get(slot.handle.control.remote(slot.job.id, how), timeout=CALL_TIMEOUT))
        except (RayActorError, GetTimeoutError):
            return False

    def preview_png(self, job_id: str | None = None) -> str | None:
        slot = self._slot_running(job_id)
        if slot is None or slot.job is None:
            return None
        try:
            return ray.get(slot.handle.preview_png.remote(slot.job.id), timeout=CALL_TIMEOUT)
        except (RayActorError, GetTimeoutError):
            return None

    def busy_seconds(self) -> dict[str, float]:
        now = time.monotonic()
        with self._slots_lock:
            return {s.name: s.busy + (now - s.since if s.job is not None else 0.0) for s in self.slots}
