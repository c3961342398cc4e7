"""Where each diffusers component lives in an original-layout (CompVis LDM / Stability SGM) checkpoint,
per model family, and which family a diffusers folder is.

Families: sd1, sd1-inpaint (UNet input = latents ⊕ mask ⊕ masked-image latents: 4 + 1 + 4 = 9 channels),
sd2, sd2-v (v-prediction: same weights layout, another scheduler), sd2-inpaint, sdxl, sdxl-inpaint,
sdxl-refiner (OpenCLIP-G only, 5 time ids instead of 6).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sdstudio.errors import ModelError


@dataclass(frozen=True)
class Part:
    """One component in the LDM file: every key under `root` belongs to it.

    kind: "unet" | "vae" | "clip" (OpenAI CLIP, HF layout) | "openclip" | "openclip-sd2" (OpenCLIP-H, one layer
    deeper in the file than in diffusers; see `ldm_keys.sd2_openclip_extras`)."""

    kind: str
    root: str


_UNET, _VAE = Part("unet", "model.diffusion_model."), Part("vae", "first_stage_model.")
_SD1 = MappingProxyType({"unet": _UNET, "vae": _VAE, "text_encoder": Part("clip", "cond_stage_model.")})
_SD2 = MappingProxyType({"unet": _UNET, "vae": _VAE, "text_encoder": Part("openclip-sd2", "cond_stage_model.")})
_SDXL = MappingProxyType({"unet": _UNET, "vae": _VAE, "text_encoder": Part("clip", "conditioner.embedders.0."),
                          "text_encoder_2": Part("openclip", "conditioner.embedders.1.")})
_REFINER = MappingProxyType({"unet": _UNET, "vae": _VAE,
                             "text_encoder_2": Part("openclip", "conditioner.embedders.0.")})

LDM_LAYOUTS = MappingProxyType({
    "sd1": _SD1, "sd1-inpaint": _SD1,
    "sd2": _SD2, "sd2-v": _SD2, "sd2-inpaint": _SD2,
    "sdxl": _SDXL, "sdxl-inpaint": _SDXL, "sdxl-refiner": _REFINER,
})


def ldm_layout(family: str) -> MappingProxyType[str, Part]:
    """component name -> Part for `family`; ModelError for an unknown family."""
    if family not in LDM_LAYOUTS:
        raise ModelError(f"unknown model family {family!r}; known: {', '.join(LDM_LAYOUTS)}")
    return LDM_LAYOUTS[family]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: not a diffusers model folder") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None


PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")  # SDXL model_index flags


def pipeline_options(index: dict[str, Any]) -> dict[str, Any]:
    """The model_index.json flags the SDXL pipelines read."""
    return {k: index[k] for k in PIPELINE_OPTIONS if k in index}


def has_component(folder: Path, name: str) -> bool:
    """model_index.json lists it as [library, class] (not [null, null]) and its folder has a config."""
    index_path = folder / "model_index.json"
    if index_path.is_file():
        entry = _read_json(index_path).get(name)
        if not (isinstance(entry, list) and entry and entry[0] is not None):
            return False
    return (folder / name / "config.json").is_file()


def read_family_from_folder(folder: Path) -> str:
    """The family of a diffusers folder, from its configs:
    UNet in_channels (9 = inpaint), addition_embed_type "text_time" (SDXL; no `text_encoder` = refiner),
    the text encoder's activation ("gelu" = OpenCLIP = SD2, "quick_gelu" = OpenAI CLIP = SD1) and the
    scheduler's prediction_type (v_prediction = sd2-v)."""
    unet = _read_json(Path(folder) / "unet" / "config.json")
    channels = unet.get("in_channels", 4)
    if channels not in (4, 9):
        raise ModelError(f"{folder}: UNet in_channels {channels} is not a supported family (4, or 9 for inpaint)")
    inpaint = channels == 9
    if unet.get("addition_embed_type") == "text_time":
        if has_component(folder, "text_encoder"):
            return "sdxl-inpaint" if inpaint else "sdxl"
        if inpaint:
            raise ModelError(f"{folder}: an SDXL refiner with an inpaint UNet is not a supported family")
        return "sdxl-refiner"
    encoder = _read_json(Path(folder) / "text_encoder" / "config.json")
    if encoder.get("hidden_act") != "gelu":
        return "sd1-inpaint" if inpaint else "sd1"
    if inpaint:
        return "sd2-inpaint"
    scheduler_path = Path(folder) / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    return "sd2-v" if scheduler.get("prediction_type") == "v_prediction" else "sd2"
