"""Native /api/v1 routes a browser UI needs beyond the job queue: one catalog for its pickers, PNG info,
ControlNet preprocessor previews, LoRA/embedding preview pictures, a job's request to re-run or edit,
denoising captures, and X/Y/Z plots as queued jobs. Every listing comes from the same functions the engine
resolves names with, so a name listed here is one the request fields accept. Files are found only from
stored job records, validated integers and listed names: no route takes a path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Header
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, Field

from sdstudio.a1111.names import MASKED_CONTENT  # our masked-content modes are A1111's
from sdstudio.a1111.options import MODEL_HASH_DIGITS, model_title
from sdstudio.engine.engine import Engine
from sdstudio.engine.flow.runner import FLOW_SAMPLER, FLOW_SCHEDULES
from sdstudio.engine.pipelines.upscale import is_x4_folder, latent_upscale_modes
from sdstudio.engine.presets import PRESETS, companion_lora
from sdstudio.engine.record import read_fields
from sdstudio.engine.requests import ControlUnit, GenerationRequest
from sdstudio.engine.sd.control import preprocess_control
from sdstudio.engine.sd.inpaint import INPAINT_METHODS
from sdstudio.engine.sd.preprocess import ALL_PREPROCESSORS
from sdstudio.engine.validate import check_int
from sdstudio.engine.workflows.xyz import AXIS_KINDS
from sdstudio.errors import NotFound, RequestError, SdStudioError
from sdstudio.models.find import catalog
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.inventory import family_of
from sdstudio.models.find.previews import preview_of
from sdstudio.models.load import controlnet
from sdstudio.models.load.families import FAMILY_INFO
from sdstudio.models.load.flow import LISTING_FAMILIES as FLOW_FAMILIES
from sdstudio.models.load.ip_adapter import available_adapters, available_encoders
from sdstudio.models.load.tiny_vae import TINY_NAMES, find_tiny_vae
from sdstudio.models.load.vae import vae_files
from sdstudio.pictures import decode_image, image_to_b64
from sdstudio.samplers import SAMPLERS, SCHEDULE_TYPES
from sdstudio.server.payload import encode_request
from sdstudio.server.state import ServerState, get_job, job_view
from sdstudio.server.xyz_job import XYZ_KIND, check_xyz, plan_xyz, xyz_payload
from sdstudio.storage.results import CAPTURE_ANIMATION, CAPTURE_KINDS, capture_frame_name, image_metadata

log = logging.getLogger(__name__)


class PngInfoBody(BaseModel):
    image: str = Field(description="a PNG as base64, optionally as a data: URL")


class PreprocessBody(BaseModel):
    image: str = Field(description="the picture as base64, optionally as a data: URL")
    preprocessor: str = Field(description="one of the catalog's preprocessors, e.g. canny")
    low_threshold: int = Field(default=100, description="canny: weaker edges kept where connected to strong ones")
    high_threshold: int = Field(default=200, description="canny: edges at least this strong")


class XYZBody(BaseModel):
    """An X/Y/Z plot: the base request as POST /api/v1/jobs takes it, and up to three axes."""

    request: dict[str, Any] = Field(description="GenerationRequest fields; pictures as base64")
    x: str = Field(description="columns, 'name=v1,v2,...', e.g. cfg=3,7 or steps=10-30 (+10)")
    y: str | None = Field(default=None, description="rows, same form as x")
    z: str | None = Field(default=None, description="one grid per value, same form as x")
    idempotency_key: str | None = Field(default=None, max_length=200)


def add_studio_routes(app: FastAPI, state: ServerState) -> None:
    """/api/v1/catalog, /png-info, /preprocess, /jobs/{id}/request, /images/{id}/{i}/capture..., /xyz."""

    @app.get("/api/v1/catalog")
    def get_catalog() -> dict[str, Any]:
        return catalog_of(state.engine)

    @app.post("/api/v1/png-info")
    def png_info(body: PngInfoBody) -> dict[str, Any]:
        meta = image_metadata(decode_image(body.image, "image", state.settings.limits.max_upload_pixels))
        source, fields = read_fields(meta)
        return {"infotext": meta.infotext, "fields": fields, "source": source}

    @app.post("/api/v1/preprocess")
    def run_preprocessor(body: PreprocessBody) -> dict[str, Any]:
        image = decode_image(body.image, "image", state.settings.limits.max_upload_pixels)
        check_preprocess(body, image, state.settings.limits.max_pixels)
        with state.worker.device_lock:  # annotators may use the device the worker owns
            control = preprocess_control(image.convert("RGB"), body.preprocessor, body.low_threshold,
                                         body.high_threshold, state.settings.home / "annotators")
        return {"image": image_to_b64(control)}

    @app.get("/api/v1/previews/{kind}/{name}")
    def network_preview(kind: str, name: str) -> FileResponse:
        """The preview picture kept next to a LoRA or embedding (the web UI's cards); found by name only."""
        found = network_files(state.engine, kind).get(name.lower())
        picture = preview_of(found) if found else None
        if picture is None:
            raise NotFound(f"no preview picture for the {kind} {name!r}")
        return FileResponse(picture)

    @app.get("/api/v1/jobs/{job_id}/request")
    def job_request(job_id: str) -> dict[str, Any]:
        return get_job(state.store, job_id).payload

    @app.get("/api/v1/images/{job_id}/{index}/capture")
    def capture(job_id: str, index: int) -> dict[str, Any]:
        _, steps = capture_of(get_job(state.store, job_id).result, job_id, index, state.images_dir)
        base = f"/api/v1/images/{job_id}/{index}/capture"
        return {"steps": steps,
                "frames": [{"step": s, **{kind: f"{base}/{s}/{kind}" for kind in CAPTURE_KINDS}} for s in steps],
                "animation": f"{base}/animation"}

    @app.get("/api/v1/images/{job_id}/{index}/capture/animation")
    def capture_animation(job_id: str, index: int) -> FileResponse:
        folder, _ = capture_of(get_job(state.store, job_id).result, job_id, index, state.images_dir)
        return FileResponse(existing(folder / CAPTURE_ANIMATION), media_type="image/gif")

    @app.get("/api/v1/images/{job_id}/{index}/capture/{step}/{kind}")
    def capture_frame(job_id: str, index: int, step: int, kind: str) -> FileResponse:
        folder, steps = capture_of(get_job(state.store, job_id).result, job_id, index, state.images_dir)
        if step not in steps:
            raise NotFound(f"image {index} of job {job_id} has no captured step {step}; it has {steps}")
        if kind not in CAPTURE_KINDS:
            raise NotFound(f"no capture kind {kind!r}: use one of {', '.join(CAPTURE_KINDS)}")
        return FileResponse(existing(folder / capture_frame_name(step, kind)), media_type="image/png")

    @app.post("/api/v1/xyz", status_code=202)
    def submit_xyz(body: XYZBody, idempotency_key: str | None = Header(default=None)) -> dict[str, Any]:
        payload = xyz_payload(body.request, body.x, body.y, body.z)
        # bad axes, too many images, bad fields: 422 before queueing
        check_xyz(state.engine, plan_xyz(payload, state.settings.limits))
        job = state.worker.submit(XYZ_KIND, payload, idempotency_key=body.idempotency_key or idempotency_key)
        return job_view(job, state)


def catalog_of(engine: Engine) -> dict[str, Any]:
    """Everything a UI's pickers offer, each name as the request fields take it."""
    refs, hashes = generation_models(engine), engine.models.hashes.known()
    return {
        "models": [model_entry(ref, hashes.get(str(ref.path.resolve()))) for ref in refs],
        "default_model": default_model(engine, refs),
        "vaes": [p.name for p in vae_files(engine.folders.vae)] + tiny_vae_names(engine, refs),
        "loras": [p.stem for p in network_files(engine, "lora").values()],
        "embeddings": [p.stem for p in network_files(engine, "embedding").values()],
        "networks": [network_entry(kind, path) for kind in NETWORK_KINDS
                     for path in network_files(engine, kind).values()],
        "controlnets": [p.stem if p.is_file() else p.name for p in controlnet.available(engine.folders.controlnet)],
        "ip_adapters": [p.stem for p in available_adapters(engine.folders.ip_adapter, engine.folders.controlnet)],
        "image_encoders": [p.stem if p.is_file() else p.name for p in available_encoders(engine.folders.clip_vision)],
        "preprocessors": list(ALL_PREPROCESSORS),
        "samplers": [spec.name for spec in SAMPLERS],
        "schedules": list(SCHEDULE_TYPES),
        "presets": preset_entries(engine, refs),
        "upscalers": [u.name for u in engine.upscalers.available()],
        "latent_upscale_modes": latent_upscale_modes(),
        "inpaint_methods": list(INPAINT_METHODS),
        "masked_content": list(MASKED_CONTENT),
        "xyz_axes": [{"name": kind.name, "help": kind.help} for kind in AXIS_KINDS.values()],
        "limits": dataclasses.asdict(engine.settings.limits),
        "defaults": encode_request(GenerationRequest()),
        "control_defaults": {k: v for k, v in ControlUnit(model="").to_dict().items() if k != "model"},
    }


def preset_entries(engine: Engine, refs: list[ModelRef]) -> dict[str, dict[str, Any]]:
    """Each few-step preset's fields, what it is made for, and the LoRA it adds per model (model name -> LoRA)."""
    loras = [p.stem for p in engine.addons.lora_files()]
    families = {ref.name: family_of(ref) for ref in refs}
    return {name: {"fields": p.fields(), "made_for": p.made_for,
                   "loras": {model: lora for model, family in families.items()
                             if (lora := companion_lora(name, model, family, loras))}}
            for name, p in PRESETS.items()}


def tiny_vae_names(engine: Engine, refs: list[ModelRef]) -> list[str]:
    """The tiny VAE names (taesd, taesdxl) some listed model can use: its own, or one in the VAE folders."""
    folders = engine.folders
    return [name for name in TINY_NAMES
            if any(find_tiny_vae(name, ref.path, folders.vae, folders.vae_approx) for ref in refs)]


NETWORK_KINDS = ("lora", "embedding")


def network_files(engine: Engine, kind: str) -> dict[str, Path]:
    """Lowercased name -> file of the LoRAs or embeddings a prompt can name (the first of a name wins, as the
    engine resolves it); empty for another kind."""
    if kind == "embedding":
        return engine.addons.embedding_files()
    found: dict[str, Path] = {}
    for path in engine.addons.lora_files() if kind == "lora" else []:
        found.setdefault(path.stem.lower(), path)
    return found


def network_entry(kind: str, path: Path) -> dict[str, Any]:
    """A card of the web UI: kind, name as the prompt takes it, and the URL of its preview picture (or null)."""
    has_preview = preview_of(path) is not None
    return {"kind": kind, "name": path.stem,
            "preview": f"/api/v1/previews/{kind}/{quote(path.stem, safe='')}" if has_preview else None}


def generation_models(engine: Engine) -> list[ModelRef]:
    """The catalog's models a request can name (x4 upscalers are listed as upscalers), first of a name only:
    that is the one the name resolves to."""
    found: dict[str, ModelRef] = {}
    for ref in catalog.scan(engine.folders):
        if not (ref.path.is_dir() and is_x4_folder(ref.path)):
            found.setdefault(ref.name.lower(), ref)
    return list(found.values())


def model_entry(ref: ModelRef, sha256: str | None = None) -> dict[str, Any]:
    """name (what `model` takes), A1111 title (with the short hash once it is known), family and whether it
    is an inpainting model; family and inpainting null when the configs or header cannot say. SD3 and Flux
    models add `flow`: the samplers and schedules they run, and whether they take a distilled guidance value."""
    family = family_of(ref)
    info = FAMILY_INFO.get(family)
    entry = {"name": ref.name, "title": model_title(ref, sha256[:MODEL_HASH_DIGITS] if sha256 else None),
             "family": family if info else None, "inpainting": info.inpaint if info else None}
    if family in FLOW_FAMILIES:  # SD3/Flux: what their pickers offer (engine/flow/runner.py)
        entry.update(family=family, inpainting=False, flow={
            "samplers": [FLOW_SAMPLER], "schedules": list(FLOW_SCHEDULES),
            "distilled_cfg": family == "flux-dev"})
    return entry


def default_model(engine: Engine, refs: list[ModelRef]) -> str | None:
    """The catalog name of the model requests without one get; None when there is no default or it is not
    in the catalog (a request naming no model still gets it)."""
    if not engine.settings.default_model:
        return None
    try:
        wanted = engine.model_ref().path.resolve()
    except SdStudioError as e:
        log.warning("the default model cannot be found: %s", e)
        return None
    return next((ref.name for ref in refs if ref.path.resolve() == wanted), None)


def check_preprocess(body: PreprocessBody, image: Image.Image, max_pixels: int) -> None:
    """A preprocessor that can run on a picture alone, a picture within the size limit, canny thresholds as a
    ControlNet unit takes them."""
    if body.preprocessor == "inpaint":
        raise RequestError("the inpaint preprocessor is made from the init image and mask while generating; it "
                           "has no preview", "preprocessor")
    if body.preprocessor not in ALL_PREPROCESSORS:
        raise RequestError(f"unknown preprocessor {body.preprocessor!r}; choose one of "
                           f"{', '.join(ALL_PREPROCESSORS)}", "preprocessor")
    if image.width * image.height > max_pixels:
        raise RequestError(f"the image is {image.width}x{image.height}; the limit is {max_pixels} pixels", "image")
    check_int(body.low_threshold, "low_threshold", 1, 255)
    check_int(body.high_threshold, "high_threshold", body.low_threshold, 255)


def capture_of(result: dict[str, Any] | None, job_id: str, index: int, images_dir: Path) -> tuple[Path, list[int]]:
    """The capture folder of image `index` (from the job's record) and its captured steps; NotFound if none."""
    result = result or {}
    if not 0 <= index < len(result.get("images", [])):
        raise NotFound(f"job {job_id} has no image {index}")
    folders, steps = result.get("captures") or [], result.get("capture_steps") or []
    if index >= len(folders) or not folders[index]:
        raise NotFound(f"image {index} of job {job_id} has no denoising capture (submit it with capture_every > 0)")
    folder = (images_dir / folders[index]).resolve()
    if not folder.is_relative_to(images_dir.resolve()):
        raise NotFound(f"image {index} of job {job_id} has no denoising capture")
    return folder, [int(s) for s in steps[index]] if index < len(steps) else []


def existing(path: Path) -> Path:
    if not path.is_file():
        raise NotFound(f"{path.name} is no longer on disk")
    return path
