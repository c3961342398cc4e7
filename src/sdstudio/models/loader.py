"""Loading a Stable Diffusion model (a diffusers folder or a single LDM-layout file) into components."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdstudio.errors import ModelError
from sdstudio.models.catalog import ModelRef
from sdstudio.models.configs import config_dir, load_tokenizer
from sdstudio.models.families import FAMILY_INFO
from sdstudio.models.hashing import HashCache, short_hash
from sdstudio.models.ldm_layout import pipeline_options, read_family_from_folder
from sdstudio.models.memory import module_bytes, place
from sdstudio.models.speed import SpeedOptions, apply_speed
from sdstudio.models.text_encoders import TextEncoders

log = logging.getLogger(__name__)

TEXT_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
TEXT_PARTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


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
    offload: str = "none"  # the offload mode in effect (models/memory.py)
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


@dataclass(frozen=True)
class LoadOptions:
    """How to load: placement, plus overrides for what a single file cannot say about itself."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    prediction: str | None = None   # "epsilon" | "v_prediction": overrides the config's
    family: str | None = None       # skip detection
    config: Path | None = None      # a diffusers folder to take configs/tokenizers from
    offload: str = "none"           # none | model | sequential (see models/memory.py)
    speed: SpeedOptions = field(default_factory=SpeedOptions)  # channels_last, torch.compile (models/speed.py)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None


def load_model(ref: ModelRef, options: LoadOptions, hashes: HashCache,
               models_dirs: Sequence[Path] = ()) -> LoadedModel:
    """Load a diffusers folder, a single checkpoint file or a merge recipe, offline."""
    if ref.path.is_file():
        from sdstudio.models.single_file import load_single_file

        parts = load_single_file(ref, options, models_dirs)
    else:
        parts = load_folder(ref.path, options)
    log.info("loaded %s (%s)", ref.name, parts.family)
    modules = (*parts.text.encoders, parts.unet, parts.vae)
    for module in modules:
        dtype = vae_dtype(parts.vae, options.dtype) if module is parts.vae else options.dtype
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)
        module.eval().requires_grad_(False)
    apply_speed(parts.unet, parts.vae, options.speed)
    offload = place(modules, options.device, options.offload)
    return LoadedModel(ref, hashes.model_sha256(ref.path), parts.family, parts.text, parts.unet, parts.vae,
                       parts.scheduler_config, options.device, options.dtype, parts.options, offload)


def vae_dtype(vae: AutoencoderKL, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in float16 (its config says force_upcast): it then runs in float32, as in diffusers."""
    return torch.float32 if dtype == torch.float16 and vae.config.get("force_upcast", False) else dtype


@dataclass(frozen=True)
class Parts:
    family: str
    text: TextEncoders
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    options: dict[str, Any]


def load_folder(folder: Path, options: LoadOptions) -> Parts:
    index = read_json(folder / "model_index.json")
    family = options.family or read_family_from_folder(folder)
    kw = {"local_files_only": True, "torch_dtype": options.dtype}
    try:
        tokenizers, encoders = [], []
        for tok_name, enc_name in TEXT_PARTS:
            if (index.get(enc_name) or [None, None])[1] is None:
                continue
            cls = TEXT_CLASSES[index[enc_name][1]]
            tokenizers.append(CLIPTokenizer.from_pretrained(folder / tok_name, local_files_only=True))
            encoders.append(cls.from_pretrained(folder / enc_name, dtype=options.dtype, local_files_only=True))
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {folder}: {e}") from e
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")  # a folder's own config is authoritative
    return Parts(family, TextEncoders(tuple(tokenizers), tuple(encoders), FAMILY_INFO[family].style),
                 unet, vae, scheduler, pipeline_options(index))


def build_text_encoders(family: str, configs: dict[str, dict[str, Any]], weights: dict[str, dict],
                        config_folder: Path | None) -> TextEncoders:
    """Text encoders from config dicts and converted state dicts; tokenizers from the config folder."""
    folder = config_folder or config_dir(family)
    tokenizers, encoders = [], []
    for tok_name, enc_name in TEXT_PARTS:
        if enc_name not in weights:
            continue
        cfg = CLIPTextConfig.from_dict(configs[enc_name])
        cls = CLIPTextModelWithProjection if "text_projection.weight" in weights[enc_name] else CLIPTextModel
        encoders.append(build_module(lambda c=cfg, k=cls: k(c), weights[enc_name], enc_name))
        tokenizers.append(load_tokenizer(folder / tok_name))
    return TextEncoders(tuple(tokenizers), tuple(encoders), FAMILY_INFO[family].style)


def build_module(make, state_dict: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Instantiate without allocating weights, then take `state_dict`'s tensors; every key must match."""
    with init_empty_weights():
        module = make()
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"the checkpoint's {what} weights do not fit its architecture: {e}") from None
    return module


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
