"""What a flow model's single file is, from its keys and shapes alone: family, parts, and the diffusers configs.

Key layouts (as diffusers' single-file loader and ComfyUI read the published files; see docs/flow.md):

    SD3/SD3.5 MMDiT   [model.diffusion_model.]joint_blocks.N.{x_block,context_block}.attn.qkv.weight, x_embedder,
                      context_embedder, y_embedder, t_embedder, pos_embed, final_layer; SD3.5: attn.ln_q (RMS
                      QK-norm), SD3.5-medium: x_block.attn2 (dual attention)
    Flux.1            [model.diffusion_model.]double_blocks.N.img_attn.qkv.weight, single_blocks.N.linear1, img_in,
                      txt_in, time_in, vector_in, guidance_in (dev only), final_layer
    VAE (LDM)         [first_stage_model.]encoder.down.N.block.M..., 16 latent channels (conv_out: 32 = mean+logvar)
    CLIP-L / CLIP-G   [text_encoders.clip_l|clip_g.transformer.]text_model.* (transformers' own layout)
    T5-XXL            [text_encoders.t5xxl.transformer.]encoder.block.N.layer.M..., shared.weight

Configs are read from shapes where the shapes say it (widths, depths, channels, which layers have dual attention)
and taken from the published configs where they cannot (head size, activations, rotary axes, norm groups).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

DIT = "model.diffusion_model."
VAE = "first_stage_model."
PACKED = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
          "t5": "text_encoders.t5xxl.transformer."}


def _shape(shapes: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = shapes[key]
    return tuple(value.shape)


def _count(keys: Any, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def strip(keys: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}


def transformer_part(keys: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusion transformer's entries, with or without the LDM prefix."""
    inner = strip(keys, DIT)
    return inner or {k: v for k, v in keys.items() if k.startswith(("joint_blocks.", "double_blocks.",
                                                                     "single_blocks.")) or ("." in k and
                     k.split(".")[0] in TOP_LEVEL)}


TOP_LEVEL = {"x_embedder", "context_embedder", "y_embedder", "t_embedder", "pos_embed", "final_layer", "img_in",
             "txt_in", "time_in", "vector_in", "guidance_in"}


def transformer_family(keys: Any) -> str | None:
    """'sd3' or 'flux' when the keys hold that transformer, else None."""
    for key in keys:
        bare = key[len(DIT):] if key.startswith(DIT) else key
        if bare.startswith("joint_blocks.") and ".context_block." in bare:
            return "sd3"
        if bare.startswith("double_blocks.") and ".img_attn." in bare:
            return "flux"
    return None


def variant(family: str, shapes: Mapping[str, Any]) -> str:
    """sd3 | sd3.5-medium | sd3.5-large | flux-dev | flux-schnell, for listings and the bundled configs."""
    inner = transformer_part(shapes)
    if family == "flux":
        return "flux-dev" if "guidance_in.in_layer.weight" in inner else "flux-schnell"
    if any(".attn.ln_q." in k for k in inner):
        return "sd3.5-medium" if any(".attn2." in k for k in inner) else "sd3.5-large"
    return "sd3"


def sd3_config(shapes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """SD3Transformer2DModel's config from an MMDiT's shapes; head size (64) and sample size from `base`."""
    sd = transformer_part(shapes)
    hidden, channels, patch, _ = _shape(sd, "x_embedder.proj.weight")
    head = int(base["attention_head_dim"])
    layers = _count(sd, r"joint_blocks\.(\d+)\.")
    return dict(base, num_layers=layers, patch_size=patch, in_channels=channels, attention_head_dim=head,
                num_attention_heads=hidden // head, caption_projection_dim=_shape(sd, "context_embedder.weight")[0],
                joint_attention_dim=_shape(sd, "context_embedder.weight")[1],
                pooled_projection_dim=_shape(sd, "y_embedder.mlp.0.weight")[1],
                out_channels=_shape(sd, "final_layer.linear.weight")[0] // (patch * patch),
                pos_embed_max_size=round(_shape(sd, "pos_embed")[1] ** 0.5),
                qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in sd else None,
                dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k})))


def flux_config(shapes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """FluxTransformer2DModel's config from a Flux file's shapes; head size (128) and rotary axes from `base`."""
    sd = transformer_part(shapes)
    hidden, channels = _shape(sd, "img_in.weight")
    head = int(base["attention_head_dim"])
    return dict(base, in_channels=channels, num_layers=_count(sd, r"double_blocks\.(\d+)\."),
                num_single_layers=_count(sd, r"single_blocks\.(\d+)\."), attention_head_dim=head,
                num_attention_heads=hidden // head, joint_attention_dim=_shape(sd, "txt_in.weight")[1],
                pooled_projection_dim=_shape(sd, "vector_in.in_layer.weight")[1],
                guidance_embeds="guidance_in.in_layer.weight" in sd)


def clip_config(shapes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextConfig fields from a text_model.* state dict; activation and head size (64) from `base`."""
    vocab, hidden = _shape(shapes, "text_model.embeddings.token_embedding.weight")
    out = dict(base, vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // 64,
               intermediate_size=_shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
               num_hidden_layers=_count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
               max_position_embeddings=_shape(shapes, "text_model.embeddings.position_embedding.weight")[0])
    if "text_projection.weight" in shapes:
        out["projection_dim"] = _shape(shapes, "text_projection.weight")[0]
    return out


def t5_config(shapes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """T5Config fields from a T5 encoder's state dict; head size (d_kv 64) from `base`."""
    vocab, width = _shape(shapes, "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight")
    d_kv = int(base["d_kv"])
    q = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")[0]
    return dict(base, vocab_size=vocab, d_model=width, num_heads=q // d_kv, d_kv=d_kv,
                d_ff=_shape(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
                num_layers=_count(shapes, r"encoder\.block\.(\d+)\."), relative_attention_num_buckets=buckets)


def vae_config(shapes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL fields from an LDM-layout VAE; norm groups and scaling from `base`."""
    sd = strip(shapes, VAE) or dict(shapes)
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    return dict(base, block_out_channels=[_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0]
                                          for i in range(levels)],
                latent_channels=_shape(sd, "encoder.conv_out.weight")[0] // 2,
                layers_per_block=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)


def text_encoder_kind(shapes: Mapping[str, Any], name: str = "") -> str | None:
    """clip_l | clip_g | t5 for a text-encoder file in transformers' layout: by its keys, then by the name users
    give them (clip_l / clip_g), else by width (CLIP-L is 768 wide, OpenCLIP-G 1280)."""
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        return "t5"
    key = next((k for k in ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
                if k in shapes), None)
    if key is None:
        return None
    lowered = name.lower()
    if "clip_g" in lowered or "clip_l" in lowered:
        return "clip_g" if "clip_g" in lowered else "clip_l"
    return "clip_g" if _shape(shapes, key)[1] >= 1024 else "clip_l"


# ---- Flux: the original (Black Forest Labs) layout <-> diffusers' ------------------------------------------------
# (original key, diffusers key(s), how): "same" copies; "qkv" chunks in 3 along the rows; "linear1" splits the
# single block's fused q, k, v, mlp rows; "swap" exchanges the halves (shift, scale) -> (scale, shift).
_GLOBAL = [
    ("img_in.{p}", ["x_embedder.{p}"], "same"), ("txt_in.{p}", ["context_embedder.{p}"], "same"),
    ("time_in.in_layer.{p}", ["time_text_embed.timestep_embedder.linear_1.{p}"], "same"),
    ("time_in.out_layer.{p}", ["time_text_embed.timestep_embedder.linear_2.{p}"], "same"),
    ("vector_in.in_layer.{p}", ["time_text_embed.text_embedder.linear_1.{p}"], "same"),
    ("vector_in.out_layer.{p}", ["time_text_embed.text_embedder.linear_2.{p}"], "same"),
    ("guidance_in.in_layer.{p}", ["time_text_embed.guidance_embedder.linear_1.{p}"], "same"),
    ("guidance_in.out_layer.{p}", ["time_text_embed.guidance_embedder.linear_2.{p}"], "same"),
    ("final_layer.linear.{p}", ["proj_out.{p}"], "same"),
    ("final_layer.adaLN_modulation.1.{p}", ["norm_out.linear.{p}"], "swap"),
]
_DOUBLE = [
    ("img_mod.lin.{p}", ["norm1.linear.{p}"], "same"), ("txt_mod.lin.{p}", ["norm1_context.linear.{p}"], "same"),
    ("img_attn.qkv.{p}", ["attn.to_q.{p}", "attn.to_k.{p}", "attn.to_v.{p}"], "qkv"),
    ("txt_attn.qkv.{p}", ["attn.add_q_proj.{p}", "attn.add_k_proj.{p}", "attn.add_v_proj.{p}"], "qkv"),
    ("img_attn.proj.{p}", ["attn.to_out.0.{p}"], "same"), ("txt_attn.proj.{p}", ["attn.to_add_out.{p}"], "same"),
    ("img_mlp.0.{p}", ["ff.net.0.proj.{p}"], "same"), ("img_mlp.2.{p}", ["ff.net.2.{p}"], "same"),
    ("txt_mlp.0.{p}", ["ff_context.net.0.proj.{p}"], "same"), ("txt_mlp.2.{p}", ["ff_context.net.2.{p}"], "same"),
]
_DOUBLE_NORMS = [("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                 ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                 ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                 ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight")]
_SINGLE = [
    ("modulation.lin.{p}", ["norm.linear.{p}"], "same"), ("linear2.{p}", ["proj_out.{p}"], "same"),
    ("linear1.{p}", ["attn.to_q.{p}", "attn.to_k.{p}", "attn.to_v.{p}", "proj_mlp.{p}"], "linear1"),
]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]


def _flux_rules(double: int, single: int) -> list[tuple[str, list[str], str]]:
    rules = [(o.format(p=p), [d.format(p=p) for d in ds], how) for o, ds, how in _GLOBAL for p in ("weight", "bias")]
    for i in range(double):
        rules += [(f"double_blocks.{i}." + o.format(p=p), [f"transformer_blocks.{i}." + d.format(p=p) for d in ds],
                   how) for o, ds, how in _DOUBLE for p in ("weight", "bias")]
        rules += [(f"double_blocks.{i}.{o}", [f"transformer_blocks.{i}.{d}"], "same") for o, d in _DOUBLE_NORMS]
    for i in range(single):
        rules += [(f"single_blocks.{i}." + o.format(p=p), [f"single_transformer_blocks.{i}." + d.format(p=p)
                                                          for d in ds], how)
                  for o, ds, how in _SINGLE for p in ("weight", "bias")]
        rules += [(f"single_blocks.{i}.{o}", [f"single_transformer_blocks.{i}.{d}"], "same") for o, d in _SINGLE_NORMS]
    return rules


def _swap(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A Flux transformer state dict in the original layout (prefix stripped) -> diffusers' names."""
    double, single = _count(sd, r"double_blocks\.(\d+)\."), _count(sd, r"single_blocks\.(\d+)\.")
    hidden = sd["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for original, targets, how in _flux_rules(double, single):
        if original not in sd:
            continue
        t = sd[original]
        if how == "same":
            out[targets[0]] = t
        elif how == "swap":
            out[targets[0]] = _swap(t)
        else:  # q, k, v (and the single block's MLP input) stacked along the rows
            sizes = [hidden] * 3 + ([t.shape[0] - 3 * hidden] if how == "linear1" else [])
            out.update(zip(targets, torch.split(t, sizes, dim=0), strict=True))
    return out


def flux_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `flux_to_diffusers` (writing test files in the published layout)."""
    double = _count(sd, r"transformer_blocks\.(\d+)\.")
    single = _count(sd, r"single_transformer_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for original, targets, how in _flux_rules(double, single):
        if targets[0] not in sd:
            continue
        parts = [sd[t] for t in targets]
        out[original] = _swap(parts[0]) if how == "swap" else torch.cat(parts, dim=0)
    return out
