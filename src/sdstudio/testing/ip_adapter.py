"""Tiny IP-Adapters and CLIP image encoders with random weights, written as the published files are laid out
(h94/IP-Adapter: `image_proj.*` and `ip_adapter.<n>.to_k_ip.weight`), for tests and demos without downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


def tiny_image_encoder(folder: Path | None = None, *, hidden: int = 32, projection: int = 32, image_size: int = 32,
                       patch: int = 8, heads: int = 4, seed: int = 0) -> CLIPVisionModelWithProjection:
    """A small CLIPVisionModelWithProjection; saved as a transformers folder when `folder` is given."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, projection_dim=projection, image_size=image_size, patch_size=patch,
                              num_hidden_layers=2, num_attention_heads=heads, intermediate_size=2 * hidden,
                              hidden_act="gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModelWithProjection(config).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


def _rand(g: torch.Generator, *shape: int, scale: float = 0.05) -> Tensor:
    return torch.randn(*shape, generator=g) * scale


def _norm(prefix: str, dim: int) -> dict[str, Tensor]:
    return {f"{prefix}.weight": torch.ones(dim), f"{prefix}.bias": torch.zeros(dim)}


def image_proj(kind: str, width: int, cross: int, g: torch.Generator) -> dict[str, Tensor]:
    """The projection in the published layout. width: CLIP image_embeds (plain) or hidden size (plus, full-face)."""
    if kind == "plain":  # ImageProjection: 4 tokens
        return {"proj.weight": _rand(g, 4 * cross, width), "proj.bias": _rand(g, 4 * cross), **_norm("norm", cross)}
    if kind == "full-face":  # MLP per patch token
        return {"proj.0.weight": _rand(g, width, width), "proj.0.bias": _rand(g, width),
                "proj.2.weight": _rand(g, cross, width), "proj.2.bias": _rand(g, cross), **_norm("proj.3", cross)}
    dim, inner, queries = 64, 64, 16  # plus: a 4-layer perceiver resampler, one 64-wide head, 16 queries
    out = {"latents": _rand(g, 1, queries, dim, scale=1.0), "proj_in.weight": _rand(g, dim, width),
           "proj_in.bias": _rand(g, dim), "proj_out.weight": _rand(g, cross, dim), "proj_out.bias": _rand(g, cross),
           **_norm("norm_out", cross)}
    for i in range(4):
        out |= {**_norm(f"layers.{i}.0.norm1", dim), **_norm(f"layers.{i}.0.norm2", dim),
                f"layers.{i}.0.to_q.weight": _rand(g, inner, dim),
                f"layers.{i}.0.to_kv.weight": _rand(g, 2 * inner, dim),
                f"layers.{i}.0.to_out.weight": _rand(g, dim, inner), **_norm(f"layers.{i}.1.0", dim),
                f"layers.{i}.1.1.weight": _rand(g, 4 * dim, dim), f"layers.{i}.1.3.weight": _rand(g, dim, 4 * dim)}
    return out


def adapter_layers(unet: UNet2DConditionModel, g: torch.Generator) -> dict[str, Tensor]:
    """to_k_ip / to_v_ip for each cross-attention layer, numbered 1, 3, 5, ... in processor order."""
    out, n = {}, 1
    blocks = unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        part = name.split(".")
        hidden = blocks[-1] if part[0] == "mid_block" else \
            (blocks[int(part[1])] if part[0] == "down_blocks" else list(reversed(blocks))[int(part[1])])
        cross = unet.config.cross_attention_dim
        out[f"{n}.to_k_ip.weight"] = _rand(g, hidden, cross, scale=0.3)
        out[f"{n}.to_v_ip.weight"] = _rand(g, hidden, cross, scale=0.3)
        n += 2
    return out


def write_tiny_adapter(path: Path, unet: UNet2DConditionModel, kind: str, width: int, seed: int = 0) -> Path:
    """A random IP-Adapter for `unet` of `kind` (plain, plus, full-face) taking `width`-wide image features;
    .safetensors with flat keys, or a .bin with the nested dict the original .bin files hold."""
    g = torch.Generator().manual_seed(seed)
    parts = {"image_proj": image_proj(kind, width, unet.config.cross_attention_dim, g),
             "ip_adapter": adapter_layers(unet, g)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":
        torch.save(parts, path)
    else:
        save_file({f"{part}.{k}": v.contiguous() for part, tensors in parts.items() for k, v in tensors.items()}, path)
    return path
