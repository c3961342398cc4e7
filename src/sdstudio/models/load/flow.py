"""Flow-matching models on disk (Stable Diffusion 3/3.5 and Flux.1) and loading them offline.

Both families are rectified-flow transformers over a 16-channel VAE (factor 8), read prompts with CLIP and
T5-v1.1, and are sampled by `FlowMatchEulerDiscreteScheduler`:

    sd3    SD3Transformer2DModel (MMDiT)   CLIP-L + OpenCLIP-G (penultimate layer, pooled), T5-XXL (optional)
    flux   FluxTransformer2DModel          CLIP-L (pooled only), T5-XXL; latents packed 2x2 into 64 channels;
                                           Flux-dev embeds a distilled guidance value, Flux-schnell none

A diffusers folder is recognised by its model_index.json. Tokenizers come from the folder when it has its
own vocabulary, else from the package: the CLIP BPE (configs.load_tokenizer) and T5-v1.1's vocabulary
(assets/t5-tokenizer, see scripts/build_t5_tokenizer.py). Everything loads with `local_files_only=True`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdstudio.errors import ModelError
from sdstudio.models.find.catalog import ModelFolders, ModelRef
from sdstudio.models.find.hashing import HashCache, short_hash
from sdstudio.models.load.configs import load_tokenizer
from sdstudio.models.load.flow_files import file_family, file_variant, load_flow_file
from sdstudio.models.load.flow_text import TextEncoder, t5_tokenizer
from sdstudio.models.load.kandinsky import pipeline_class
from sdstudio.models.load.memory import place, realign

log = logging.getLogger(__name__)

PIPELINES = {  # model_index.json `_class_name` -> family
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
}
FAMILY_NAMES = {"sd3": "SD3", "flux": "Flux"}
LISTING_FAMILIES = ("sd3", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell")  # what listings call them


def flow_family(path: Path) -> str | None:
    """'sd3' or 'flux' for a diffusers folder or a single .safetensors file of those families, else None."""
    path = Path(path)
    return PIPELINES.get(pipeline_class(path) or "") if path.is_dir() else file_family(path)


def listing_family(path: Path) -> str:
    """sd3 | flux-dev | flux-schnell from a folder's configs (Flux-dev's transformer embeds guidance); a single
    file's variant (sd3, sd3.5-medium, sd3.5-large, flux-dev, flux-schnell) from its keys."""
    if Path(path).is_file():
        return file_variant(Path(path))
    family = flow_family(path)
    if family != "flux":
        return str(family)
    try:
        config = json.loads((Path(path) / "transformer" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {Path(path).name}'s transformer config: {e}") from None
    return "flux-dev" if config.get("guidance_embeds") else "flux-schnell"


@dataclass(eq=False)
class FlowModel:
    """A loaded SD3 or Flux model, on one device in one dtype.

    clip: SD3's (CLIP-L, OpenCLIP-G) or Flux's (CLIP-L,); t5: None when the model runs without T5
    (SD3 allows it: its T5 rows are zeros)."""

    ref: ModelRef
    sha256: str
    family: str
    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip: tuple[TextEncoder, ...]
    t5: TextEncoder | None
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    offload: str = "none"
    memo: dict[str, Any] = field(default_factory=dict)

    factor = 8  # pixels per latent cell (both VAEs)

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def short_hash(self) -> str:
        return short_hash(self.sha256)

    @property
    def guidance_embeds(self) -> bool:
        """Flux-dev: the transformer takes the distilled guidance value (Flux-schnell and SD3 do not)."""
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def grid(self) -> int:
        """Pixel sizes must be multiples of this: the VAE's 8 times the patch (SD3) or the 2x2 packing (Flux)."""
        patch = 2 if self.family == "flux" else int(self.transformer.config.patch_size)
        return self.factor * patch

    @property
    def native_size(self) -> int:
        if self.family == "sd3":
            return int(self.transformer.config.sample_size) * self.factor
        return 1024


def _component(folder: Path, name: str, cls: Any, dtype: torch.dtype) -> Any:
    if not (folder / name).is_dir():
        raise ModelError(f"{folder.name} has no {name}/ folder: the model is incomplete")
    return realign(cls.from_pretrained(folder, subfolder=name, local_files_only=True, torch_dtype=dtype))


def _optional(folder: Path, name: str) -> bool:
    """Whether model_index.json lists a component (SD3 may be saved without its T5: [null, null])."""
    entry = json.loads((folder / "model_index.json").read_text()).get(name)
    return bool(entry and entry[0]) and (folder / name).is_dir()


def load_flow_folder(ref: ModelRef, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
    """The family and components of a diffusers folder, on the CPU in `dtype`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    folder, family = ref.path, flow_family(ref.path)
    if family is None:
        raise ModelError(f"{ref.name} is not an SD3 or Flux diffusers folder")
    parts: dict[str, Any] = {"vae": _component(folder, "vae", AutoencoderKL, dtype)}
    scheduler = folder / "scheduler" / "scheduler_config.json"
    parts["scheduler_config"] = json.loads(scheduler.read_text()) if scheduler.is_file() else {}
    if family == "sd3":
        parts["transformer"] = _component(folder, "transformer", SD3Transformer2DModel, dtype)
        parts["clip"] = tuple(TextEncoder(load_tokenizer(folder / tok), _component(folder, enc,
                                          CLIPTextModelWithProjection, dtype))
                              for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")))
        t5 = ("tokenizer_3", "text_encoder_3")
    else:
        parts["transformer"] = _component(folder, "transformer", FluxTransformer2DModel, dtype)
        parts["clip"] = (TextEncoder(load_tokenizer(folder / "tokenizer"),
                                     _component(folder, "text_encoder", CLIPTextModel, dtype)),)
        t5 = ("tokenizer_2", "text_encoder_2")
    parts["t5"] = (TextEncoder(t5_tokenizer(folder / t5[0]), _component(folder, t5[1], T5EncoderModel, dtype))
                   if _optional(folder, t5[1]) else None)
    if family == "flux" and parts["t5"] is None:
        raise ModelError(f"{ref.name}: Flux needs its T5 text encoder (text_encoder_2/), which is missing")
    return family, parts


def load_flow(ref: ModelRef, device: torch.device, dtype: torch.dtype, offload: str, hashes: HashCache,
              folders: ModelFolders) -> FlowModel:
    if ref.kind == "file":
        family, parts = load_flow_file(ref.path, dtype, folders.text_encoders, folders.vae)
    else:
        family, parts = load_flow_folder(ref, dtype)
    encoders = [te.encoder for te in parts["clip"]] + ([parts["t5"].encoder] if parts["t5"] else [])
    for module in (*encoders, parts["transformer"], parts["vae"]):
        module.eval().requires_grad_(False)
    used = place([*encoders, parts["transformer"], parts["vae"]], device, offload)
    log.info("loaded %s (%s) on %s, %s, offload %s", ref.name, FAMILY_NAMES[family], device, dtype, used)
    return FlowModel(ref, hashes.model_sha256(ref.path), family, parts["transformer"], parts["vae"], parts["clip"],
                     parts["t5"], parts["scheduler_config"], device, dtype, used)


class FlowModels:
    """Loaded flow models, least recently used first, at most `capacity` of them."""

    def __init__(self, device: torch.device, dtype: torch.dtype, offload: str, hashes: HashCache,
                 folders: ModelFolders, capacity: int = 1):
        self.device, self.dtype, self.offload, self.hashes, self.capacity = device, dtype, offload, hashes, capacity
        self.folders = folders
        self._loaded: dict[tuple[Path, int], FlowModel] = {}

    @property
    def loaded(self) -> list[FlowModel]:
        return list(self._loaded.values())

    def get(self, ref: ModelRef) -> FlowModel:
        stamp = ref.path / "model_index.json" if ref.path.is_dir() else ref.path
        key = (ref.path.resolve(), stamp.stat().st_mtime_ns)
        if key in self._loaded:
            self._loaded[key] = self._loaded.pop(key)
            return self._loaded[key]
        while len(self._loaded) >= self.capacity:
            log.info("unloading %s", self._loaded.pop(next(iter(self._loaded))).name)
        model = load_flow(ref, self.device, self.dtype, self.offload, self.hashes, self.folders)
        self._loaded[key] = model
        return model
