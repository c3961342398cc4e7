"""Tiny SD3 and Flux models: the real classes (SD3Transformer2DModel, FluxTransformer2DModel, CLIP, T5EncoderModel,
a 16-channel AutoencoderKL, FlowMatchEulerDiscreteScheduler) at small sizes with seeded random weights.

Each is written as the diffusers folder its pipeline saves (`StableDiffusion3Pipeline`, `FluxPipeline`), loadable
by that pipeline's `from_pretrained` and by sdstudio. CLIP tokenizers are byte-level (testing/tiny.py); the T5
tokenizer is the shipped T5-v1.1 vocabulary, so T5's embedding has its real 32,128 rows at width 32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sdstudio.models.load.configs import CONFIGS, load_tokenizer
from sdstudio.models.load.flow_text import t5_tokenizer
from sdstudio.testing.tiny import byte_level_tokenizer, tiny_clip_config

# Widths keep the published head sizes (CLIP and T5: 64, SD3's MMDiT: 64, Flux: 128) and GroupNorm's 32 groups, so
# that a single file's config can be read from its shapes as for the full-size models (models/load/flow_files.py).
CLIP_L, CLIP_G = 64, 128  # SD3 pads CLIP-L + CLIP-G (192) with zeros to T5's width
JOINT = 192  # T5's width (d_model): the transformers' context width, as 4096 is T5-XXL's

# the published schedulers (stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev and -schnell)
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                      "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def tiny_t5() -> T5EncoderModel:
    """T5-v1.1's architecture (gated GELU, relative position buckets) at width JOINT."""
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=JOINT, d_kv=64, d_ff=128, num_layers=2, num_heads=3,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                   relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False))


def tiny_flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """SD3's and Flux's VAE layout: 16 latent channels, 8 pixels per cell, no quant convs."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def _clip(tmp: Path, dim: int, pad: str | None, projection: bool, act: str = "quick_gelu",
          full_vocab: bool = False) -> tuple[Any, Any]:
    """A CLIP text encoder `dim` wide; full_vocab: with the shipped CLIP BPE (49,408 tokens, what single files are
    read with) instead of the byte-level one."""
    if full_vocab:
        tokenizer = load_tokenizer(CONFIGS / "sdxl" / ("tokenizer_2" if pad == "!" else "tokenizer"))
    else:
        tokenizer = byte_level_tokenizer(tmp / f"tok-{dim}", pad_token=pad)
    config = tiny_clip_config(len(tokenizer), dim, hidden_act=act, projection_dim=dim)
    config.num_attention_heads = dim // 64
    return tokenizer, (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_sd3_pipeline(tmp: Path, *, with_t5: bool = True, full_vocab: bool = False) -> StableDiffusion3Pipeline:
    tok_l, te_l = _clip(tmp, CLIP_L, None, True, full_vocab=full_vocab)
    tok_g, te_g = _clip(tmp, CLIP_G, "!", True, "gelu", full_vocab=full_vocab)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=1, caption_projection_dim=64, joint_attention_dim=JOINT,
        pooled_projection_dim=CLIP_L + CLIP_G, pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=tiny_flow_vae(1.5305, 0.0609), text_encoder=te_l, tokenizer=tok_l, text_encoder_2=te_g,
        tokenizer_2=tok_g, text_encoder_3=tiny_t5() if with_t5 else None,
        tokenizer_3=t5_tokenizer() if with_t5 else None)


def tiny_flux_pipeline(tmp: Path, *, schnell: bool = False, full_vocab: bool = False) -> FluxPipeline:
    tok_l, te_l = _clip(tmp, CLIP_L, None, False, full_vocab=full_vocab)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=1, joint_attention_dim=JOINT, pooled_projection_dim=CLIP_L,
        guidance_embeds=not schnell, axes_dims_rope=(16, 56, 56))
    scheduler = FLUX_SCHNELL_SCHEDULER if schnell else FLUX_DEV_SCHEDULER
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=tiny_flow_vae(0.3611, 0.1159), text_encoder=te_l, tokenizer=tok_l, text_encoder_2=tiny_t5(),
        tokenizer_2=t5_tokenizer())


def build_tiny_sd3(path: Path, *, seed: int = 0, with_t5: bool = True, full_vocab: bool = False) -> Path:
    """A tiny SD3-layout diffusers folder (native size 256)."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_sd3_pipeline(Path(tmp), with_t5=with_t5, full_vocab=full_vocab).save_pretrained(path)
    return Path(path)


def build_tiny_flux(path: Path, *, seed: int = 0, schnell: bool = False, full_vocab: bool = False) -> Path:
    """A tiny Flux-dev-layout (schnell: Flux-schnell-layout) diffusers folder."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_flux_pipeline(Path(tmp), schnell=schnell, full_vocab=full_vocab).save_pretrained(path)
    return Path(path)


def build_tiny_flow_controlnet(path: Path, family: str, *, union: bool = False, guidance: bool = True,
                               seed: int = 0) -> Path:
    """A tiny ControlNet for the tiny SD3 ('sd3', InstantX style: zero pooled input, no VAE shift) or Flux ('flux';
    `union`: Shakker-Labs Union style, a control mode per picture) transformers, every weight random (seeded) so
    that its residuals are not the zeros a fresh ControlNet starts from."""
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    g = torch.Generator().manual_seed(seed)
    if family == "flux":
        net = FluxControlNetModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=1, joint_attention_dim=JOINT, pooled_projection_dim=CLIP_L, guidance_embeds=guidance,
            axes_dims_rope=(16, 56, 56), num_mode=10 if union else None)
    else:
        net = SD3ControlNetModel(
            sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64, num_attention_heads=1,
            joint_attention_dim=JOINT, caption_projection_dim=64, pooled_projection_dim=CLIP_L + CLIP_G,
            out_channels=16, pos_embed_max_size=32)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.save_pretrained(path)
    return Path(path)
