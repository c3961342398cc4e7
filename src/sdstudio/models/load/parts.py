"""A model's parts and how they are built: load options, a diffusers folder loaded into parts, and helpers that
build modules from configs and state dicts with strict key checking (single_file.py uses them for single files;
loader.py places the parts on the device and keeps loaded models)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdstudio.errors import ModelError
from sdstudio.models.load.configs import config_dir, load_tokenizer
from sdstudio.models.load.families import FAMILY_INFO
from sdstudio.models.load.ldm_layout import pipeline_options, read_family_from_folder
from sdstudio.models.load.speed import SpeedOptions
from sdstudio.models.load.text_encoders import TextEncoders

TEXT_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


TEXT_PARTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


@dataclass(frozen=True)
class LoadOptions:
    """How to load: placement, plus overrides for what a single file cannot say about itself."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    prediction: str | None = None   # "epsilon" | "v_prediction": overrides the config's
    family: str | None = None       # skip detection
    config: Path | None = None      # a diffusers folder to take configs/tokenizers from
    offload: str = "none"           # none | model | sequential (see models/load/memory.py)
    speed: SpeedOptions = field(default_factory=SpeedOptions)  # channels_last, torch.compile (models/load/speed.py)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None


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
