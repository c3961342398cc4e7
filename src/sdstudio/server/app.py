"""The HTTP door: FastAPI app with the native job API (/api/v1); the worker owns the device.

Every job goes through the durable queue (storage/jobs.py): submitting returns its id at once, the one
worker runs jobs in order, results and images are kept in the data folder. Images are referenced by
job id and index only: no route takes a path.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from sdstudio.engine.engine import Engine
from sdstudio.errors import NotFound, RequestError, SdStudioError
from sdstudio.server.a1111_routes import a1111_error, add_a1111_routes
from sdstudio.server.body_checks import BodyLimit, CheckedJSONRoute
from sdstudio.server.browser_guards import BrowserGuards
from sdstudio.server.cluster.options import ClusterOptions
from sdstudio.server.metrics_routes import add_metrics_routes
from sdstudio.server.state import ServerState, get_job, job_view
from sdstudio.server.studio_routes import add_studio_routes
from sdstudio.server.ui_routes import add_ui_routes
from sdstudio.server.worker import Worker
from sdstudio.settings import PACKAGED_MODELS, Settings
from sdstudio.storage.jobs import STATUSES, JobStore
from sdstudio.storage.lock import FolderLock

log = logging.getLogger(__name__)




class JobBody(BaseModel):
    """A job: the request fields as GenerationRequest names them, pictures as base64 PNG."""

    request: dict[str, Any] = Field(description="GenerationRequest fields; init_image, mask and ControlNet "
                                                "images as base64")
    idempotency_key: str | None = Field(default=None, max_length=200)




def create_app(settings: Settings, data_dir: Path, start_worker: bool = True,
               auth: dict[str, str] | None = None, allowed_hosts: list[str] | None = None,
               allowed_origins: tuple[str, ...] = (), cluster: ClusterOptions | None = None) -> FastAPI:
    """auth: user -> password; when given, every route (docs included) needs HTTP Basic credentials.
    allowed_hosts: Host names requests must carry (None: any); allowed_origins: web pages that may change state
    besides this server's own (browser_guards.py). cluster: run jobs on Ray actors (cluster/) instead of the one
    worker thread.
    Model-like fields take names only (a path from the network is never opened: models/find/names.py)."""
    settings = dataclasses.replace(settings, names_only=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(data_dir)  # before recovery: "running" jobs are then a dead server's
    store = JobStore(data_dir / "jobs.sqlite3")
    recovered = store.recover()
    if recovered:
        log.warning("recovered %d job(s) left running by the last shutdown", len(recovered))
    engine = Engine(settings)
    images_dir = settings.outputs_dir.resolve()  # the outputs folder every door writes to (A1111's layout)
    worker = make_worker(engine, store, images_dir, cluster)
    state = ServerState(settings, engine, store, worker, images_dir, private_roots(settings, data_dir), data_dir)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_worker:
            worker.start()
        yield
        worker.stop()
        lock.release()

    app = FastAPI(title="sdstudio", version="1", lifespan=lifespan,
                  description="Native job API (/api/v1) and AUTOMATIC1111-compatible API (/sdapi/v1).")
    app.router.route_class = CheckedJSONRoute  # before any route: every JSON body is checked (body_checks.py)
    app.state.sdstudio = state
    add_error_handlers(app, state.roots)
    add_request_filters(app, settings.limits.max_upload_bytes)
    app.add_middleware(BrowserGuards, allowed_hosts=allowed_hosts, origins=allowed_origins)
    add_a1111_routes(app, state)
    add_studio_routes(app, state)
    add_metrics_routes(app, state)
    if auth:
        add_basic_auth(app, auth)

    @app.post("/api/v1/jobs", status_code=202)
    def submit(body: JobBody, idempotency_key: str | None = Header(default=None)) -> dict[str, Any]:
        # needs no model loaded: 422 before queueing
        prepared = engine.prepare(state.decode(body.request))
        job = worker.submit(prepared.request.mode, body.request, prepared, body.idempotency_key or idempotency_key)
        return job_view(job, state)

    @app.get("/api/v1/jobs/{job_id}")
    def status(job_id: str) -> dict[str, Any]:
        return job_view(get_job(store, job_id), state)

    @app.post("/api/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        job = store.cancel(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        if job.status == "running":
            worker.interrupt(job_id)
        return job_view(store.get(job_id) or job, state)

    @app.post("/api/v1/jobs/{job_id}/front")
    def to_front(job_id: str) -> dict[str, Any]:
        """A queued job runs next (the web UI's Ctrl+Shift+Enter); a job already running or ended is unchanged."""
        job = store.move_to_front(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job_view(job, state)

    @app.post("/api/v1/jobs/{job_id}/interrupt")
    def interrupt(job_id: str, how: str = "interrupt") -> dict[str, Any]:
        """Stop a running job and keep what it finished, as A1111's Interrupt (how=skip: its current batch
        only, the job goes on); the job ends done with those images. POST .../cancel discards instead."""
        if how not in ("interrupt", "skip"):
            raise RequestError(f"how must be interrupt or skip, got {how!r}", "how")
        job = get_job(store, job_id)
        if job.status != "running" or not worker.interrupt(job_id, how=how):
            raise RequestError(f"job {job_id} is {job.status}, not running: only a running job can be "
                               "interrupted (cancel a queued one)", "job_id")
        return job_view(store.get(job_id) or job, state)

    @app.get("/api/v1/jobs")
    def history(offset: int = 0, limit: int = 20, q: str | None = None, status: str | None = None) -> dict[str, Any]:
        if not 0 <= offset <= 2**62 or not 1 <= limit <= 100:
            raise RequestError("offset must be >= 0 and limit between 1 and 100", "limit")
        if status is not None and status not in STATUSES:
            raise RequestError(f"status must be one of {', '.join(STATUSES)}, got {status!r}", "status")
        jobs, total = store.history(offset, limit, q, status)
        return {"total": total, "offset": offset, "jobs": [job_view(j, state) for j in jobs]}

    @app.get("/api/v1/images/{job_id}/{index}")
    def image(job_id: str, index: int) -> Response:
        job = get_job(store, job_id)
        files = (job.result or {}).get("images", [])
        if not 0 <= index < len(files):
            raise NotFound(f"job {job_id} has no image {index}")
        return Response(state.image_bytes(job_id, files[index], index), media_type="image/png")

    @app.get("/api/v1/jobs/{job_id}/events")
    async def events(job_id: str) -> StreamingResponse:
        get_job(store, job_id)
        return StreamingResponse(_events(state, job_id), media_type="text/event-stream")

    add_ui_routes(app, state)
    return app




async def _events(state: ServerState, job_id: str) -> AsyncIterator[str]:
    """Server-sent events: `progress` while the job waits or runs (with a base64 PNG `preview` of the first
    image's current latents while it runs), then one `done` with its final view."""
    while True:
        job = state.store.get(job_id)
        if job is None or job.status in ("done", "failed", "cancelled"):
            yield f"event: done\ndata: {json.dumps(job_view(job, state) if job else {})}\n\n"
            return
        view = job_view(job, state)
        preview = await asyncio.to_thread(state.worker.preview_png, job_id)  # a cluster worker's is a remote call
        if preview:
            view["preview"] = preview
        yield f"event: progress\ndata: {json.dumps(view)}\n\n"
        await asyncio.sleep(0.25)


def make_worker(engine: Engine, store: JobStore, images_dir: Path, cluster: ClusterOptions | None) -> Worker:
    """The thread worker, or with cluster options the Ray dispatcher (the only place Ray is imported)."""
    if cluster is None:
        return Worker(engine, store, images_dir)
    from sdstudio.server.cluster.dispatch import RayWorker

    return RayWorker(engine, store, images_dir, cluster)


def private_roots(settings: Settings, data_dir: Path) -> dict[str, str]:
    """Local folders that error messages name, and what clients see instead."""
    roots = {str(data_dir): "<data>", str(settings.home): "<home>", str(PACKAGED_MODELS): "<bundled>",
             str(Path.home()): "~"}
    for name, folder in (("a1111", settings.a1111_dir), ("comfyui", settings.comfyui_dir),
                         ("hf-cache", settings.hf_cache)):
        if folder:
            roots[str(folder)] = f"<{name}>"
    for folder in settings.models_dirs:
        roots.setdefault(str(folder), "<models>")
    return dict(sorted(roots.items(), key=lambda kv: -len(kv[0])))  # longest first: nested folders


def add_request_filters(app: FastAPI, limit: int) -> None:
    app.add_middleware(BodyLimit, limit=limit)

    @app.middleware("http")
    async def repeated_slashes(request: Request, call_next: Any) -> Any:
        """"//sdapi/v1/txt2img" is "/sdapi/v1/txt2img": clients join a base URL ending in "/" with a path."""
        if "//" in request.scope["path"]:
            request.scope["path"] = re.sub("/{2,}", "/", request.scope["path"])
        return await call_next(request)


def add_error_handlers(app: FastAPI, roots: dict[str, str]) -> None:
    """Bad input is a 4xx with a JSON body saying what to fix; nothing leaks a stack trace or a path."""

    def scrub(message: str) -> str:
        for root, label in roots.items():
            message = message.replace(root, label)
        return message

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        if request.url.path.startswith("/sdapi/"):
            status, body = a1111_error(e, scrub)
            return JSONResponse(body, status_code=status)
        return JSONResponse({"error": "bad request", "detail": scrub(str(e)), "field": e.field}, status_code=422)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, e: NotFound) -> JSONResponse:
        return JSONResponse({"error": "not found", "detail": scrub(str(e))}, status_code=404)

    @app.exception_handler(SdStudioError)
    async def sdstudio_error(request: Request, e: SdStudioError) -> JSONResponse:
        if request.url.path.startswith("/sdapi/"):
            status, body = a1111_error(e, scrub)
            return JSONResponse(body, status_code=status)
        return JSONResponse({"error": type(e).__name__, "detail": scrub(str(e))}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in err["loc"] if p != "body"), "message": err["msg"]}
                    for err in e.errors()]
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        if request.url.path.startswith("/sdapi/"):
            status, body = a1111_error(RequestError(f"{first['field']}: {first['message']}", first["field"]), scrub)
            return JSONResponse(body, status_code=status)
        return JSONResponse({"error": "bad request", "detail": f"{first['field']}: {first['message']}",
                             "errors": problems}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": "internal error", "detail": type(e).__name__}, status_code=500)


def add_basic_auth(app: FastAPI, users: dict[str, str]) -> None:
    """HTTP Basic on every route; passwords compared in constant time."""

    @app.middleware("http")
    async def basic_auth(request: Request, call_next: Any) -> Any:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            expected = users.get(user)
            if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
                return await call_next(request)
        return JSONResponse({"error": "unauthorized", "detail": "give the user and password set with --api-auth"},
                            status_code=401, headers={"WWW-Authenticate": 'Basic realm="sdstudio"'})


def parse_auth(text: str | None) -> dict[str, str] | None:
    """"user:pass[,user2:pass2]" -> {user: pass}; a malformed entry is a RequestError."""
    if not text:
        return None
    users = {}
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise RequestError(f"--api-auth takes user:password pairs separated by commas, got {entry!r}",
                               "api_auth")
        users[user] = password
    return users
