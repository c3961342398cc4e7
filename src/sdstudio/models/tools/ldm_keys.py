"""Diffusers -> original (CompVis LDM / Stability SGM) weight names, one function per component kind.

The inverse of diffusers' `convert_ldm_*_checkpoint` converters, which have no reverse in the package.
Every function maps every key it is given or raises `ModelError` naming the ones it cannot place: a
weight is never dropped. Returned keys are relative to the component's root (see `ldm_layout.Part`), e.g.
`input_blocks.1.0.in_layers.0.weight` for the UNet, `transformer.text_model.final_layer_norm.weight` for
CLIP. Tensors are passed through untouched except where the layouts differ in shape (noted inline).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from sdstudio.errors import ModelError

# UNet: diffusers top-level module -> LDM module. label_emb.0.{0,2} is SDXL's pooled-text + time-id MLP.
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
}
# ResBlock: diffusers -> LDM sub-module (in_layers = [GroupNorm, SiLU, Conv], out_layers = [.., Dropout, Conv]).
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _unmapped(kind: str, keys: list[str]) -> ModelError:
    shown = ", ".join(sorted(keys)[:8]) + (", ..." if len(keys) > 8 else "")
    return ModelError(f"cannot write {len(keys)} {kind} weights in the original layout: {shown}")


def _resnet_leaf(rest: str) -> str:
    module, _, leaf = rest.partition(".")
    return f"{_RESNET.get(module, module)}.{leaf}"


def _unet_geometry(sd: Mapping[str, Tensor]) -> tuple[int, set[int]]:
    """(layers_per_block, indices of up blocks with attention). LDM numbers blocks by one global
    layers_per_block, so a UNet with a different resnet count per level has no LDM layout."""
    down: dict[int, set[int]] = {}
    up: dict[int, set[int]] = {}
    with_attention: set[int] = set()
    for key in sd:
        if m := _UNET_BLOCK.fullmatch(key):
            side, block, kind, j = m[1], int(m[2]), m[3], int(m[4])
            if kind == "resnets":
                (down if side == "down" else up).setdefault(block, set()).add(j)
            if side == "up" and kind == "attentions":
                with_attention.add(block)
    counts = {len(v) for v in down.values()} | {len(v) - 1 for v in up.values()}
    if len(counts) != 1:
        raise ModelError(f"the UNet has no LDM layout: resnets per block differ ({sorted(counts)})")
    return counts.pop(), with_attention


def _unet_block_key(m: re.Match[str], lpb: int, up_attn: set[int]) -> str:
    """down i, layer j -> input_blocks.(lpb+1)i+j+1 ; up i, layer j -> output_blocks.(lpb+1)i+j.
    Sub-module .0 is the ResBlock, .1 the transformer, then the resampler (.0.op down, .1/.2 up)."""
    side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if side == "down":
        if kind == "downsamplers":  # rest = conv.weight -> op.weight
            return f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{(lpb + 1) * i + j + 1}.{slot}.{_resnet_leaf(rest) if slot == 0 else rest}"
    if kind == "upsamplers":
        return f"output_blocks.{(lpb + 1) * i + lpb}.{2 if i in up_attn else 1}.{rest}"
    slot = 0 if kind == "resnets" else 1
    return f"output_blocks.{(lpb + 1) * i + j}.{slot}.{_resnet_leaf(rest) if slot == 0 else rest}"


def unet_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """UNet2DConditionModel -> `model.diffusion_model.*` names (relative). Transformer internals keep
    their names; proj_in/proj_out keep their shape (1x1 conv in SD1, linear in SD2/SDXL)."""
    lpb, up_attn = _unet_geometry(sd)
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{leaf}"] = value
        elif m := _UNET_BLOCK.fullmatch(key):
            out[_unet_block_key(m, lpb, up_attn)] = value
        elif (m := _UNET_MID.fullmatch(key)) and (m[1] == "resnets" or m[2] == "0"):
            # mid: ResBlock, transformer, ResBlock -> middle_block.0 / .1 / .2
            out[f"middle_block.{2 * int(m[2])}.{_resnet_leaf(m[3])}" if m[1] == "resnets"
                else f"middle_block.1.{m[3]}"] = value
        else:
            bad.append(key)
    if bad:
        raise _unmapped("UNet", bad)
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_BLOCK = re.compile(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_SAME = re.compile(r"(encoder\.|decoder\.)?(conv_in|conv_out|quant_conv|post_quant_conv)\.(weight|bias)")


def _vae_mid(m: re.Match[str], value: Tensor) -> tuple[str, Tensor]:
    side, kind, j, rest = m[1], m[2], int(m[3]), m[4]
    if kind == "resnets":
        return f"{side}.mid.block_{j + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}", value
    module, _, leaf = rest.rpartition(".")
    if j != 0 or module not in _VAE_ATTENTION:
        raise _unmapped("VAE", [f"{side}.mid_block.{kind}.{j}.{rest}"])
    if leaf == "weight" and value.ndim == 2:
        value = value[:, :, None, None]  # linear (C, C) -> LDM's 1x1 conv (C, C, 1, 1)
    return f"{side}.mid.attn_1.{_VAE_ATTENTION[module]}.{leaf}", value


def vae_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """AutoencoderKL -> `first_stage_model.*` names (relative). The decoder's levels are numbered
    from the bottom in LDM (up.{n-1-i}), from the top in diffusers (up_blocks.i)."""
    n_up = len({int(m[2]) for k in sd if (m := _VAE_BLOCK.fullmatch(k)) and m[1] == "decoder.up"})
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in sd.items():
        if m := _VAE_BLOCK.fullmatch(key):
            side, i, kind, j, rest = m[1], int(m[2]), m[3], m[4], m[5]
            level = i if side == "encoder.down" else n_up - 1 - i
            name = {"resnets": f"block.{j}", "downsamplers": "downsample", "upsamplers": "upsample"}[kind]
            out[f"{side}.{level}.{name}.{rest.replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := _VAE_MID.fullmatch(key):
            name, tensor = _vae_mid(m, value)
            out[name] = tensor
        elif _VAE_SAME.fullmatch(key):
            out[key] = value
        elif key.startswith(("encoder.conv_norm_out.", "decoder.conv_norm_out.")):
            out[key.replace("conv_norm_out", "norm_out")] = value
        else:
            bad.append(key)
    if bad:
        raise _unmapped("VAE", bad)
    return out


def _flat_clip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers >= 5.6 CLIPTextModel keys have no `text_model.`; CLIPTextModelWithProjection's do."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


def clip_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI CLIP (SD1, SDXL's embedders.0): the HF layout under `transformer.text_model.`."""
    flat = _flat_clip(sd)
    bad = [k for k in flat if not k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm."))]
    if bad:
        raise _unmapped("CLIP text encoder", bad)
    return {f"transformer.text_model.{k}": v for k, v in flat.items()}


_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",  # (77, W), no `.weight`
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def openclip_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModel(WithProjection) -> OpenCLIP names under `model.` (SD2, SDXL's ViT-bigG).

    q, k, v (W, W) each -> in_proj_weight = [q; k; v] (3W, W); text_projection.weight (P, W) -> its
    transpose (W, P): OpenCLIP computes x @ text_projection."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    bad: list[str] = []
    for key, value in _flat_clip(sd).items():
        m = _CLIP_LAYER.fullmatch(key)
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m and m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((m[1], m[3]), {})[m[2][-6]] = value
        elif m and m[2] in _OPENCLIP_LAYER:
            out[f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            bad.append(key)
    for (layer, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            bad.append(f"encoder.layers.{layer}.self_attn.*_proj.{leaf} (only {sorted(parts)})")
            continue
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts[x] for x in "qkv"], 0)
    if bad:
        raise _unmapped("OpenCLIP text encoder", bad)
    return {f"model.{k}": v for k, v in out.items()}


def sd2_openclip_extras(ldm: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The OpenCLIP-H weights SD2's LDM file has and diffusers' text encoder does not.

    SD2 conditions on the penultimate layer of OpenCLIP ViT-H (24 layers), so diffusers keeps 23 layers and
    no projection. For a complete original-layout file we write one more residual block with all weights
    zero, which is an exact identity (x + 0·attn(0) + 0·mlp(0) = x): whether a loader uses "penultimate"
    (SD2's setting) or the last layer, it gets diffusers' hidden states. `text_projection` (unused by SD2)
    is the identity (W, W). Both are dropped again on the way back (`from_ldm`)."""
    layers = {int(m[1]) for k in ldm if (m := re.fullmatch(r"model\.transformer\.resblocks\.(\d+)\..+", k))}
    if not layers or "model.ln_final.weight" not in ldm:
        raise ModelError("an SD2 text encoder needs its layers and final_layer_norm for the original layout")
    last = max(layers)
    extra = {k.replace(f"resblocks.{last}.", f"resblocks.{last + 1}."): torch.zeros_like(v)
             for k, v in ldm.items() if k.startswith(f"model.transformer.resblocks.{last}.")}
    width = ldm["model.ln_final.weight"]
    if "model.text_projection" not in ldm:
        extra["model.text_projection"] = torch.eye(width.shape[0], dtype=width.dtype, device=width.device)
    return extra


_ZERO_CONV = re.compile(r"controlnet_down_blocks\.(\d+)\.(weight|bias)")
_HINT = re.compile(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)")


def controlnet_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ControlNetModel -> lllyasviel's layout (as in `control_*.safetensors`, without the optional
    `control_model.` prefix): the UNet-shaped encoder as `input_blocks`/`middle_block`, the zero convs
    as `zero_convs.i.0` and `middle_block_out.0`, the hint encoder as `input_hint_block.{0, 2, ..., 2n+2}`."""
    hint_blocks = {int(m[2]) for k in sd if (m := _HINT.fullmatch(k)) and m[2] is not None}
    out: dict[str, Tensor] = {}
    encoder: dict[str, Tensor] = {}
    for key, value in sd.items():
        if m := _ZERO_CONV.fullmatch(key):
            out[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif key.startswith("controlnet_mid_block."):
            out[f"middle_block_out.0.{key.rpartition('.')[2]}"] = value
        elif m := _HINT.fullmatch(key):
            last = 2 * (len(hint_blocks) + 1)
            index = 0 if m[1] == "conv_in" else last if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
            out[f"input_hint_block.{index}.{m[3]}"] = value
        else:
            encoder[key] = value
    out.update(unet_to_ldm(encoder))
    return out
