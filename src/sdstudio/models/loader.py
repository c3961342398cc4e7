"""Loading a Stable Diffusion model (diffusers folder layout) into its components."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdstudio.errors import ModelError
from sdstudio.models.catalog import ModelRef
from sdstudio.models.hashing import HashCache, short_hash

log = logging.getLogger(__name__)

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
LATER_PIPELINES = {
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner",
    "StableDiffusionInpaintPipeline": "inpainting checkpoints",
    "StableDiffusionXLInpaintPipeline": "SDXL inpainting",
    "StableDiffusionUpscalePipeline": "the x4 upscaler",
}


@dataclass(eq=False)
class LoadedModel:
    """The five parts of a Stable Diffusion model, on one device in one dtype."""

    ref: ModelRef
    sha256: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    memo: dict[str, Any] = field(default_factory=dict)  # derived data computed once per model

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def short_hash(self) -> str:
        return short_hash(self.sha256)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2^(number of VAE downsamplings), 8 for SD."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        """z = scaling_factor * VAE latent, giving z roughly unit variance (0.18215 for SD1.x)."""
        return float(self.vae.config.scaling_factor)

    @property
    def native_size(self) -> int:
        """The training resolution in pixels (UNet sample_size x VAE factor; 512 for SD1.5)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))


def read_model_index(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "model_index.json").read_text())


def check_supported(ref: ModelRef, index: dict[str, Any]) -> None:
    cls = index.get("_class_name", "?")
    if cls in LATER_PIPELINES:
        raise ModelError(
            f"{ref.name} is a {cls} model; {LATER_PIPELINES[cls]} is not supported by this version yet"
        )
    if cls not in SD_PIPELINES:
        raise ModelError(f"{ref.name}: unsupported pipeline {cls!r}; expected one of {', '.join(SD_PIPELINES)}")
    missing = [c for c in ("tokenizer", "text_encoder", "unet", "vae", "scheduler") if not (ref.path / c).is_dir()]
    if missing:
        raise ModelError(f"{ref.name} is incomplete: missing component folder(s) {', '.join(missing)}")


def load_model(ref: ModelRef, device: torch.device, dtype: torch.dtype, hashes: HashCache) -> LoadedModel:
    """Load a diffusers-layout SD model from disk, offline."""
    check_supported(ref, read_model_index(ref.path))
    log.info("loading %s from %s", ref.name, ref.path)
    kw = {"local_files_only": True}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(ref.path / "tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(ref.path / "text_encoder", dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(ref.path, subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(ref.path, subfolder="vae", torch_dtype=dtype, **kw)
        scheduler_config = json.loads((ref.path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {ref.name} from {ref.path}: {e}") from e
    for module in (text_encoder, unet, vae):
        module.to(device).eval().requires_grad_(False)
    return LoadedModel(ref, hashes.model_sha256(ref.path), tokenizer, text_encoder, unet, vae,
                       scheduler_config, device, dtype)


class ModelManager:
    """Loaded models, most recently used last; at most `capacity` stay in memory."""

    def __init__(self, device: torch.device, dtype: torch.dtype, hashes: HashCache, capacity: int = 1):
        self.device, self.dtype, self.hashes, self.capacity = device, dtype, hashes, capacity
        self._loaded: OrderedDict[Path, LoadedModel] = OrderedDict()

    def get(self, ref: ModelRef) -> LoadedModel:
        key = ref.path.resolve()
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        while len(self._loaded) >= self.capacity:
            _, old = self._loaded.popitem(last=False)
            log.info("unloading %s", old.name)
        model = load_model(ref, self.device, self.dtype, self.hashes)
        self._loaded[key] = model
        return model
