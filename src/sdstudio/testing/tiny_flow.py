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

from sdstudio.models.load.flow import t5_tokenizer
from sdstudio.testing.tiny import byte_level_tokenizer, tiny_clip_config

CLIP_L, CLIP_G, PROJECTION = 32, 48, 32  # CLIP widths; SD3 pads CLIP-L + CLIP-G (80) with zeros to T5's width
JOINT = 96  # T5's width (d_model): the transformers' context width, as 4096 is T5-XXL's

# the published schedulers (stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev and -schnell)
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                      "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def tiny_t5() -> T5EncoderModel:
    """T5-v1.1's architecture (gated GELU, relative position buckets) at width JOINT."""
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=JOINT, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                   relative_attention_max_distance=32, is_encoder_decoder=False, use_cache=False))


def tiny_flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """SD3's and Flux's VAE layout: 16 latent channels, 8 pixels per cell, no quant convs."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def _clip(tmp: Path, dim: int, pad: str | None, projection: bool, act: str = "quick_gelu") -> tuple[Any, Any]:
    tokenizer = byte_level_tokenizer(tmp / f"tok-{dim}", pad_token=pad)
    config = tiny_clip_config(len(tokenizer), dim, hidden_act=act, projection_dim=PROJECTION)
    return tokenizer, (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_sd3_pipeline(tmp: Path, *, with_t5: bool = True) -> StableDiffusion3Pipeline:
    tok_l, te_l = _clip(tmp, CLIP_L, None, True)
    tok_g, te_g = _clip(tmp, CLIP_G, "!", True, "gelu")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=JOINT,
        pooled_projection_dim=2 * PROJECTION, pos_embed_max_size=32, qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=tiny_flow_vae(1.5305, 0.0609), text_encoder=te_l, tokenizer=tok_l, text_encoder_2=te_g,
        tokenizer_2=tok_g, text_encoder_3=tiny_t5() if with_t5 else None,
        tokenizer_3=t5_tokenizer() if with_t5 else None)


def tiny_flux_pipeline(tmp: Path, *, schnell: bool = False) -> FluxPipeline:
    tok_l, te_l = _clip(tmp, CLIP_L, None, False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=JOINT, pooled_projection_dim=CLIP_L,
        guidance_embeds=not schnell, axes_dims_rope=(4, 6, 6))
    scheduler = FLUX_SCHNELL_SCHEDULER if schnell else FLUX_DEV_SCHEDULER
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=tiny_flow_vae(0.3611, 0.1159), text_encoder=te_l, tokenizer=tok_l, text_encoder_2=tiny_t5(),
        tokenizer_2=t5_tokenizer())


def build_tiny_sd3(path: Path, *, seed: int = 0, with_t5: bool = True) -> Path:
    """A tiny SD3-layout diffusers folder (native size 256)."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_sd3_pipeline(Path(tmp), with_t5=with_t5).save_pretrained(path)
    return Path(path)


def build_tiny_flux(path: Path, *, seed: int = 0, schnell: bool = False) -> Path:
    """A tiny Flux-dev-layout (schnell: Flux-schnell-layout) diffusers folder."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_flux_pipeline(Path(tmp), schnell=schnell).save_pretrained(path)
    return Path(path)
