"""AUTOMATIC1111's /sdapi/v1 routes over the same queue and worker as the native API.

A1111 answers txt2img/img2img only when the images are made; so do we: the job is queued like any
other (durable, one worker) and the route waits for it. Interrupt and skip act on the running job only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from sdstudio.a1111 import options as listings
from sdstudio.a1111.bodies import Img2ImgBody, Txt2ImgBody
from sdstudio.a1111.infotext import parse_infotext
from sdstudio.a1111.responses import a1111_response
from sdstudio.a1111.translate import fallback_notes, to_native_payload
from sdstudio.engine.pipelines.upscale import latent_upscale_modes
from sdstudio.errors import ModelError, NotFound, RequestError, SdStudioError
from sdstudio.models.find import catalog
from sdstudio.models.load.vae import vae_files
from sdstudio.pictures import decode_image
from sdstudio.server.a1111_discovery import add_discovery_routes
from sdstudio.server.a1111_extras import add_extras_routes
from sdstudio.server.a1111_settings import A1111Settings
from sdstudio.server.state import ServerState
from sdstudio.server.worker import JobProgress
from sdstudio.storage.images import text_chunks

log = logging.getLogger(__name__)
NOTHING_RUNNING = JobProgress("", 0.0, 0, 0, 0, 0, 0.0)
A1111_KIND = "sdapi"  # the job kind of A1111-route jobs, as history shows them


def add_a1111_routes(app: FastAPI, state: ServerState) -> None:
    worker, store = state.worker, state.store
    settings = A1111Settings(state.data_dir)

    def generate(body: Txt2ImgBody | Img2ImgBody) -> dict[str, Any]:
        """Translate, prepare (bad input: 422 before anything is queued), queue, wait for the job's end, and
        answer from its durable record and stored files."""
        payload = to_native_payload(body, settings.current, state.settings.limits.max_controlnet_units)
        prepared = state.engine.prepare(state.decode(payload))
        job = worker.submit(f"{A1111_KIND}-{prepared.request.mode}", payload, prepared)
        done = worker.wait(job.id)
        if done is None or done.status != "done" or not done.result:
            reason = done.error if done else "the job disappeared"
            if done is not None and done.status == "cancelled":
                reason = "interrupted"
            raise RequestError(reason or "the job did not finish", "job")
        pngs = [state.image_bytes(job.id, name, i) for i, name in enumerate(done.result["images"])]
        notes = fallback_notes(body)
        for note in notes:
            log.warning("A1111 request: %s", note)
        image_format = settings.current.updated(body.override_settings or {}).get("samples_format")
        return a1111_response(body, done.result, pngs, notes=notes, image_format=image_format)

    @app.post("/sdapi/v1/txt2img")
    def txt2img(body: Txt2ImgBody) -> dict[str, Any]:
        return generate(body)

    @app.post("/sdapi/v1/img2img")
    def img2img(body: Img2ImgBody) -> dict[str, Any]:
        return generate(body)

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        current = settings.current
        if current.sd_model_checkpoint is None:
            return {**current.to_dict(), "sd_model_checkpoint": default_title()}
        return current.to_dict()

    def default_title() -> str | None:
        """The default model as sd-models lists it (the operator may have given it as a path)."""
        try:
            ref = state.engine.model_ref()
        except SdStudioError:
            return state.settings.default_model
        sha256 = state.engine.models.hashes.quick_sha256(ref.path)
        return listings.model_title(ref, sha256[:listings.MODEL_HASH_DIGITS] if sha256 else None)

    @app.post("/sdapi/v1/options")
    def set_options(data: dict[str, Any]) -> None:
        """As A1111: every option it lists can be written and read back; a bad value is a 422 naming the option,
        and then nothing of the request is stored."""
        if data.get("sd_model_checkpoint") == "":  # Open WebUI posts GET /options back with "" for "unchanged"
            data = {k: v for k, v in data.items() if k != "sd_model_checkpoint"}
        checkpoint = data.get("sd_model_checkpoint")
        if checkpoint is not None and checkpoint != get_options()["sd_model_checkpoint"]:
            state.engine.model_ref(checkpoint)  # unknown names fail here, listing close ones
        settings.update(data)

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        refs = catalog.scan([folder for _, folder in state.engine.folders.checkpoints])
        return listings.sd_models(refs, lambda ref: state.engine.models.hashes.quick_sha256(ref.path))

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        return None  # the catalog is scanned on every lookup

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return listings.samplers()

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return listings.schedulers()

    @app.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [u.to_dict() for u in state.engine.upscalers.available()]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_modes() -> list[dict[str, str]]:
        return [{"name": name} for name in latent_upscale_modes()]

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        live = worker.live() or NOTHING_RUNNING  # the job running longest
        opts = settings.current
        show = opts.get("live_previews_enable") and opts.get("show_progress_every_n_steps") != -1
        image = worker.preview_png(live.job_id) if live.job_id and show and not skip_current_image else None
        counts = store.counts()
        return {"progress": live.fraction, "eta_relative": live.eta,
                "state": {"skipped": False, "interrupted": False, "job": live.job_id,
                          "job_count": counts["queued"] + counts["running"], "job_timestamp": "",
                          "job_no": live.iteration, "sampling_step": live.step, "sampling_steps": live.steps,
                          "n_iter": live.n_iter},
                "current_image": image, "textinfo": None, "current_task": live.job_id or None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict[str, Any]:
        """As A1111: the running job's current image is finished from the model's current estimate and
        returned; no further batch is made. Queued jobs are not touched. A1111 answers {}."""
        worker.interrupt(how="interrupt")
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> dict[str, Any]:
        worker.interrupt(how="skip")
        return {}

    add_discovery_routes(app, state)
    add_extras_routes(app, state)

    @app.post("/sdapi/v1/png-info")
    def read_png_info(data: dict[str, Any]) -> dict[str, Any]:
        image = decode_image(data.get("image"), "image", state.settings.limits.max_upload_pixels)
        chunks = text_chunks(image)
        text = chunks.get("parameters", "")
        items = {k: v for k, v in chunks.items() if k != "parameters"}
        parsed = parse_infotext(text).params if text else {}
        return {"info": text, "items": items, "parameters": parsed}

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        files = vae_files(state.engine.folders.vae)
        return [{"model_name": p.name, "filename": p.name} for p in files]

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        files = state.engine.addons.lora_files()
        return [{"name": p.stem, "alias": p.stem, "path": p.name, "metadata": {}} for p in files]

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        files = state.engine.addons.embedding_files()
        return {"loaded": {p.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                    "shape": None, "vectors": None} for p in files.values()}, "skipped": {}}

    @app.get("/sdapi/v1/memory")
    def memory() -> dict[str, Any]:
        return memory_report()


def memory_report() -> dict[str, Any]:
    """A1111's /memory shape, the parts we can measure: process RSS and the CUDA allocator's counters."""
    import resource

    import torch

    ram = {"used": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # peak RSS in bytes (Linux: KiB)
    cuda: dict[str, Any] = {"error": "no CUDA device"}
    if torch.cuda.is_available():
        cuda = {"system": {"free": torch.cuda.mem_get_info()[0], "total": torch.cuda.mem_get_info()[1]},
                "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
                "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()}}
    return {"ram": ram, "cuda": cuda}


def a1111_error(e: SdStudioError, scrub: Callable[[str], str]) -> tuple[int, dict[str, Any]]:
    """Status and A1111-shaped body for our errors (bad input: 422 saying what to fix); `scrub` hides local
    folders."""
    if isinstance(e, NotFound):
        return 404, listings.error_body(404, scrub(str(e)), error="NotFound")
    field = getattr(e, "field", None)
    name = "ModelError" if isinstance(e, ModelError) else type(e).__name__
    return 422, listings.error_body(422, scrub(str(e)), field, name)
