"""SD3 and Flux single files, as the releases and civitai ship them and ComfyUI/Forge users keep them.

    all-in-one       one .safetensors with the transformer, the VAE and (SD3.5) the text encoders, under the
                     prefixes of flow_keys.py (sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors and the like)
    transformer-only Flux releases (flux1-dev.safetensors) in models/unet or models/diffusion_models (ComfyUI) or
                     models/Stable-diffusion (Forge), with the parts beside them in their own folders:
                     clip_l.safetensors, clip_g.safetensors (SD3), t5xxl_*.safetensors in models/clip or
                     models/text_encoders (ComfyUI), models/text_encoder (Forge); ae.safetensors (Flux) or the SD3
                     VAE in models/vae / models/VAE

A part missing from the file is taken from those folders: text encoders by kind (named clip_l / clip_g / t5xxl, or
told apart by their shapes), higher precision first; a Flux VAE by its 16 latent channels. Weights stored in fp8
(float8_e4m3fn/e5m2) are upcast to the compute dtype; "scaled" fp8 files multiply each weight by its stored scale.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import Tensor

from sdstudio.errors import ModelError
from sdstudio.models.load.checkpoint_io import header_shapes, open_state_dict
from sdstudio.models.load.configs import CONFIGS, load_tokenizer
from sdstudio.models.load.flow_keys import (
    PACKED,
    VAE,
    clip_config,
    flux_config,
    flux_to_diffusers,
    sd3_config,
    strip,
    t5_config,
    text_encoder_kind,
    transformer_family,
    transformer_part,
    vae_config,
    variant,
)
from sdstudio.models.load.flow_text import TextEncoder, t5_tokenizer
from sdstudio.models.load.memory import realign
from sdstudio.models.load.parts import build_module

log = logging.getLogger(__name__)

PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp8")  # companion files: the first found in a name wins ties


def header(path: Path) -> Mapping[str, Any]:
    """Key -> tensor-like with .shape, without reading the tensors (safetensors only)."""
    return header_shapes(path)


def file_family(path: Path) -> str | None:
    """'sd3' or 'flux' for a .safetensors file holding that transformer."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        return transformer_family(header(path))
    except ModelError:
        return None


def file_variant(path: Path) -> str:
    shapes = header(path)
    return variant(str(transformer_family(shapes)), shapes)


@dataclass(frozen=True)
class Companions:
    """Where each part not in the model file comes from (None: from the file itself)."""

    clip_l: Path | None = None
    clip_g: Path | None = None
    t5: Path | None = None
    vae: Path | None = None


def _precision_rank(path: Path) -> int:
    name = path.name.lower()
    return next((i for i, tag in enumerate(PRECISION_ORDER) if tag in name), 1)


def _candidates(folders: Sequence[Path]) -> list[Path]:
    files = [p for folder in folders if folder.is_dir() for p in sorted(folder.glob("*.safetensors"))]
    return sorted(files, key=_precision_rank)


def find_companions(family: str, shapes: Mapping[str, Any], text_folders: Sequence[Path],
                    vae_folders: Sequence[Path]) -> Companions:
    """The files for each part `shapes` lacks; ModelError naming what is missing and where it was looked for."""
    needed = ["clip_l", "clip_g", "t5"] if family == "sd3" else ["clip_l", "t5"]
    found: dict[str, Path] = {}
    missing: list[str] = []
    for kind in needed:
        if any(k.startswith(PACKED[kind]) for k in shapes):
            continue
        path = next((p for p in _candidates(text_folders) if _kind(p) == kind), None)
        if path is not None:
            found[kind] = path
        elif not (family == "sd3" and kind == "t5"):  # SD3 runs without T5 (its T5 rows are zeros)
            missing.append(kind)
    if not any(k.startswith(VAE) for k in shapes):
        path = next((p for p in _candidates(vae_folders) if _is_flow_vae(p)), None)
        if path is None:
            missing.append("vae")
        else:
            found["vae"] = path
    if missing:
        where = ", ".join(str(p) for p in [*text_folders, *vae_folders]) or "no folders configured"
        names = {"clip_l": "CLIP-L (clip_l.safetensors)", "clip_g": "CLIP-G (clip_g.safetensors)",
                 "t5": "T5-XXL (t5xxl_fp16.safetensors or an fp8 one)",
                 "vae": "the 16-channel VAE (ae.safetensors for Flux, the SD3 VAE for SD3)"}
        raise ModelError(f"this {'SD3' if family == 'sd3' else 'Flux'} file holds only part of the model; missing: "
                         f"{', '.join(names[m] for m in missing)}. Put them in a text-encoder or VAE folder (looked "
                         f"in: {where})")
    return Companions(**found)


def _kind(path: Path) -> str | None:
    try:
        return text_encoder_kind(header(path), path.name)
    except ModelError:
        return None


def _is_flow_vae(path: Path) -> bool:
    try:
        shapes = header(path)
    except ModelError:
        return False
    key = next((k for k in (VAE + "encoder.conv_out.weight", "encoder.conv_out.weight") if k in shapes), None)
    return key is not None and shapes[key].shape[0] == 32  # 16 latent channels: mean and log-variance


# ---- reading tensors ------------------------------------------------------------------------------------------

def read_part(path: Path, prefix: str, dtype: torch.dtype, select: Any = None) -> dict[str, Tensor]:
    """The tensors under `prefix` (stripped), upcast/cast to `dtype`; fp8 "scaled" weights times their scale."""
    reader = open_state_dict(path)
    keys = [k for k in reader if k.startswith(prefix) and (select is None or select(k[len(prefix):]))]
    raw = {k[len(prefix):]: reader[k] for k in keys}
    scales = {k[: -len("scale_weight")]: v for k, v in raw.items() if k.endswith(".scale_weight")}
    out: dict[str, Tensor] = {}
    for key, tensor in raw.items():
        if key.endswith(".scale_weight") or key in ("scaled_fp8", "scale_input"):
            continue
        if tensor.is_floating_point():
            value = tensor.to(torch.float32)
            scale = scales.get(key[: -len("weight")]) if key.endswith(".weight") else None
            tensor = (value * scale.to(torch.float32) if scale is not None else value).to(dtype)
        out[key] = tensor
    return out


def _base(variant_name: str, part: str) -> dict[str, Any]:
    return json.loads((CONFIGS / variant_name / part / ("scheduler_config.json" if part == "scheduler" else
                                                        "config.json")).read_text())


def load_transformer(path: Path, family: str, shapes: Mapping[str, Any], name: str, dtype: torch.dtype) -> Any:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in shapes) else ""
    inner = set(transformer_part(shapes))
    sd = read_part(path, prefix, dtype, lambda k: k in inner)
    if family == "sd3":
        config, cls = sd3_config(shapes, _base(name, "transformer")), SD3Transformer2DModel
        sd = convert_sd3_transformer_checkpoint_to_diffusers(sd)
    else:
        config, cls = flux_config(shapes, _base(name, "transformer")), FluxTransformer2DModel
        sd = flux_to_diffusers(sd)
    return realign(build_module(lambda: cls.from_config(config), sd, f"{family} transformer").eval())


def load_vae(path: Path, shapes: Mapping[str, Any], name: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    prefix = VAE if any(k.startswith(VAE) for k in shapes) else ""
    config = vae_config(strip(shapes, prefix) if prefix else shapes, _base(name, "vae"))
    sd = {VAE + k: v for k, v in read_part(path, prefix, dtype).items()}
    converted = convert_ldm_vae_checkpoint(sd, config)
    return realign(build_module(lambda: AutoencoderKL.from_config(config), converted, "VAE").eval())


def load_clip(path: Path, prefix: str, folder: str, name: str, dtype: torch.dtype, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = {_text_model(k): v for k, v in read_part(path, prefix, dtype).items()}
    sd = {k: v for k, v in sd.items() if k.startswith(("text_model.", "text_projection."))}
    sd.pop("text_model.embeddings.position_ids", None)
    if not projection:
        sd.pop("text_projection.weight", None)
    elif "text_projection.weight" not in sd:  # CLIP-L files kept for Flux: SD3 wants its projection
        raise ModelError(f"{path.name} has no text_projection: SD3 needs CLIP's projected (pooled) output")
    config = CLIPTextConfig(**clip_config(sd, _base(name, folder)))
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel

    def make() -> Any:
        return cls(config)

    with init_empty_weights():  # transformers 5 names CLIPTextModel's weights without "text_model."
        flat = not any(k.startswith("text_model.") for k in make().state_dict())
    if flat:
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return realign(build_module(make, sd, f"CLIP text encoder ({path.name})").to(dtype).eval())


def _text_model(key: str) -> str:
    """transformers' CLIP text keys as the published files name them: under text_model. (projection aside)."""
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def load_t5(path: Path, prefix: str, folder: str, name: str, dtype: torch.dtype) -> Any:
    from transformers import T5Config, T5EncoderModel

    sd = read_part(path, prefix, dtype, lambda k: k.startswith(("encoder.", "shared.")))
    embed = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if embed is None:
        raise ModelError(f"{path.name} has no token embedding (shared.weight): not a T5 encoder")
    sd.setdefault("shared.weight", embed)  # the same table in T5; files keep one or both copies
    sd.setdefault("encoder.embed_tokens.weight", embed)
    config = T5Config(**t5_config(sd, _base(name, folder)))
    return realign(build_module(lambda: T5EncoderModel(config), sd, f"T5 encoder ({path.name})").to(dtype).eval())


def load_flow_file(path: Path, dtype: torch.dtype, text_folders: Sequence[Path],
                   vae_folders: Sequence[Path]) -> tuple[str, dict[str, Any]]:
    """The family and components of a single file plus its companions, on the CPU in `dtype`."""
    shapes = header(path)
    family = transformer_family(shapes)
    if family is None:
        raise ModelError(f"{path.name} holds no SD3 or Flux transformer")
    name = _config_name(variant(family, shapes))
    parts = find_companions(family, shapes, text_folders, vae_folders)
    log.info("%s: %s single file; parts from %s", path.name, name, parts)
    vae_path = parts.vae or path
    vae = load_vae(vae_path, header(vae_path), name, dtype)
    clips = []
    folders = ["text_encoder", "text_encoder_2"] if family == "sd3" else ["text_encoder"]
    for kind, folder in zip(("clip_l", "clip_g"), folders, strict=False):
        source: Path | None = getattr(parts, kind)
        encoder = load_clip(source or path, "" if source else PACKED[kind], folder, name, dtype, family == "sd3")
        clips.append(TextEncoder(load_tokenizer(CONFIGS / name / folder.replace("text_encoder", "tokenizer")),
                                 encoder))
    t5 = None
    if parts.t5 or any(k.startswith(PACKED["t5"]) for k in shapes):
        folder = "text_encoder_3" if family == "sd3" else "text_encoder_2"
        t5 = TextEncoder(t5_tokenizer(), load_t5(parts.t5 or path, "" if parts.t5 else PACKED["t5"], folder, name,
                                                 dtype))
    return family, {"transformer": load_transformer(path, family, shapes, name, dtype), "vae": vae,
                    "clip": tuple(clips), "t5": t5,
                    "scheduler_config": _base(name, "scheduler")}


def _config_name(variant_name: str) -> str:
    return "sd3-medium" if variant_name == "sd3" else variant_name
