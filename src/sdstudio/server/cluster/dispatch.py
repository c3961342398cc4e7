"""RayWorker: the server's worker when jobs run on a Ray cluster.

The head keeps everything durable (the SQLite queue, history, images) and one dispatcher thread that never
blocks on an actor. Each pass: collect runs that ended (save on the head, finish/fail/cancel the record; a lost
run's job goes back to the queue under the store's attempt rule), pass cancel requests along and gather progress,
hand the next queued job to an idle actor, preferring one that already holds the job's model (affinity), and with
--autoscale size the cluster to the queue. Routes read snapshots of the slots taken under one lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayError, RayTaskError

from sdstudio.engine.engine import Engine
from sdstudio.errors import SdStudioError
from sdstudio.server.cluster.actor import ActorJob, Outcome
from sdstudio.server.cluster.options import ClusterOptions
from sdstudio.server.cluster.slots import START_TRIES, Slot, actor_resources, start_actor, worker_count
from sdstudio.server.worker import JobProgress, Worker, failure_reason
from sdstudio.server.xyz_job import XYZ_KIND, save_xyz_job
from sdstudio.storage.jobs import JobRecord
from sdstudio.storage.queue import JobQueue
from sdstudio.storage.results import save_result

log = logging.getLogger(__name__)
WATCH_EVERY = 0.2  # seconds between progress and cancel checks of the running jobs
CALL_TIMEOUT = 5.0  # seconds a route waits on an actor (preview, interrupt)
RECHECK_EVERY = 0.5  # seconds between pings of an actor Ray is restarting
LOST_AFTER = 120.0  # seconds without an answer about its job after which a run counts as lost
DIED = "the cluster worker running this job died"


class RayWorker(Worker):
    def __init__(self, engine: Engine, store: JobQueue, images_dir: Path, options: ClusterOptions,
                 poll: float = 0.05):
        super().__init__(engine, store, images_dir, poll)
        self.options = options
        self.slots: list[Slot] = []
        self._lock = threading.Lock()  # the dispatcher changes slots; routes take snapshots
        self._owns_ray = not ray.is_initialized()
        self._watched = 0.0
        self._asked = -1
        if self._owns_ray:  # joined here, before the server starts, so a wrong address is a plain error
            try:
                ray.init(address=self.options.address, include_dashboard=False, log_to_driver=False)
            except Exception as e:
                where, why = self.options.address or "local", str(e).rstrip(".")
                raise SdStudioError(f"could not start or join the Ray cluster ({where}): {why}; check --address "
                                    "(auto needs `ray start` on this machine)") from e

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(worker_count(self.options)):
            self.slots.append(self._start_actor())
        log.info("ray: %d engine worker(s), %s each", len(self.slots), actor_resources(self.options))
        super().start()

    def stop(self, timeout: float = 10.0) -> None:
        """Jobs still running stay so in the store: the next start re-queues them (the recovery rule)."""
        super().stop(timeout)
        for slot in self.slots:
            ray.kill(slot.handle)
        if self._owns_ray:
            ray.shutdown()

    def _start_actor(self) -> Slot:
        index = max((int(s.name.split("-")[1]) + 1 for s in self.slots), default=0)
        return start_actor(f"ray-{index}", self.engine.settings, self.options)

    def submit(self, kind: str, payload: dict[str, Any], prepared: Any = None,
               idempotency_key: str | None = None) -> JobRecord:
        """As the thread worker, but the door's PreparedJob is not kept (each actor prepares from the payload),
        and the model file is hashed here, on the request's thread (remembered), not on the dispatcher's."""
        job = super().submit(kind, payload, None, idempotency_key)
        with contextlib.suppress(Exception):  # a model that cannot be hashed is reported when dispatched
            self._model_of(job)
        return job

    # -- the dispatcher thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for step in (self._collect, self._watch, self._dispatch, self._autoscale):
                try:
                    step()
                except Exception:  # the dispatcher outlives anything one step meets
                    log.exception("ray dispatcher: %s failed", step.__name__)
            self._wake.wait(self.poll)
            self._wake.clear()

    def _collect(self) -> None:
        refs = [r for s in self.slots for r in (s.run, s.starting, s.asked) if r is not None]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        for slot in list(self.slots):
            if slot.recheck is not None and time.monotonic() >= slot.recheck:
                slot.starting, slot.recheck = slot.handle.ping.remote(), None
            if slot.starting is not None and slot.starting in ready:
                self._started(slot)
            if slot.asked is not None and slot.asked in ready:
                self._heard(slot)
            if slot.run is not None and slot.run in ready:
                self._ended(slot)
            elif slot.job is not None and time.monotonic() - slot.heard > LOST_AFTER:
                log.warning("%s has not answered about job %s for %.0f s", slot.name, slot.job.id, LOST_AFTER)
                self._lost(slot)

    def _started(self, slot: Slot) -> None:
        try:
            host = ray.get(slot.starting)
            slot.starting, slot.failures, slot.since = None, 0, time.monotonic()
            log.info("%s ready on %s", slot.name, host)
        except ActorUnavailableError:  # Ray is restarting it: ask again in a moment
            slot.starting, slot.recheck = None, time.monotonic() + RECHECK_EVERY
        except Exception as e:  # its constructor failed or it died starting; Ray restarts it unless init failed
            slot.failures += 1
            log.error("%s failed to start (%d of %d tries): %s", slot.name, slot.failures, START_TRIES, e)
            slot.starting = None if slot.failures >= START_TRIES else slot.handle.ping.remote()
            slot.dead = slot.starting is None

    def _heard(self, slot: Slot) -> None:
        ref, slot.asked = slot.asked, None
        try:
            progress = ray.get(ref)
        except RayError:
            return  # a dead actor's run is seen by _collect
        with self._lock:
            if slot.job is not None and progress is not None and progress.job_id == slot.job.id:
                slot.progress, slot.heard = progress, time.monotonic()

    def _ended(self, slot: Slot) -> None:
        job, ref = slot.job, slot.run
        self._release(slot)
        try:
            self._record(job, ray.get(ref))
        except RayTaskError as e:  # an error escaped the actor's own handling
            log.error("job %s failed on %s: %s", job.id, slot.name, e)
            self.store.fail(job.id, failure_reason(e.cause if isinstance(e.cause, Exception) else e))
        except RayError:  # the actor, its process or its node died, or the result was lost: run it again
            log.warning("%s lost job %s", slot.name, job.id)
            self._restarting(slot)
            self.store.requeue(job.id, DIED, self.options.max_attempts)
        except Exception as e:  # saving failed here
            log.exception("job %s: saving its result failed", job.id)
            self.store.fail(job.id, f"internal error ({type(e).__name__}); see the server log")
        finally:
            self.ended()

    def _lost(self, slot: Slot) -> None:
        """A run nobody has heard of for LOST_AFTER: the actor is gone or stuck restarting; run the job again."""
        job = slot.job
        self._release(slot)
        self._restarting(slot)
        self.store.requeue(job.id, DIED, self.options.max_attempts)
        self.ended()

    def _release(self, slot: Slot) -> None:
        with self._lock:
            slot.busy += time.monotonic() - slot.since
            slot.job = slot.run = slot.progress = slot.asked = None
            slot.since = time.monotonic()

    def _restarting(self, slot: Slot) -> None:
        """Wait for the actor to answer again (Ray restarts it) before it gets another job; it holds no model."""
        slot.model, slot.starting = None, slot.handle.ping.remote()

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
        """Every WATCH_EVERY seconds: pass cancel requests on, and ask each running actor for its progress
        (answers are gathered by _collect)."""
        if time.monotonic() - self._watched < WATCH_EVERY:
            return
        self._watched = time.monotonic()
        for slot in self.slots:
            if slot.job is None:
                continue
            if not slot.cancel_sent and self.store.is_cancel_requested(slot.job.id):
                slot.handle.control.remote(slot.job.id, "cancel")
                slot.cancel_sent = True
            if slot.asked is None:
                slot.asked = slot.handle.progress.remote(slot.job.id)

    def _dispatch(self) -> None:
        """Hand queued jobs to idle actors (the one holding the job's model first)."""
        while (idle := [s for s in self.slots if s.idle]) and (job := self.store.claim_next()) is not None:
            try:
                self._hand_out(job, idle)
            except Exception as e:  # never leave a claimed job running with no actor on it
                log.exception("job %s could not be handed to an actor", job.id)
                self.store.fail(job.id, failure_reason(e))
                self.ended()

    def _hand_out(self, job: JobRecord, idle: list[Slot]) -> None:
        if self.store.is_cancel_requested(job.id):
            self.store.mark_cancelled(job.id)
            self.ended()
            return
        model, sha256 = self._model_of(job)
        slot = next((s for s in idle if s.model == model), next((s for s in idle if s.model is None), idle[0]))
        run = slot.handle.run.remote(ActorJob(job.id, job.kind, job.payload, sha256))
        now = time.monotonic()
        with self._lock:
            slot.job, slot.run, slot.model, slot.since, slot.heard, slot.cancel_sent = job, run, model, now, now, False
            slot.progress = JobProgress(job.id, 0.0, 0, 0, 0, 0, 0.0)

    def _model_of(self, job: JobRecord) -> tuple[str, str | None]:
        """The job's model name as this server resolves it, and (for a generation) its file's sha256."""
        request = job.payload.get("request", {}) if job.kind == XYZ_KIND else job.payload
        ref = self.engine.model_ref(request.get("model") or None)
        return ref.name, None if job.kind == XYZ_KIND else self.engine.models.hashes.model_sha256(ref.path)

    def _autoscale(self) -> None:
        """With --autoscale: ask Ray for one worker's resources per job waiting or running (up to max_workers),
        start an actor when the cluster has room for one, give back actors idle for idle_seconds."""
        if not self.options.autoscale:
            return
        counts = self.store.counts()
        wanted = min(self.options.max_workers, counts["queued"] + counts["running"])
        resources = actor_resources(self.options)
        bundle = {"CPU": resources["num_cpus"], **({"GPU": resources["num_gpus"]} if resources["num_gpus"] else {})}
        if wanted != self._asked:
            request_resources([bundle] * wanted)
            self._asked = wanted
        free = ray.available_resources()
        room = all(free.get(k, 0) >= v for k, v in bundle.items())
        if len(self.slots) < wanted and room and not any(s.starting is not None for s in self.slots):
            self.slots.append(self._start_actor())
        now = time.monotonic()
        for slot in [s for s in self.slots if s.idle and now - s.since > self.options.idle_seconds]:
            if len(self.slots) > wanted:
                ray.kill(slot.handle)
                with self._lock:
                    self.slots.remove(slot)

    # -- what the routes ask --------------------------------------------------------------------------

    def _running(self, job_id: str | None) -> tuple[Any, str, JobProgress | None] | None:
        """(actor handle, job id, progress) of the job (None: the one running longest), read under the lock."""
        with self._lock:
            running = sorted((s for s in self.slots if s.job is not None), key=lambda s: s.since)
            slot = running[0] if job_id is None and running else next(
                (s for s in running if s.job is not None and s.job.id == job_id), None)
            return (slot.handle, slot.job.id, slot.progress) if slot is not None and slot.job is not None else None

    def live(self, job_id: str | None = None) -> JobProgress | None:
        found = self._running(job_id)
        return found[2] if found is not None else None

    def interrupt(self, job_id: str | None = None, how: str = "cancel") -> bool:
        found = self._running(job_id)
        if found is None:
            return False
        try:
            return bool(ray.get(found[0].control.remote(found[1], how), timeout=CALL_TIMEOUT))
        except (RayError, GetTimeoutError):
            return False

    def preview_png(self, job_id: str | None = None) -> str | None:
        found = self._running(job_id)
        if found is None:
            return None
        try:
            return ray.get(found[0].preview_png.remote(found[1]), timeout=CALL_TIMEOUT)
        except (RayError, GetTimeoutError):
            return None

    def busy_seconds(self) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            return {s.name: s.busy + (now - s.since if s.job is not None else 0.0) for s in self.slots}


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ray's autoscaler request; over Ray Client (ray://) the driver has no GCS client of its own, so the call
    runs as a task on the cluster."""
    from ray.autoscaler import sdk

    if ray.util.client.ray.is_connected():
        ray.get(ray.remote(num_cpus=0)(sdk.request_resources).remote(bundles=bundles))
    else:
        sdk.request_resources(bundles=bundles)
