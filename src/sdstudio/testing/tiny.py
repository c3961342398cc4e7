"""Tiny Stable Diffusion models with the real SD1.x architecture and random (seeded) weights.

Used by the tests and benchmarks: every class is the real one (CLIPTextModel, UNet2DConditionModel,
AutoencoderKL, a CLIP BPE tokenizer), only the sizes are small. The tokenizer is byte-level: OpenAI's
CLIP vocabulary without merges (256 byte symbols, the same with "</w>", start and end: 514 tokens).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdstudio.models.clip_bpe import write_tokenizer_files
from sdstudio.models.layout import SD15_SCHEDULER, save_sd_folder


def byte_level_tokenizer(folder: Path) -> CLIPTokenizer:
    """CLIP's vocabulary without merges: any text tokenizes, ids are a prefix of the real ones."""
    return CLIPTokenizer.from_pretrained(write_tokenizer_files(folder, merges=[]))


def tiny_text_encoder(vocab_size: int, dim: int = 32) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(config)


def tiny_unet(context_dim: int = 32, sample_size: int = 8, in_channels: int = 4) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context_dim,
        attention_head_dim=8, norm_num_groups=16,
    )


def tiny_vae() -> AutoencoderKL:
    """Four resolution levels, like SD's VAE: 8 pixels per latent cell."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.18215,
    )


def build_tiny_sd(path: Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD1.x-layout diffusers folder (about 1.5 MB) and return its path."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = byte_level_tokenizer(Path(tmp))
        return save_sd_folder(
            Path(path), tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer)), unet=tiny_unet(),
            vae=tiny_vae(), scheduler_config=dict(SD15_SCHEDULER, prediction_type=prediction_type))


if __name__ == "__main__":
    import sys

    print(build_tiny_sd(Path(sys.argv[1])))
