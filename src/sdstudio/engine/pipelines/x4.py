"""The upscale job: resamplers directly, the SD x4 upscaler model through diffusers' pipeline.

The x4 upscaler (Stable Diffusion 2's latent upscaler) does not fit the one loop: its UNet takes
cat(latents, noised low-resolution image) (4 + 3 = 7 channels) with the noise level as a class label, and
its VAE has a factor of 4, so the latents live on the input's pixel grid. It runs as diffusers'
StableDiffusionUpscalePipeline (DESIGN: "Families that do not fit the loop"), loaded offline, with our
progress events and cancel token wired through the pipeline's step callback.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdstudio import __version__
from sdstudio.a1111.extras import upscale_params
from sdstudio.a1111.infotext import format_infotext
from sdstudio.engine.hooks import CancelToken, ProgressCallback, ProgressEvent
from sdstudio.engine.pipelines.upscale import (
    MAX_SCALE,
    POSTPROCESS_CHUNK,
    RESAMPLERS,
    X4_SCALE,
    UpscaleRequest,
    UpscaleResult,
    UpscalerInfo,
    find_x4_models,
    list_upscalers,
    resolve_upscaler,
    target_size,
    upscale_image,
)
from sdstudio.engine.record import environment, library_versions
from sdstudio.engine.sd.preview import LatentRGB, fit_latent_rgb
from sdstudio.engine.sd.stages import set_vae_tiling
from sdstudio.engine.validate import MAX_SEED, check_int
from sdstudio.errors import ModelError, RequestError
from sdstudio.models.find.catalog import ModelFolders, ModelRef
from sdstudio.models.find.hashing import HashCache, short_hash
from sdstudio.models.load.configs import load_tokenizer
from sdstudio.models.load.loader import vae_dtype
from sdstudio.models.load.memory import place
from sdstudio.settings import Limits, Settings

if TYPE_CHECKING:
    from diffusers import StableDiffusionUpscalePipeline

log = logging.getLogger(__name__)

RECORD_FORMAT = "sdstudio-upscale/1"
MIN_MODEL_SIDE = 8  # pixels: the x4 UNet downsamples the low-resolution grid three times
X4_TILE = 512       # output pixels: the x4 model's training crops


@dataclass(eq=False)
class X4Model:
    ref: ModelRef
    sha256: str
    pipe: StableDiffusionUpscalePipeline
    offload: str = "none"
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def factor(self) -> int:
        """Pixels per latent cell of its VAE: 4 (three resolution levels)."""
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def preview(self, latents: Tensor) -> Image.Image:
        """One latent (4, h, w) as an (h, w) RGB picture, by a linear map fitted to the model's VAE."""
        if "latent_rgb" not in self.memo:
            self.memo["latent_rgb"] = fit_latent_rgb(self.pipe.vae, self.factor)
        rgb: LatentRGB = self.memo["latent_rgb"]
        return rgb(latents)


def load_x4(ref: ModelRef, settings: Settings, hashes: HashCache) -> X4Model:
    """Load an x4 upscaler diffusers folder offline, on the settings' device and dtype (the VAE in float32
    where its config says force_upcast, as the pipeline itself would)."""
    from diffusers import StableDiffusionUpscalePipeline  # deferred: importing pipelines pulls in image processors

    folder = ref.path
    try:
        pipe = StableDiffusionUpscalePipeline.from_pretrained(
            folder, local_files_only=True, dtype=settings.dtype, tokenizer=load_tokenizer(folder / "tokenizer"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load the x4 upscaler {folder}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    modules = (pipe.text_encoder, pipe.unet, pipe.vae)
    for module in modules:
        module.eval().requires_grad_(False)
    if vae_dtype(pipe.vae, settings.dtype) != settings.dtype:
        pipe.vae.to(dtype=torch.float32)
    # tiled decoding (settings.vae_tiling) in 512-pixel tiles, the size the model was trained on, whatever
    # sample_size its VAE config states
    pipe.vae.tile_sample_min_size = X4_TILE
    pipe.vae.tile_latent_min_size = X4_TILE // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    offload = place(modules, settings.device, settings.offload)
    log.info("loaded the x4 upscaler %s", ref.name)
    return X4Model(ref, hashes.model_sha256(folder), pipe, offload)


def pad_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """Extend the right and bottom edges (repeating the last row/column) to a multiple of `multiple`."""
    w, h = image.size
    pad_w, pad_h = -w % multiple, -h % multiple
    if not pad_w and not pad_h:
        return image
    pixels = np.pad(np.asarray(image), ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # (H', W', 3)
    return Image.fromarray(pixels, "RGB")


def run_x4(model: X4Model, req: UpscaleRequest, progress: ProgressCallback | None = None,
           cancel: CancelToken | None = None) -> Image.Image:
    """`req.image` at 4x its size by the model, seeded by `req.seed` (a CPU generator, as everywhere).

    The pipeline draws the low-resolution noise (1, 3, h, w), then the initial latents (1, 4, h, w), from that
    generator; an image whose sides are not multiples of the VAE factor is edge-padded first and the output
    cropped back to exactly 4w x 4h."""
    w, h = req.image.size
    low = pad_to_multiple(req.image.convert("RGB"), model.factor)

    def on_step(step: int, timestep: Tensor, latents: Tensor) -> None:  # latents (1, 4, h', w')
        if cancel is not None:
            cancel.raise_if_cancelled()
        if progress is not None:
            first = latents[0]
            progress(ProgressEvent(0, 1, step + 1, req.steps, lambda: model.preview(first)))

    out = model.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, image=low,
                     num_inference_steps=req.steps, guidance_scale=float(req.cfg_scale),
                     noise_level=req.noise_level, generator=torch.Generator("cpu").manual_seed(req.seed),
                     callback=on_step, callback_steps=1, output_type="pil")
    return out.images[0].crop((0, 0, X4_SCALE * w, X4_SCALE * h))


def check_request(req: UpscaleRequest, limits: Limits) -> None:
    """Checks that need no model; each message says what to fix."""
    if not isinstance(req.image, Image.Image):
        raise RequestError(f"image must be a picture (PIL image), got {type(req.image).__name__}", "image")
    if isinstance(req.scale, bool) or not isinstance(req.scale, int | float) or not 1 <= req.scale <= MAX_SCALE:
        raise RequestError(f"scale must be a number from 1 to {MAX_SCALE:g}, got {req.scale!r}", "scale")
    width, height = target_size(req.image.size, req.scale)
    if max(width, height) > limits.max_side:
        raise RequestError(f"the upscaled image would be {width}x{height} pixels, over the limit of {limits.max_side} "
                           f"per side: use a smaller scale or crop the image", "scale")
    if not isinstance(req.prompt, str) or not isinstance(req.negative_prompt, str):
        raise RequestError("prompt and negative_prompt must be text", "prompt")
    check_int(req.steps, "steps", 1, limits.max_steps)
    check_int(req.seed, "seed", -1, MAX_SEED)
    check_int(req.noise_level, "noise_level", 0, 1000)
    if isinstance(req.cfg_scale, bool) or not isinstance(req.cfg_scale, int | float) or not req.cfg_scale >= 0:
        raise RequestError(f"cfg_scale must be a number >= 0, got {req.cfg_scale!r}", "cfg_scale")


class Upscalers:
    """The engine's upscaling: resolves the upscaler by name, runs it, describes the result. Keeps the last
    x4 upscaler model loaded (one at a time; it is reloaded when its folder changes on disk)."""

    def __init__(self, settings: Settings, folders: ModelFolders, hashes: HashCache):
        self.settings, self.folders, self.hashes = settings, folders, hashes
        self._loaded: dict[tuple[str, int], X4Model] = {}

    def available(self) -> list[UpscalerInfo]:
        """A1111's /sdapi/v1/upscalers list: the resamplers and the x4 models found in the model folders."""
        return list_upscalers(find_x4_models(self.folders))

    def load(self, ref: ModelRef) -> X4Model:
        key = (str(ref.path.resolve()), (ref.path / "model_index.json").stat().st_mtime_ns)
        if key not in self._loaded:
            self._loaded.clear()  # free the previous model before loading the next
            self._loaded[key] = load_x4(ref, self.settings, self.hashes)
        return self._loaded[key]

    def run(self, req: UpscaleRequest, progress: ProgressCallback | None = None,
            cancel: CancelToken | None = None) -> UpscaleResult:
        """Upscale `req.image`; raises RequestError/ModelError for bad input, Cancelled."""
        start = time.perf_counter()
        check_request(req, self.settings.limits)
        choice = resolve_upscaler(req.upscaler, self.folders, self.settings.names_only)
        if cancel is not None:
            cancel.raise_if_cancelled()
        if isinstance(choice, str):
            return self._resample(req.replace(upscaler=choice), progress, start)
        return self._x4(req, choice, progress, cancel, start)

    def _resample(self, req: UpscaleRequest, progress: ProgressCallback | None, start: float) -> UpscaleResult:
        if req.prompt or req.negative_prompt:
            raise RequestError(f"a prompt needs an x4 upscaler model; {req.upscaler} is a plain resampler "
                               f"(one of {', '.join(RESAMPLERS)})", "prompt")
        picture = upscale_image(req.image.convert("RGB"), req.scale, req.upscaler)
        if progress is not None:
            progress(ProgressEvent(0, 1, 1, 1, lambda: picture))
        record = {"format": RECORD_FORMAT, "request": req.to_dict(), "output": {"size": list(picture.size)},
                  "upscaler": {"name": req.upscaler, "kind": "resampler"}, "environment": library_versions()}
        return finish(req, picture, None, None, record, start)

    def _x4(self, req: UpscaleRequest, ref: ModelRef, progress: ProgressCallback | None,
            cancel: CancelToken | None, start: float) -> UpscaleResult:
        check_x4_request(req, self.settings.limits)
        w, h = req.image.size
        model = self.load(ref)
        max_noise = int(model.pipe.config.get("max_noise_level", 350))
        if req.noise_level > max_noise:
            raise RequestError(f"noise_level must be between 0 and {max_noise} for this model, got "
                               f"{req.noise_level}", "noise_level")
        seed = req.seed if req.seed != -1 else random.randrange(2**32)
        req = req.replace(upscaler=model.ref.name, seed=seed)
        set_vae_tiling(model.pipe.vae, self.settings.vae_tiling, 16 * w * h, X4_TILE, model.offload != "none")
        log.info("x4 upscale %dx%d, %d steps, cfg %s, noise level %d, seed %d", w, h, req.steps, req.cfg_scale,
                 req.noise_level, seed)
        picture = run_x4(model, req, progress, cancel)
        size = target_size(req.image.size, req.scale)
        if picture.size != size:  # scale below 4: down from the model's 4x, as A1111 does
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        params = {"steps": req.steps, "cfg_scale": req.cfg_scale, "seed": seed, "noise_level": req.noise_level,
                  "size": size, "model_hash": short_hash(model.sha256), "version": __version__}
        return finish(req, picture, seed, params, x4_record(req, model, size, self.settings), start)


def check_x4_request(req: UpscaleRequest, limits: Limits) -> None:
    """What the x4 model cannot do: more than 4x, tiny images, outputs over the size limit."""
    if req.scale > X4_SCALE:
        raise RequestError(f"the x4 upscaler model scales by at most {X4_SCALE}, got scale {req.scale:g}: use "
                           f"scale 1-4, or a resampler ({', '.join(RESAMPLERS)}) for more", "scale")
    w, h = req.image.size
    if min(w, h) < MIN_MODEL_SIDE:
        raise RequestError(f"the x4 upscaler needs an image of at least {MIN_MODEL_SIDE}x{MIN_MODEL_SIDE} "
                           f"pixels, got {w}x{h}", "image")
    if max(w, h) * X4_SCALE > limits.max_side:
        raise RequestError(f"the x4 upscaler would make {4 * w}x{4 * h} pixels, over the limit of "
                           f"{limits.max_side} per side: crop or shrink the image first", "image")


def x4_record(req: UpscaleRequest, model: X4Model, size: tuple[int, int], settings: Settings) -> dict[str, Any]:
    pipe = model.pipe
    return {"format": RECORD_FORMAT, "request": req.to_dict(), "output": {"size": list(size), "seed": req.seed},
            "upscaler": {"name": model.ref.name, "kind": "x4", "path": str(model.ref.path),
                         "sha256": model.sha256, "hash": short_hash(model.sha256)},
            "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config),
                          "low_res": dict(pipe.low_res_scheduler.config)},
            "environment": environment(settings.device, settings.dtype)}


def finish(req: UpscaleRequest, picture: Image.Image, seed: int | None, model: dict[str, Any] | None,
           record: dict[str, Any], start: float) -> UpscaleResult:
    """A1111 extras' text first ("Postprocess upscale by", "Postprocess upscaler"), then the model's own keys.

    The picture keeps the source's text chunks (its generation parameters, as A1111's extras do) and gets
    the upscale's text in `postprocessing`."""
    text = format_infotext(req.prompt, req.negative_prompt, upscale_params(req.scale, req.upscaler, model))
    picture.info = {k: v for k, v in req.image.info.items() if isinstance(v, str)}
    picture.info[POSTPROCESS_CHUNK] = text
    record = _json_ready(record)
    return UpscaleResult(req, picture, seed, text, record, time.perf_counter() - start)


def _json_ready(value: Any) -> Any:
    """Scheduler configs hold tuples and numpy scalars; the record is JSON."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
