"""Loading a Stable Diffusion model (a diffusers folder or a single LDM-layout file) into components."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.hashing import HashCache, short_hash
from sdstudio.models.load.memory import module_bytes, place, realign
from sdstudio.models.load.parts import LoadOptions, load_folder
from sdstudio.models.load.single_file import load_single_file
from sdstudio.models.load.speed import apply_speed
from sdstudio.models.load.text_encoders import TextEncoders

log = logging.getLogger(__name__)



@dataclass(eq=False)
class LoadedModel:
    """The parts of a Stable Diffusion model, on one device in one dtype."""

    ref: ModelRef
    sha256: str
    family: str
    text: TextEncoders
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    options: dict[str, Any] = field(default_factory=dict)  # model_index flags (force_zeros_for_empty_prompt...)
    offload: str = "none"  # the offload mode in effect (models/load/memory.py)
    per_image: bool = False  # the loop calls the UNet image by image: batch-invariant (engine/sd/rows.py)
    memo: dict[str, Any] = field(default_factory=dict)  # derived data computed once per model

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def short_hash(self) -> str:
        return short_hash(self.sha256)

    @property
    def is_xl(self) -> bool:
        return self.text.style == "sdxl"

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.text.tokenizers[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text.encoders[0]

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






def load_model(ref: ModelRef, options: LoadOptions, hashes: HashCache,
               models_dirs: Sequence[Path] = ()) -> LoadedModel:
    """Load a diffusers folder, a single checkpoint file or a merge recipe, offline."""
    parts = load_single_file(ref, options, models_dirs) if ref.path.is_file() else load_folder(ref.path, options)
    log.info("loaded %s (%s)", ref.name, parts.family)
    modules = (*parts.text.encoders, parts.unet, parts.vae)
    for module in modules:
        dtype = vae_dtype(parts.vae, options.dtype) if module is parts.vae else options.dtype
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)
        realign(module.eval().requires_grad_(False))
    apply_speed(parts.unet, parts.vae, options.speed)
    offload = place(modules, options.device, options.offload)
    invariant = options.speed.batch_invariant
    per_image = invariant == "on" or (invariant == "auto" and options.device.type == "cpu")
    return LoadedModel(ref, hashes.model_sha256(ref.path), parts.family, parts.text, parts.unet, parts.vae,
                       parts.scheduler_config, options.device, options.dtype, parts.options, offload,
                       per_image=per_image)


def vae_dtype(vae: AutoencoderKL, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in float16 (its config says force_upcast): it then runs in float32, as in diffusers."""
    return torch.float32 if dtype == torch.float16 and vae.config.get("force_upcast", False) else dtype










class ModelManager:
    """Loaded models, least recently used first: at most `capacity` of them, and, with a budget, no more
    than `budget_bytes` of weights (the model just loaded always stays)."""

    def __init__(self, options: LoadOptions, hashes: HashCache, capacity: int = 1, models_dirs: Sequence[Path] = (),
                 budget_bytes: int | None = None):
        self.options, self.hashes, self.capacity, self.models_dirs = options, hashes, capacity, tuple(models_dirs)
        self.budget_bytes = budget_bytes
        self._loaded: dict[tuple[Path, int, int], LoadedModel] = {}

    @property
    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def bytes_used(self) -> int:
        return sum(module_bytes((*m.text.encoders, m.unet, m.vae)) for m in self._loaded.values())

    def get(self, ref: ModelRef) -> LoadedModel:
        stat = ref.path.stat()  # a file replaced on disk (or an edited recipe) is loaded again
        key = (ref.path.resolve(), stat.st_mtime_ns, stat.st_size)
        if key in self._loaded:
            self._loaded[key] = self._loaded.pop(key)  # most recent last
            return self._loaded[key]
        while len(self._loaded) >= self.capacity:
            old = self._loaded.pop(next(iter(self._loaded)))
            log.info("unloading %s", old.name)
        model = load_model(ref, self.options, self.hashes, self.models_dirs)
        self._loaded[key] = model
        while self.budget_bytes is not None and len(self._loaded) > 1 and self.bytes_used() > self.budget_bytes:
            old = self._loaded.pop(next(iter(self._loaded)))
            log.info("unloading %s to stay within the memory budget", old.name)
        return model
