"""Tiny VAEs (diffusers' AutoencoderTiny, the TAESD architecture) found by name: `taesd` (SD 1.x/2.x latents)
or `taesdxl` (SDXL's). Looked for in order:

  <model folder>/<name>/            a model's own (the bundled demo carries one: its latents are its own VAE's)
  <VAE folder>/<name>/              a diffusers AutoencoderTiny folder
  <VAE-approx folder>/<name>_decoder.pth (+ <name>_encoder.pth)   the original files A1111 and ComfyUI keep

The original files are TAESD's nn.Sequential state dicts: the encoder's layer indices are diffusers', the
decoder's are one higher (its first layer is the parameter-free clamp tanh(x/3)*3, which diffusers applies in
forward). A decoder without its encoder file decodes only. A tiny VAE works on the diffusion model's scaled
latents (scaling factor 1).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from sdstudio.errors import ModelError
from sdstudio.models.find.hashing import TINY_VAE_FOLDERS
from sdstudio.models.load.checkpoint_io import read_state_dict
from sdstudio.models.load.memory import realign

log = logging.getLogger(__name__)

TINY_NAMES = TINY_VAE_FOLDERS
TINY_WEIGHTS = "diffusion_pytorch_model.safetensors"
ORIGINAL_SUFFIXES = (".pth", ".safetensors")


def is_tiny_vae(folder: Path) -> bool:
    """A diffusers AutoencoderTiny folder."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == "AutoencoderTiny"
    except (OSError, ValueError):
        return False


def find_tiny_vae(name: str, model_path: Path, folders: Sequence[Path], approx: Sequence[Path] = ()) -> Path | None:
    """The tiny VAE called `name` for the model at `model_path`: a folder, or an original decoder file."""
    own = [model_path / name] if model_path.is_dir() else []
    folder = next((c for c in [*own, *(d / name for d in folders)] if is_tiny_vae(c)), None)
    files = (d / f"{name}_decoder{suffix}" for d in approx for suffix in ORIGINAL_SUFFIXES)
    return folder or next((f for f in files if f.is_file()), None)


def preview_tiny_vae(model_path: Path, family: str, folders: Sequence[Path], approx: Sequence[Path] = ()
                     ) -> Path | None:
    """The tiny VAE live previews use for a model of `family`, if there is one."""
    return find_tiny_vae("taesdxl" if family.startswith("sdxl") else "taesd", model_path, folders, approx)


def weights_file(path: Path) -> Path:
    """The file whose hash names a tiny VAE."""
    return path / TINY_WEIGHTS if path.is_dir() else path


def load_tiny_vae(path: Path, dtype: torch.dtype) -> AutoencoderTiny:
    """A tiny VAE from a diffusers folder or original files, on the CPU, in evaluation mode."""
    log.info("loading tiny VAE %s", path)
    if path.is_dir():
        vae = AutoencoderTiny.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    else:
        vae = from_original(path)
    return realign(vae.to(dtype).eval().requires_grad_(False))


def from_original(decoder_path: Path) -> AutoencoderTiny:
    """TAESD's original decoder file (and the encoder beside it, when there is one) as an AutoencoderTiny."""
    decoder = read_state_dict(decoder_path)
    if "1.weight" not in decoder:
        raise ModelError(f"{decoder_path.name} is not a TAESD decoder (no first convolution '1.weight')")
    state = {f"decoder.layers.{_shift(k, -1)}": v for k, v in decoder.items()}
    encoder_path = decoder_path.with_name(decoder_path.name.replace("_decoder", "_encoder"))
    if encoder_path.is_file():
        state |= {f"encoder.layers.{k}": v for k, v in read_state_dict(encoder_path).items()}
    vae = AutoencoderTiny(latent_channels=decoder["1.weight"].shape[1])
    missing, unexpected = vae.load_state_dict(state, strict=False)
    wrong = unexpected + [k for k in missing if k.startswith("decoder.") or encoder_path.is_file()]
    if wrong:
        raise ModelError(f"{decoder_path.name}: not TAESD's layout ({len(wrong)} keys differ, e.g. {wrong[0]})")
    vae.decodes_only = not encoder_path.is_file()
    return vae


def _shift(key: str, by: int) -> str:
    """'12.conv.0.weight' -> '11.conv.0.weight' for by = -1."""
    index, rest = re.match(r"(\d+)(.*)", key).groups()
    return f"{int(index) + by}{rest}"
