"""Tiny Stable Diffusion models with the real architectures and random (seeded) weights.

Used by the tests and benchmarks: every class is the real one (CLIPTextModel, UNet2DConditionModel,
AutoencoderKL, a CLIP BPE tokenizer), only the sizes are small. The tokenizer is byte-level: OpenAI's
CLIP vocabulary without merges (256 byte symbols, the same with "</w>", start and end: 514 tokens).

`build_tiny(family, path)` writes one diffusers folder per family (SD1, SD2, SDXL base/refiner and the
inpaint variants), each loadable by the matching diffusers pipeline's `from_pretrained`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdstudio.models.load.clip_bpe import write_tokenizer_files
from sdstudio.models.tools.layout import SD15_SCHEDULER, save_sd_folder

FAMILIES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-refiner", "sdxl-inpaint")

# SDXL's encoders: diffusers tells CLIP-L (te1) and OpenCLIP-G (te2) apart by width, so they differ here too.
# te2 has 10 layers because diffusers' `infer_diffusers_model_type` looks for `resblocks.9`.
TE1_WIDTH, TE2_WIDTH, TE2_LAYERS, TE2_PROJECTION = 32, 48, 10, 16
TIME_ID_DIM = 8  # addition_time_embed_dim: each SDXL micro-condition -> 8 sinusoidal features

# SDXL's Euler schedule (stabilityai/stable-diffusion-xl-base-1.0): the SD1 betas, "leading" spacing.
SDXL_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
                  "prediction_type": "epsilon"}


def byte_level_tokenizer(folder: Path, pad_token: str | None = None) -> CLIPTokenizer:
    """CLIP's vocabulary without merges: any text tokenizes, ids are a prefix of the real ones.

    `pad_token="!"` gives OpenCLIP's padding (SD2, SDXL's tokenizer_2: id 0 instead of <|endoftext|>)."""
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(write_tokenizer_files(folder, merges=[]), **extra)


def tiny_clip_config(vocab_size: int, dim: int = 32, layers: int = 2, *, hidden_act: str = "quick_gelu",
                     projection_dim: int = 512, mlp_ratio: int = 2) -> CLIPTextConfig:
    """CLIP-L style by default; `hidden_act="gelu"` is OpenCLIP's (SD2's ViT-H, SDXL's ViT-bigG)."""
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=mlp_ratio * dim,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act=hidden_act, projection_dim=projection_dim,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def tiny_text_encoder(vocab_size: int, dim: int = 32) -> CLIPTextModel:
    return CLIPTextModel(tiny_clip_config(vocab_size, dim))


def tiny_unet(context_dim: int = 32, sample_size: int = 8, in_channels: int = 4,
              block_out_channels: tuple[int, int] = (32, 64)) -> UNet2DConditionModel:
    """SD1.x geometry: one resnet per level, 1x1-conv proj_in/proj_out, a plain last level."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=block_out_channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context_dim,
        attention_head_dim=8, norm_num_groups=16,
    )


def tiny_sd2_unet(context_dim: int, in_channels: int = 4) -> UNet2DConditionModel:
    """SD2.x geometry: two resnets per level, linear proj_in/proj_out, heads per level as a list."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, cross_attention_dim=context_dim,
        attention_head_dim=[2, 4, 4], use_linear_projection=True, norm_num_groups=16,
    )


def tiny_sdxl_unet(*, refiner: bool = False, in_channels: int = 4) -> UNet2DConditionModel:
    """SDXL geometry: a plain first level, deeper transformers lower down, pooled text + time ids added.

    add_embedding input = n_ids * TIME_ID_DIM + te2 projection: base 6 ids (h, w, top, left, h_t, w_t),
    refiner 5 (h, w, top, left, aesthetic score). Context = te1 ⊕ te2 (base) or te2 alone (refiner)."""
    n_ids, context = (5, TE2_WIDTH) if refiner else (6, TE1_WIDTH + TE2_WIDTH)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        cross_attention_dim=context, attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_DIM,
        projection_class_embeddings_input_dim=n_ids * TIME_ID_DIM + TE2_PROJECTION,
    )


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    """Four resolution levels, like SD's VAE: 8 pixels per latent cell."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=scaling_factor,
    )


def build_tiny_sd(path: Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD1.x-layout diffusers folder (about 3.7 MB) and return its path."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = byte_level_tokenizer(Path(tmp))
        return save_sd_folder(
            Path(path), tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer)), unet=tiny_unet(),
            vae=tiny_vae(), scheduler_config=dict(SD15_SCHEDULER, prediction_type=prediction_type))


def _sd1_inpaint(tmp: Path) -> Any:
    tokenizer = byte_level_tokenizer(tmp / "tok")
    return StableDiffusionInpaintPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        unet=tiny_unet(in_channels=9, block_out_channels=(16, 32)), scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sd2(tmp: Path, prediction_type: str, in_channels: int = 4) -> Any:
    tokenizer = byte_level_tokenizer(tmp / "tok", pad_token="!")
    encoder = CLIPTextModel(tiny_clip_config(len(tokenizer), 32, hidden_act="gelu"))
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    return cls(
        vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=tiny_sd2_unet(32, in_channels),
        scheduler=PNDMScheduler.from_config(dict(SD15_SCHEDULER, prediction_type=prediction_type)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl_encoders(tmp: Path) -> dict[str, Any]:
    tokenizer, tokenizer_2 = byte_level_tokenizer(tmp / "tok"), byte_level_tokenizer(tmp / "tok2", pad_token="!")
    te2 = CLIPTextModelWithProjection(tiny_clip_config(
        len(tokenizer_2), TE2_WIDTH, TE2_LAYERS, hidden_act="gelu", projection_dim=TE2_PROJECTION,
        mlp_ratio=1))
    return {"tokenizer": tokenizer, "text_encoder": CLIPTextModel(tiny_clip_config(len(tokenizer), TE1_WIDTH)),
            "tokenizer_2": tokenizer_2, "text_encoder_2": te2}


def _sdxl(tmp: Path, *, in_channels: int = 4) -> Any:
    parts = _sdxl_encoders(tmp)
    cls = StableDiffusionXLInpaintPipeline if in_channels == 9 else StableDiffusionXLPipeline
    return cls(vae=tiny_vae(0.13025), unet=tiny_sdxl_unet(in_channels=in_channels),
               scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
               **parts)


def _sdxl_refiner(tmp: Path) -> Any:
    parts = _sdxl_encoders(tmp)
    return StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(0.13025), unet=tiny_sdxl_unet(refiner=True), text_encoder=None, tokenizer=None,
        text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False)


_PIPELINES: dict[str, Callable[[Path], Any]] = {
    "sd1-inpaint": _sd1_inpaint,
    "sd2": lambda tmp: _sd2(tmp, "epsilon"),
    "sd2-v": lambda tmp: _sd2(tmp, "v_prediction"),
    "sd2-inpaint": lambda tmp: _sd2(tmp, "epsilon", in_channels=9),
    "sdxl": _sdxl,
    "sdxl-refiner": _sdxl_refiner,
    "sdxl-inpaint": lambda tmp: _sdxl(tmp, in_channels=9),
}


def build_tiny(family: str, path: Path, *, seed: int = 0) -> Path:
    """Write a tiny diffusers folder of `family` (one of FAMILIES) and return its path.

    About 2 MB each (sd1 is `build_tiny_sd`'s model: 3.7 MB). Seeded: the same seed gives the same bytes."""
    if family == "sd1":
        return build_tiny_sd(path, seed=seed)
    if family not in _PIPELINES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _PIPELINES[family](Path(tmp))
        pipe.save_pretrained(Path(path), safe_serialization=True)
    return Path(path)


if __name__ == "__main__":
    import sys

    built = build_tiny(sys.argv[1], Path(sys.argv[2])) if len(sys.argv) > 2 else build_tiny_sd(Path(sys.argv[1]))
    sys.stdout.write(f"{built}\n")
