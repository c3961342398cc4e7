"""IP-Adapter units in the one loop: adapters installed on the UNet for a job, their images encoded once.

Installing goes through diffusers (`UNet2DConditionModel._load_ip_adapter_weights`: IP-Adapter attention
processors on the cross-attention layers, `encoder_hid_proj` = the adapters' image projections) and is undone
when the job ends. A unit's images become conditioning rows beside the text (TextConditioning.image_embeds):
the positive branch sees the images' encoding, the negative branch an "empty image", as diffusers builds them:
    plain            CLIP image_embeds (1, n, D_proj);                negative: zeros
    plus, full-face  penultimate hidden states (1, n, 1 + patches, D_vit);  negative: the encoder's on zero pixels
Unit j acts with its weight at evaluation i of N when start_j <= i / N and (i + 1) / N <= end_j, else with 0
(the same window as ControlNet units).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from torch import Tensor
from transformers import CLIPVisionModelWithProjection

from sdstudio.engine.requests import IpAdapterUnit
from sdstudio.errors import RequestError, SdStudioError
from sdstudio.models.find.catalog import ModelFolders
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.load.ip_adapter import (
    AdapterCache,
    AdapterFile,
    available_adapters,
    available_encoders,
    encoder_fits,
    find_named,
)

try:  # transformers 5 names the PIL-only processor; without torchvision, CLIPImageProcessor falls back to it
    from transformers import CLIPImageProcessorPil as ClipProcessor
except ImportError:  # pragma: no cover
    from transformers import CLIPImageProcessor as ClipProcessor


@dataclass(frozen=True)
class ImagePrompt:
    """One unit's encoded images and when it acts."""

    positive: Tensor   # (1, n, D) or (1, n, tokens, D) on the UNet's device and dtype
    negative: Tensor   # same shape: the unconditional branch's
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    name: str = ""     # the adapter, as the infotext names it: `name [hash]`
    hash: str = ""
    module: str = "ip-adapter_clip_h"  # the ControlNet extension's name for the encoder that ran

    def scale_at(self, i: int, total: int) -> float:
        return 0.0 if i / total < self.start or (i + 1) / total > self.end else self.weight

    def infotext_unit(self) -> dict[str, object]:
        """As the ControlNet extension states an IP-Adapter unit (a1111/extras.py writes it)."""
        return {"preprocessor": self.module, "name": self.name, "hash": self.hash, "weight": self.weight,
                "resize_mode": "crop", "start": self.start, "end": self.end, "guess_mode": False}


@torch.inference_mode()
def encode_images(encoder: CLIPVisionModelWithProjection, images: Sequence[Image.Image],
                  hidden_states: bool) -> tuple[Tensor, Tensor]:
    """(positive, negative) for one unit's n images: CLIP preprocessing (shortest side to the encoder's size,
    centre crop, CLIP mean/std), then image_embeds or the penultimate hidden states; each with a leading 1."""
    size = encoder.config.image_size
    processor = ClipProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    pixels = pixels.to(encoder.device, encoder.dtype)                       # (n, 3, S, S)
    if hidden_states:
        positive = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    else:
        positive = encoder(pixels).image_embeds                              # (n, D_proj)
        negative = torch.zeros_like(positive)
    return positive[None], negative[None]


@contextmanager
def adapters_installed(unet: UNet2DConditionModel, adapters: Sequence[AdapterFile]) -> Iterator[None]:
    """The adapters on the UNet for the block's duration (nothing when there are none); undone after,
    even when the job fails: the processors, the projection and the config flag the UNet's forward reads."""
    if not adapters:
        yield
        return
    processors = dict(unet.attn_processors)
    projection, kind = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    quiet = logging.getLogger("diffusers.models.modeling_utils")  # its warning on the .to() it ends with
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        unet._load_ip_adapter_weights([a.state for a in adapters])
        quiet.setLevel(level)
        yield
    finally:
        quiet.setLevel(level)
        unet.encoder_hid_proj = projection  # first: a plus adapter's resampler has attention layers of its own
        unet.config.encoder_hid_dim_type = kind
        unet.set_attn_processor(processors)


@dataclass
class AdapterScales:
    """Sets each unit's scale on the installed IP-Adapter processors before evaluation i of `total`."""

    unet: UNet2DConditionModel
    prompts: tuple[ImagePrompt, ...]
    _processors: list = field(default_factory=list)

    def __call__(self, i: int, total: int) -> None:
        if not self._processors:
            self._processors = [p for p in self.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
        scales = [p.scale_at(i, total) for p in self.prompts]
        for processor in self._processors:
            processor.scale = scales


@dataclass(frozen=True)
class FoundUnit:
    """A unit's files, found by name before any model is loaded."""

    adapter: Path
    encoder: Path | None   # None: chosen when the adapter is read (the first encoder whose widths fit)


class ImagePromptLibrary:
    """Finds IP-Adapters and image encoders by name, reads and keeps a few, and encodes a job's units."""

    def __init__(self, folders: ModelFolders, hashes: HashCache):
        self.folders, self.cache = folders, AdapterCache(hashes)

    def adapter_files(self) -> list[Path]:
        return available_adapters(self.folders.ip_adapter, self.folders.controlnet)

    def find(self, unit: IpAdapterUnit, names_only: bool) -> FoundUnit:
        roots = (*self.folders.ip_adapter, *self.folders.controlnet)
        adapter = find_named(unit.model, self.adapter_files(), roots, "IP-Adapter", names_only)
        encoders = available_encoders(self.folders.clip_vision)
        if unit.encoder:
            return FoundUnit(adapter, find_named(unit.encoder, encoders, self.folders.clip_vision,
                                                 "image encoder", names_only))
        if not encoders:
            raise RequestError("unknown image encoder: IP-Adapters need a CLIP image encoder (e.g. IP-Adapter's "
                               "image_encoder folder, or ComfyUI's clip_vision files) in one of: "
                               f"{', '.join(str(d) for d in self.folders.clip_vision)}", "ip_adapters.encoder")
        return FoundUnit(adapter, None)

    def load(self, units: Sequence[IpAdapterUnit], found: Sequence[FoundUnit], unet: UNet2DConditionModel,
             device: torch.device, dtype: torch.dtype) -> tuple[list[AdapterFile], tuple[ImagePrompt, ...]]:
        """The adapter files to install and each unit's encoded images."""
        files, prompts = [], []
        for unit, where in zip(units, found, strict=True):
            adapter = self.cache.adapter(where.adapter)
            check_fits_unet(adapter, unet)
            encoder = self.cache.encoder(where.encoder or self.fitting_encoder(adapter), device, dtype)
            if not encoder_fits(encoder.config, adapter):
                raise RequestError(f"{where.encoder.name if where.encoder else 'the encoder'} does not fit "
                                   f"{adapter.name} ({adapter.kind}, input width {adapter.width}): choose another "
                                   "image encoder", "ip_adapters.encoder")
            positive, negative = encode_images(encoder, unit.images, adapter.hidden_states)
            files.append(adapter)
            module = "ip-adapter_clip_g" if encoder.config.hidden_size == 1664 else "ip-adapter_clip_h"  # bigG: SDXL
            prompts.append(ImagePrompt(positive, negative, float(unit.weight), float(unit.start), float(unit.end),
                                       adapter.name, adapter.hash, module))
        return files, tuple(prompts)

    def fitting_encoder(self, adapter: AdapterFile) -> Path:
        encoders, unreadable = available_encoders(self.folders.clip_vision), []
        for path in encoders:
            try:
                if encoder_fits(self.cache.config(path), adapter):
                    return path
            except (SdStudioError, OSError, ValueError):  # not a CLIP image encoder: skipped, and said below
                unreadable.append(path.name)
        need = "hidden size" if adapter.hidden_states else "projection width"
        skipped = f" (not CLIP image encoders: {', '.join(unreadable)})" if unreadable else ""
        raise RequestError(f"no image encoder fits {adapter.name} ({adapter.kind}, needs {need} {adapter.width}); "
                           f"installed: {', '.join(p.name for p in encoders) or 'none'}{skipped}",
                           "ip_adapters.encoder")


def check_fits_unet(adapter: AdapterFile, unet: UNet2DConditionModel) -> None:
    """An adapter made for this UNet: one to_k_ip per cross-attention layer, reading its context width."""
    layers = sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))
    keys = [k for k in adapter.state["ip_adapter"] if k.endswith(".to_k_ip.weight")]
    first = adapter.state["ip_adapter"].get("1.to_k_ip.weight")
    if len(keys) != layers or first is None or first.shape[1] != unet.config.cross_attention_dim:
        width = None if first is None else first.shape[1]
        raise RequestError(f"{adapter.name} is an IP-Adapter for another model family ({len(keys)} layers of width "
                           f"{width}; this model has {layers} of width {unet.config.cross_attention_dim}): use one "
                           "made for this model's family (SD 1.5 or SDXL)", "ip_adapters.model")
