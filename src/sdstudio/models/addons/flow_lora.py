"""LoRA files for SD3 and Flux, read into the same LoraFile the merge code applies (lora.py).

diffusers reads the layouts these LoRAs ship in and converts them to its PEFT names (`transformer.<module>.lora_A/B`,
`text_encoder[_2].<module>...`): for Flux, kohya/sd-scripts (`lora_unet_double_blocks_0_img_attn_qkv...`, fused
q/k/v split per projection, alpha folded into the weights), XLabs and ComfyUI/BFL files; for SD3, the PEFT layout its
trainers write. SD3 LoRAs in kohya's layout (`lora_unet_joint_blocks_0_x_block_attn_qkv...`), which diffusers does
not convert, are mapped here (`sd3_kohya_to_diffusers`). The converted layers then merge into the transformer and
the CLIP encoders for one job and are restored bit-exactly afterwards, with the same pre-flight report as Stable
Diffusion's LoRAs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from sdstudio.errors import ModelError
from sdstudio.models.addons.lora import LoraFile, lora_from_state_dict, lora_sha256
from sdstudio.models.addons.lora_plan import guess_family
from sdstudio.models.load.checkpoint_io import read_metadata, read_state_dict
from sdstudio.models.load.flow import FAMILY_NAMES


def read_flow_lora(path: Path, family: str, layers: int = 0) -> LoraFile:
    """A LoRA for an SD3 ('sd3') or Flux ('flux') model, in diffusers' names (alphas kept as `.alpha` keys).
    layers: the SD3 transformer's depth (its last block's context modulation is stored swapped)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    state_dict, metadata = read_state_dict(path), read_metadata(path)
    if family == "sd3" and any(_KOHYA_SD3.match(k) for k in state_dict):
        converted = sd3_kohya_to_diffusers(state_dict, layers)
        return lora_from_state_dict(path.stem, converted, metadata=metadata, path=path,
                                    sha256=lora_sha256(path, metadata))
    try:
        if family == "flux":
            converted, alphas = FluxPipeline.lora_state_dict(dict(state_dict), return_alphas=True)
        else:
            converted, alphas = StableDiffusion3Pipeline.lora_state_dict(dict(state_dict)), {}
    except (KeyError, ValueError, RuntimeError, AssertionError) as e:
        raw = lora_from_state_dict(path.stem, state_dict, metadata=metadata)
        raise ModelError(f"LoRA {path.stem!r} matches nothing in this {FAMILY_NAMES[family]} model: it looks like "
                         f"{guess_family(raw)} ({str(e).strip().splitlines()[0]})") from None
    merged: dict[str, Tensor] = {**converted, **(alphas or {})}
    return lora_from_state_dict(path.stem, merged, metadata=metadata, path=path, sha256=lora_sha256(path, metadata))


# ---- SD3 LoRAs in kohya's (sd-scripts) layout: MMDiT module names -> diffusers' ---------------------------------
# lora_unet_<MMDiT module, dots as _>.{lora_down.weight, lora_up.weight, alpha}; a fused qkv layer becomes three
# layers (to_q, to_k, to_v) sharing its down matrix, each with a third of its up rows; a modulation that
# diffusers stores as (scale, shift) instead of (shift, scale) gets its up rows' halves exchanged.
_KOHYA_SD3 = re.compile(r"^lora_unet_(?P<module>(?:joint_blocks_\d+_|x_embedder|context_embedder|t_embedder|"
                        r"y_embedder|final_layer)[a-zA-Z0-9_]*)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_BLOCK = {"x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
          "x_block_attn_proj": ("attn.to_out.0",), "context_block_attn_proj": ("attn.to_add_out",),
          "x_block_attn2_proj": ("attn2.to_out.0",), "x_block_mlp_fc1": ("ff.net.0.proj",),
          "x_block_mlp_fc2": ("ff.net.2",), "context_block_mlp_fc1": ("ff_context.net.0.proj",),
          "context_block_mlp_fc2": ("ff_context.net.2",), "x_block_adaLN_modulation_1": ("norm1.linear",),
          "context_block_adaLN_modulation_1": ("norm1_context.linear",)}
_GLOBAL = {"x_embedder_proj": "pos_embed.proj", "context_embedder": "context_embedder",
           "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
           "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
           "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
           "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}


def sd3_kohya_to_diffusers(sd: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """kohya's SD3 LoRA keys -> kohya-style keys on diffusers' module names (lora_unet_transformer_blocks_0_attn_to_q);
    text-encoder keys (lora_te1_/lora_te2_) and anything unrecognised pass through (reported later if unmatched)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _KOHYA_SD3.match(key)
        if m is None:
            out[key] = value
            continue
        module, part = m["module"], m["part"]
        block = re.match(r"joint_blocks_(\d+)_(.+)$", module)
        if block:
            targets = [f"transformer_blocks.{block[1]}.{t}" for t in _BLOCK.get(block[2], ())]
            swapped = block[2] == "context_block_adaLN_modulation_1" and int(block[1]) == layers - 1
        else:
            targets = [_GLOBAL[module]] if module in _GLOBAL else []
            swapped = module == "final_layer_adaLN_modulation_1"
        if not targets:
            out[key] = value  # a module this table does not know: dropped with its name by the merge plan
            continue
        if part == "lora_up.weight":
            value = _swap_rows(value) if swapped else value
            pieces = value.chunk(len(targets), dim=0)
        else:
            pieces = (value,) * len(targets)
        for target, piece in zip(targets, pieces, strict=True):
            out[f"lora_unet_{target.replace('.', '_')}.{part}"] = piece
    return out


def _swap_rows(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
