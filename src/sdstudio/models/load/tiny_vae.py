"""Tiny VAEs (diffusers' AutoencoderTiny, the TAESD architecture) found by name: `taesd` (SD 1.x/2.x latents)
or `taesdxl` (SDXL's). A model folder may carry its own (`<model>/taesd/`, as the bundled demo does, whose
latents are its own VAE's); otherwise a diffusers AutoencoderTiny folder of that name in a VAE folder.
A tiny VAE works on the diffusion model's scaled latents (its scaling factor is 1).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from sdstudio.models.load.memory import realign

log = logging.getLogger(__name__)

TINY_NAMES = ("taesd", "taesdxl")


def is_tiny_vae(folder: Path) -> bool:
    """A diffusers AutoencoderTiny folder."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == "AutoencoderTiny"
    except (OSError, ValueError):
        return False


def tiny_vae_folder(name: str, model_path: Path, folders: Sequence[Path]) -> Path | None:
    """The tiny VAE called `name` for the model at `model_path`: its own, else one in the VAE folders."""
    own = [model_path / name] if model_path.is_dir() else []
    return next((c for c in [*own, *(d / name for d in folders)] if is_tiny_vae(c)), None)


def preview_vae_folder(model_path: Path, family: str, folders: Sequence[Path]) -> Path | None:
    """The tiny VAE live previews use for a model of `family`, if there is one."""
    return tiny_vae_folder("taesdxl" if family.startswith("sdxl") else "taesd", model_path, folders)


def load_tiny_vae(folder: Path, dtype: torch.dtype) -> AutoencoderTiny:
    """On the CPU, evaluation mode; the caller places it."""
    log.info("loading tiny VAE %s", folder)
    vae = AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    return realign(vae.eval().requires_grad_(False))
