"""Tiny SD3 and Flux models written as the single files users have: the published key layouts (flow_keys.py), built
from a tiny diffusers folder by inverting the conversions the loader applies (diffusers' SD3 converter, our Flux
table). Loading them must give the folder's model back exactly (tests/test_flow_files.py).

    write_flux_files(folder, comfy)    ComfyUI's layout: models/unet/<name>.safetensors (transformer only), models/clip/
                                       clip_l.safetensors, models/text_encoders/t5xxl_fp16.safetensors, models/vae/
                                       ae.safetensors
    write_sd3_file(folder, path)       one all-in-one file: MMDiT, VAE and the three text encoders
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from sdstudio.models.load.flow_keys import DIT, PACKED, VAE, flux_from_diffusers
from sdstudio.models.tools.convert import read_component_weights
from sdstudio.models.tools.ldm_keys import vae_to_ldm


def _swap(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SD3Transformer2DModel's state dict in the original MMDiT layout (the inverse of diffusers' converter)."""
    out = {"pos_embed": sd["pos_embed.pos_embed"], "proj_out": None}
    out.pop("proj_out")
    simple = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    for p in ("weight", "bias"):
        out.update({f"{o}.{p}": sd[f"{d}.{p}"] for d, o in simple.items()})
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == layers - 1
        for p in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{o}x_block.attn.proj.{p}"] = sd[f"{d}attn.to_out.0.{p}"]
            out[f"{o}x_block.adaLN_modulation.1.{p}"] = sd[f"{d}norm1.linear.{p}"]
            context_mod = sd[f"{d}norm1_context.linear.{p}"]
            out[f"{o}context_block.adaLN_modulation.1.{p}"] = _swap(context_mod) if last else context_mod
            out[f"{o}x_block.mlp.fc1.{p}"] = sd[f"{d}ff.net.0.proj.{p}"]
            out[f"{o}x_block.mlp.fc2.{p}"] = sd[f"{d}ff.net.2.{p}"]
            if not last:
                out[f"{o}context_block.attn.proj.{p}"] = sd[f"{d}attn.to_add_out.{p}"]
                out[f"{o}context_block.mlp.fc1.{p}"] = sd[f"{d}ff_context.net.0.proj.{p}"]
                out[f"{o}context_block.mlp.fc2.{p}"] = sd[f"{d}ff_context.net.2.{p}"]
            if f"{d}attn2.to_q.{p}" in sd:
                out[f"{o}x_block.attn2.qkv.{p}"] = torch.cat([sd[f"{d}attn2.to_{x}.{p}"] for x in "qkv"])
                out[f"{o}x_block.attn2.proj.{p}"] = sd[f"{d}attn2.to_out.0.{p}"]
        norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                 "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
                 "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
        out.update({f"{o}{orig}.weight": sd[f"{d}{ours}.weight"] for ours, orig in norms.items()
                    if f"{d}{ours}.weight" in sd})
    return out


def published_clip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIP text weights as the published files name them (transformers 4's layout: under text_model.)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}


def published_t5(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """T5 encoder weights as the published files keep them: the token table once, as shared.weight."""
    out = dict(sd)
    embed = out.pop("encoder.embed_tokens.weight", None)
    out.setdefault("shared.weight", embed)
    return out


def _save(tensors: Mapping[str, Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_flux_files(folder: Path, comfy: Path, *, name: str = "flux1-dev", prefixed: bool = False,
                     t5_dtype: torch.dtype | None = None) -> Path:
    """A tiny Flux folder as ComfyUI users keep Flux; returns the transformer file. `prefixed`: keys under
    model.diffusion_model. (as some civitai files); `t5_dtype`: e.g. torch.float8_e4m3fn for an fp8 T5 file."""
    models = comfy / "models"
    transformer = flux_from_diffusers(read_component_weights(folder / "transformer"))
    if prefixed:
        transformer = {DIT + k: v for k, v in transformer.items()}
    path = _save(transformer, models / "unet" / f"{name}.safetensors")
    _save(published_clip(read_component_weights(folder / "text_encoder")), models / "clip" / "clip_l.safetensors")
    t5_name = "t5xxl_fp8_e4m3fn.safetensors" if t5_dtype == torch.float8_e4m3fn else "t5xxl_fp16.safetensors"
    _save(published_t5(read_component_weights(folder / "text_encoder_2")), models / "text_encoders" / t5_name,
          t5_dtype)
    _save(vae_to_ldm(read_component_weights(folder / "vae")), models / "vae" / "ae.safetensors")
    return path


def write_sd3_file(folder: Path, path: Path, *, with_t5: bool = True) -> Path:
    """A tiny SD3 folder as one all-in-one file (the SD3.5 releases' `..._incl_clips_t5xxl...` layout)."""
    tensors = {DIT + k: v for k, v in sd3_from_diffusers(read_component_weights(folder / "transformer")).items()}
    tensors.update({VAE + k: v for k, v in vae_to_ldm(read_component_weights(folder / "vae")).items()})
    parts = [("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")] + ([("t5", "text_encoder_3")] if with_t5
                                                                          else [])
    for kind, sub in parts:
        weights = read_component_weights(folder / sub)
        weights = published_t5(weights) if kind == "t5" else published_clip(weights)
        tensors.update({PACKED[kind] + k: v for k, v in weights.items()})
    return _save(tensors, path)
