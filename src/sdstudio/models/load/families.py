"""Model families, and telling them apart in an LDM state dict (diffusers folders: `ldm_layout`).

Checkpoint key layouts (original CompVis/Stability "LDM" layout, as civitai ships files):
  UNet        model.diffusion_model.*            input_blocks.0.0.weight: (C, in_channels, 3, 3), 4 or 9
  SDXL UNet   model.diffusion_model.label_emb.0.0.weight: (E, 6*256 + 1280 = 2816) base,
                                                          (E, 5*256 + 1280 = 2560) refiner
  SD1 text    cond_stage_model.transformer.text_model.*           (CLIP ViT-L, width 768)
  SD2 text    cond_stage_model.model.*                            (OpenCLIP ViT-H, width 1024)
  SDXL text   conditioner.embedders.0.transformer.text_model.*    (CLIP ViT-L) + conditioner.embedders.1.model.* (G)
  refiner     conditioner.embedders.0.model.*                     (OpenCLIP ViT-bigG only)
The cross-attention width (attn2.to_k input: 768 SD1, 1024 SD2, 2048 SDXL, 1280 refiner) decides
when a file carries no text encoder. SD2 512-epsilon and 768-v files have identical keys: v-prediction
comes from a sidecar `<name>.yaml` (`parameterization: "v"`) or the user's override; otherwise SD2
defaults to v-prediction (768), as diffusers does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstudio.errors import ModelError


@dataclass(frozen=True)
class FamilyInfo:
    label: str
    style: str          # prompt encoding: "sd" or "sdxl"
    inpaint: bool = False


FAMILY_INFO: dict[str, FamilyInfo] = {
    "sd1": FamilyInfo("SD 1.x", "sd"),
    "sd1-inpaint": FamilyInfo("SD 1.x inpainting", "sd", inpaint=True),
    "sd2": FamilyInfo("SD 2.x (512, epsilon)", "sd"),
    "sd2-v": FamilyInfo("SD 2.x (768, v-prediction)", "sd"),
    "sd2-inpaint": FamilyInfo("SD 2.x inpainting", "sd", inpaint=True),
    "sdxl": FamilyInfo("SDXL", "sdxl"),
    "sdxl-refiner": FamilyInfo("SDXL refiner", "sdxl"),
    "sdxl-inpaint": FamilyInfo("SDXL inpainting", "sdxl", inpaint=True),
    "kandinsky2.2": FamilyInfo("Kandinsky 2.2 (prior + decoder)", "kandinsky"),  # models/load/kandinsky.py
    "kandinsky2.2-inpaint": FamilyInfo("Kandinsky 2.2 inpainting", "kandinsky", inpaint=True),
    "kandinsky2.2-prior": FamilyInfo("Kandinsky 2.2 prior (choose its decoder)", "kandinsky"),
}

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
LABEL_EMB = UNET + "label_emb.0.0.weight"
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
XL_TEXT_L = "conditioner.embedders.0.transformer."
XL_TEXT_G = "conditioner.embedders.1.model."
REFINER_TEXT_G = "conditioner.embedders.0.model."
_ATTN2_K = re.compile(r"^model\.diffusion_model\..*\.attn2\.to_k\.weight$")

def detect_family(state_dict: Mapping[str, Any], *, v_prediction: bool | None = None) -> str:
    """The family of an LDM-layout checkpoint from its key names and shapes (values are not read)."""
    if CONV_IN not in state_dict:
        raise ModelError(f"not a Stable Diffusion checkpoint: {what_is_it(state_dict)}")
    in_channels = int(state_dict[CONV_IN].shape[1])
    if in_channels not in (4, 9):
        raise ModelError(f"unsupported UNet with {in_channels} input channels "
                         "(4: text-to-image, 9: inpainting; 8 is InstructPix2Pix, not supported)")
    inpaint = in_channels == 9
    if LABEL_EMB in state_dict:
        if _has(state_dict, REFINER_TEXT_G) or (not _has(state_dict, XL_TEXT_G) and _context(state_dict) == 1280):
            if inpaint:
                raise ModelError("an SDXL refiner with 9 input channels is not a known model")
            return "sdxl-refiner"
        return "sdxl-inpaint" if inpaint else "sdxl"
    if _has(state_dict, SD2_TEXT) or (not _has(state_dict, SD1_TEXT) and _context(state_dict) == 1024):
        if inpaint:
            return "sd2-inpaint"
        return "sd2" if v_prediction is False else "sd2-v"
    return "sd1-inpaint" if inpaint else "sd1"


def _has(state_dict: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state_dict)


def _context(state_dict: Mapping[str, Any]) -> int | None:
    """The cross-attention context width: in_features of any attn2.to_k."""
    for key, value in state_dict.items():
        if _ATTN2_K.match(key):
            return int(value.shape[1])
    return None


def what_is_it(state_dict: Mapping[str, Any]) -> str:
    """A guess at what a non-checkpoint file is, for error messages."""
    keys = list(state_dict)
    if any(k.startswith(("lora_", "lora_unet", "unet.")) or ".lora_" in k for k in keys):
        return "it looks like a LoRA; put it in a LoRA folder and use <lora:name:weight> in the prompt"
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys):
        return "it looks like a textual-inversion embedding; use its name in the prompt"
    if any(k.startswith(("encoder.down", "decoder.up", "first_stage_model.")) for k in keys):
        return "it looks like a VAE; choose it with --vae"
    if any(k.startswith("control_model.") or k.startswith("controlnet_") for k in keys):
        return "it looks like a ControlNet"
    return f"no UNet weights ({CONV_IN} is missing)"


def sidecar_says_v(path: Path) -> bool | None:
    """A1111's convention: `<name>.yaml` beside the checkpoint; `parameterization: "v"` means v-prediction."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    return bool(re.search(r"""^\s*parameterization:\s*["']?v["']?\s*$""", yaml.read_text(), re.MULTILINE))
