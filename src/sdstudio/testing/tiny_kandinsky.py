"""Tiny Kandinsky 2.2 models (prior + decoder) with the real architectures and random (seeded) weights.

The component configs follow diffusers' own Kandinsky 2.2 fast tests, shrunk further:
- prior (`KandinskyV22PriorPipeline`): PriorTransformer over 32-d CLIP embeddings, a CLIP text encoder and
  a CLIP vision encoder with projections, a CLIPImageProcessor and the UnCLIP scheduler (sample prediction,
  clip range 10, as kandinsky-community/kandinsky-2-2-prior);
- decoder (`KandinskyV22Pipeline`, or `KandinskyV22InpaintPipeline` with a 9-channel UNet): a UNet with
  image-embedding conditioning (encoder_hid_dim_type "image_proj", addition_embed_type "image", 8 output
  channels: mean and learned variance), a MoVQ `VQModel` with 4 pixels per latent cell, and DDPM.
The tokenizer is the byte-level CLIP tokenizer of `sdstudio.testing.tiny` (no download).

`build_tiny_kandinsky(path)` writes a decoder folder with its prior in `path/prior/` (sdstudio's layout,
see `sdstudio.models.load.kandinsky`); `build_tiny_prior` and `build_tiny_decoder` write one folder each.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    PriorTransformer,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from sdstudio.testing.tiny import byte_level_tokenizer, tiny_clip_config

EMBED_DIM = 32     # CLIP image-embedding width: prior output = decoder conditioning
IMAGE_SIZE = 32    # the CLIP vision tower's input (224 in the real model)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# kandinsky-community/kandinsky-2-2-prior's scheduler
PRIOR_SCHEDULER = {"variance_type": "fixed_small_log", "prediction_type": "sample", "num_train_timesteps": 1000,
                   "clip_sample": True, "clip_sample_range": 10.0}
# the decoder's DDPM (linear betas 0.00085 .. 0.012, "leading" spacing with offset 1)
DECODER_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085,
                     "beta_end": 0.012, "clip_sample": False, "steps_offset": 1, "prediction_type": "epsilon",
                     "thresholding": False, "timestep_spacing": "leading"}


def tiny_prior_pipeline(tmp: Path) -> KandinskyV22PriorPipeline:
    tokenizer = byte_level_tokenizer(tmp / "tok")
    text_encoder = CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer), EMBED_DIM, projection_dim=EMBED_DIM))
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM, num_layers=1)
    # clip_std starts at 0, which would map every embedding to clip_mean: make it 1 (as diffusers' tests)
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=EMBED_DIM, image_size=IMAGE_SIZE, projection_dim=EMBED_DIM, intermediate_size=37,
        num_attention_heads=4, num_channels=3, num_hidden_layers=2, patch_size=8))
    processor = CLIPImageProcessor(crop_size=IMAGE_SIZE, size=IMAGE_SIZE, do_center_crop=True, do_normalize=True,
                                   do_resize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    return KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                                     tokenizer=tokenizer, scheduler=UnCLIPScheduler(**PRIOR_SCHEDULER),
                                     image_processor=processor)


def tiny_decoder_unet(in_channels: int = 4) -> UNet2DConditionModel:
    """Kandinsky 2.2's decoder UNet shape: image embeddings projected to 4 context tokens and added to the
    time embedding; out_channels = 2 x latent channels (epsilon and the learned variance)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
        encoder_hid_dim=EMBED_DIM, encoder_hid_dim_type="image_proj", cross_attention_dim=16,
        attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=8,
    )


def tiny_movq() -> VQModel:
    """MoVQ with three levels: 4 pixels per latent cell (8 in the real model)."""
    return VQModel(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D",
                                                           "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"), norm_type="spatial",
        num_vq_embeddings=12, vq_embed_dim=4,
    )


def tiny_decoder_pipeline(inpaint: bool = False) -> KandinskyV22Pipeline | KandinskyV22InpaintPipeline:
    cls = KandinskyV22InpaintPipeline if inpaint else KandinskyV22Pipeline
    return cls(unet=tiny_decoder_unet(9 if inpaint else 4), scheduler=DDPMScheduler(**DECODER_SCHEDULER),
               movq=tiny_movq())


def build_tiny_prior(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny KandinskyV22PriorPipeline folder (about 0.5 MB)."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_prior_pipeline(Path(tmp)).save_pretrained(Path(path), safe_serialization=True)
    return Path(path)


def build_tiny_decoder(path: Path, *, inpaint: bool = False, seed: int = 0) -> Path:
    """Write a tiny decoder folder: KandinskyV22Pipeline, or KandinskyV22InpaintPipeline (9-channel UNet)."""
    torch.manual_seed(seed)
    tiny_decoder_pipeline(inpaint).save_pretrained(Path(path), safe_serialization=True)
    return Path(path)


def build_tiny_kandinsky(path: Path, *, inpaint: bool = False, seed: int = 0) -> Path:
    """A decoder folder with its prior inside (`path/prior/`): the layout sdstudio recommends."""
    build_tiny_decoder(path, inpaint=inpaint, seed=seed)
    build_tiny_prior(Path(path) / "prior", seed=seed + 1)
    return Path(path)
