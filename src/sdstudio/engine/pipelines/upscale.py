"""Upscalers: plain resamplers and latent upscale modes by the names AUTOMATIC1111 shows, and the request and
result types of the upscale job (the SD x4 upscaler model runs in engine/pipelines/x4.py).

    upscale_image(image, 2, "Lanczos")                     # PIL resampling, (w, h) -> (2w, 2h)
    upscale_latents(latents, (h2, w2), "Latent (bicubic)")  # (B, C, h, w) -> (B, C, h2, w2)

Hires fix picks one of each kind by name: `latent_mode(name)` says whether a name is a latent mode
(upscale the latents) or not (decode, `upscale_image`, encode again).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdstudio.engine.requests import image_sha256
from sdstudio.errors import RequestError
from sdstudio.models.find.catalog import ModelFolders, ModelRef, scan
from sdstudio.models.find.names import leaf
from sdstudio.storage.images import dated_folder, png_info, write_unique
from sdstudio.storage.results import to_json

X4_PIPELINE = "StableDiffusionUpscalePipeline"  # model_index.json `_class_name` of an x4 upscaler folder
X4_SCALE = 4
MAX_SCALE = 8.0
POSTPROCESS_CHUNK = "postprocessing"      # A1111 extras' PNG text chunk for what the upscale did
UPSCALE_RECORD_CHUNK = "sdstudio-upscale"  # our machine-readable record of an upscale

# A1111's resamplers. "None" (A1111's default) means no upscaler model: its final resize is Lanczos.
RESAMPLERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
    "Bilinear": Image.Resampling.BILINEAR,
    "Bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class LatentMode:
    """One of A1111's latent upscale modes: F.interpolate's mode and antialias flag."""

    name: str
    mode: str
    antialias: bool = False


LATENT_UPSCALE_MODES: tuple[LatentMode, ...] = (
    LatentMode("Latent", "bilinear"),
    LatentMode("Latent (antialiased)", "bilinear", antialias=True),
    LatentMode("Latent (bicubic)", "bicubic"),
    LatentMode("Latent (bicubic antialiased)", "bicubic", antialias=True),
    LatentMode("Latent (nearest)", "nearest"),
    LatentMode("Latent (nearest-exact)", "nearest-exact"),
)


def resampler(name: str) -> str | None:
    """The canonical resampler name for `name` (any case), or None."""
    wanted = name.strip().lower() if isinstance(name, str) else ""
    return next((known for known in RESAMPLERS if known.lower() == wanted), None)


def latent_mode(name: str) -> LatentMode | None:
    """The latent upscale mode called `name` (any case), or None: then it names an image upscaler."""
    wanted = name.strip().lower() if isinstance(name, str) else ""
    return next((m for m in LATENT_UPSCALE_MODES if m.name.lower() == wanted), None)


def target_size(size: tuple[int, int], scale: float | tuple[int, int]) -> tuple[int, int]:
    """(width, height) scaled by `scale` (rounded half up, at least 1), or `scale` itself when it is a size."""
    if isinstance(scale, tuple):
        return scale
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


def upscale_image(image: Image.Image, scale: float | tuple[int, int], upscaler: str = "Lanczos") -> Image.Image:
    """Resize `image` by `scale` or to `(width, height)` with a resampler named as in A1111 (any case).

    The x4 upscaler model needs loaded weights: run it through `Engine.upscale`."""
    found = resampler(upscaler)
    if found is None:
        raise RequestError(unknown_message(upscaler, ()), "upscaler")
    size = target_size(image.size, scale)
    if size[0] < 1 or size[1] < 1:
        raise RequestError(f"the target size must be at least 1x1, got {size[0]}x{size[1]}", "scale")
    return image.copy() if size == image.size else image.resize(size, RESAMPLERS[found])


def upscale_latents(latents: Tensor, size: tuple[int, int], mode: str = "Latent") -> Tensor:
    """Resize latents (B, C, h, w) -> (B, C, H, W) with `size` = (H, W) in latent cells (pixels / VAE factor),
    as A1111's hires fix does: F.interpolate with the mode's interpolation and antialias flag.

    Computed in float32 (half-precision bicubic is missing on some devices), returned in the input dtype."""
    found = latent_mode(mode)
    if found is None:
        names = ", ".join(m.name for m in LATENT_UPSCALE_MODES)
        raise RequestError(f"unknown latent upscale mode {mode!r}: use one of {names}", "upscaler")
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}")
    x = latents.float()                                                        # (B, C, h, w)
    out = F.interpolate(x, size=tuple(size), mode=found.mode, antialias=found.antialias)  # (B, C, H, W)
    return out.to(latents.dtype)


@dataclass(frozen=True)
class UpscalerInfo:
    """One entry of A1111's /sdapi/v1/upscalers list."""

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float = float(X4_SCALE)  # A1111 reports 4 for its resamplers too

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def list_upscalers(models: Iterable[ModelRef] = ()) -> list[UpscalerInfo]:
    """The resamplers, then the x4 upscaler models given (see `find_x4_models`)."""
    found = [UpscalerInfo(name) for name in RESAMPLERS]
    found += [UpscalerInfo(ref.name, ref.name, str(ref.path), None, float(X4_SCALE)) for ref in models]
    return found


def latent_upscale_modes() -> list[str]:
    """A1111's /sdapi/v1/latent-upscale-modes names, in its order."""
    return [m.name for m in LATENT_UPSCALE_MODES]


def is_x4_folder(path: Path) -> bool:
    """A diffusers folder whose model_index.json names StableDiffusionUpscalePipeline."""
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name") == X4_PIPELINE
    except (OSError, ValueError, AttributeError):
        return False


def find_x4_models(folders: ModelFolders) -> list[ModelRef]:
    """x4 upscaler folders among the catalog's models (our folders, A1111/ComfyUI installs, the HF cache)."""
    return [ref for ref in scan(folders) if ref.path.is_dir() and is_x4_folder(ref.path)]


def resolve_upscaler(name: str, folders: ModelFolders, names_only: bool = False) -> str | ModelRef:
    """A resampler's canonical name, or the x4 upscaler model `name` is a path to or the catalog name of.
    names_only: never a path (models/find/names.py)."""
    if not isinstance(name, str) or not name.strip():
        raise RequestError(unknown_message(name, find_x4_models(folders)), "upscaler")
    if found := resampler(name):
        return found
    if latent_mode(name):
        raise RequestError(f"{name!r} is a latent upscale mode (hires fix only); an image takes a resampler "
                           f"({', '.join(RESAMPLERS)}) or an x4 upscaler model", "upscaler")
    path = Path(name).expanduser()
    if not names_only and path.exists():
        if not is_x4_folder(path):
            raise RequestError(f"{path} is not an x4 upscaler model: expected a diffusers folder whose "
                               f"model_index.json names {X4_PIPELINE}", "upscaler")
        return ModelRef(path.name, path)
    models = find_x4_models(folders)
    wanted = leaf(name).lower() if names_only else name.strip().lower()
    for ref in models:
        if wanted in (ref.name.lower(), ref.path.name.lower()):
            return ref
    raise RequestError(unknown_message(name, models), "upscaler")


def unknown_message(name: object, models: Iterable[ModelRef]) -> str:
    listing = ", ".join([*RESAMPLERS, *(ref.name for ref in models)])
    return (f"unknown upscaler {name!r}: use one of {listing}, or the folder of an x4 upscaler model "
            f"({X4_PIPELINE})")


@dataclass(frozen=True)
class UpscaleRequest:
    """Upscale one image by `scale` with a resampler or the SD x4 upscaler model.

    upscaler: a resampler ("Lanczos", "Nearest", "Bilinear", "Bicubic", "None" = Lanczos), or an x4 upscaler
    model by catalog name or folder. The model always works at 4x; another scale (1-4) is then reached by a
    Lanczos resize of its output, as A1111 does for its fixed-scale upscalers. prompt, negative_prompt,
    steps, cfg_scale, noise_level (0 to the model's max_noise_level, 350) and seed (-1: random) are the
    model's; resamplers take no prompt.
    """

    image: Image.Image = field(compare=False, repr=False)
    scale: float = 4.0
    upscaler: str = "Lanczos"
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 9.0   # StableDiffusionUpscalePipeline's default guidance
    noise_level: int = 20    # noise added to the low-resolution image (a DDPM timestep)
    seed: int = -1

    def replace(self, **changes: Any) -> UpscaleRequest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; the image is recorded by size and pixel hash."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "image"}
        out["image"] = {"size": list(self.image.size), "sha256": image_sha256(self.image)}
        return out


@dataclass(frozen=True)
class UpscaleResult:
    request: UpscaleRequest   # as run: the upscaler's canonical name, the seed used
    image: Image.Image        # RGB; image.info keeps the source's text chunks, plus "postprocessing"
    seed: int | None          # None for resamplers (no randomness)
    infotext: str             # A1111 extras text: "Postprocess upscale by: 4, Postprocess upscaler: ..."
    record: dict[str, Any]    # machine-readable record (the "sdstudio-upscale" PNG chunk)
    seconds: float

    @property
    def images(self) -> list[Image.Image]:
        return [self.image]


def save_upscale(result: UpscaleResult, root: Path) -> Path:
    """Save as <root>/extras-images/<date>/NNNNN-<resampler>.png or NNNNN-<seed>.png (the x4 model), written
    atomically. Text chunks: the source's own (its generation parameters, kept as A1111's extras keep them),
    "postprocessing" (the upscale's infotext) and "sdstudio-upscale" (the record, JSON)."""
    text = {k: v for k, v in result.image.info.items() if isinstance(v, str)}
    text[POSTPROCESS_CHUNK] = result.infotext
    text[UPSCALE_RECORD_CHUNK] = to_json(result.record)
    suffix = f"-{result.request.upscaler.lower()}.png" if result.seed is None else f"-{result.seed}.png"
    return write_unique(dated_folder(root, "extras"), suffix,
                        lambda path: result.image.save(path, format="PNG", pnginfo=png_info(text)))
