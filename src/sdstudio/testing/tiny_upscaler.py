"""A tiny SD x4 upscaler with the real architecture and random (seeded) weights, for tests.

Shaped as stabilityai/stable-diffusion-x4-upscaler, only small: a UNet taking 7 channels (4 latent + 3 of the
noised low-resolution image) with the noise level as a class label (num_class_embeds 1000), a first level
without attention and cross-attention-only levels after it (only_cross_attention), linear projections; a
3-level VAE (4 pixels per latent cell, scaling factor 0.08333); an OpenCLIP-style text encoder (gelu) with
the bundled SD2 tokenizer; DDPM for noising the low-resolution image and v-prediction DDIM for sampling.
`build_tiny_x4(path)` writes a diffusers folder that StableDiffusionUpscalePipeline.from_pretrained loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel

from sdstudio.models.load.configs import config_dir, load_tokenizer
from sdstudio.testing.tiny import tiny_clip_config

# The real model's schedulers (scheduler/ and low_res_scheduler/ of stable-diffusion-x4-upscaler).
X4_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                "steps_offset": 1}
X4_LOW_RES_SCHEDULER = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear",
                        "clip_sample": False, "num_train_timesteps": 1000, "variance_type": "fixed_small"}
TEXT_WIDTH = 32


def tiny_x4_unet() -> UNet2DConditionModel:
    """(B, 7, h, w) -> (B, 4, h, w); class_labels (B,) = the noise level, 0..999."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False), cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
        use_linear_projection=True, num_class_embeds=1000, norm_num_groups=8,
    )


def tiny_x4_vae() -> AutoencoderKL:
    """Three resolution levels: 4 pixels per latent cell, as the x4 upscaler's VAE."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64, scaling_factor=0.08333,
    )


def tiny_x4_pipeline(seed: int = 0) -> StableDiffusionUpscalePipeline:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(config_dir("sd2") / "tokenizer")  # the bundled SD2 tokenizer (pad "!")
    encoder = CLIPTextModel(tiny_clip_config(len(tokenizer), TEXT_WIDTH, hidden_act="gelu"))
    return StableDiffusionUpscalePipeline(
        vae=tiny_x4_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=tiny_x4_unet(),
        low_res_scheduler=DDPMScheduler.from_config(X4_LOW_RES_SCHEDULER),
        scheduler=DDIMScheduler.from_config(X4_SCHEDULER), max_noise_level=350)


def build_tiny_x4(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny x4 upscaler diffusers folder (about 7 MB, mostly the 49408-token embedding)."""
    tiny_x4_pipeline(seed).save_pretrained(Path(path), safe_serialization=True)
    return Path(path)
