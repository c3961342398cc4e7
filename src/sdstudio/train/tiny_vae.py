"""Distilling a VAE into a tiny one (diffusers' AutoencoderTiny, the TAESD architecture): a few hundred
thousand weights that decode a preview, or a fast final image, from the same latents.

The student sees the teacher's scaled latents z = scaling_factor * mode(q(z|x)) (the diffusion model's
latents; TAESD's scaling_factor is 1) and learns, per image (pixel and latent means):
    |D_s(z) - D_t(z)|_1 + |D_s(z) - D_t(z)|^2        its decoder imitates the teacher's decoder
  + latent_weight * |E_s(x) - z|^2                   its encoder imitates the teacher's encoder
Imitating the teacher's decoded image (not x) gives the same picture the full decode would, errors included.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from sdstudio.settings import resolve_dtype
from sdstudio.train.data import batch_indices, load_batch, open_data
from sdstudio.train.loop import Optimizer, config_json, resume_point, run_steps
from sdstudio.train.state import ProgressFn, save_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyVaeTrainConfig:
    teacher: str              # a diffusers AutoencoderKL folder (a model folder's vae/)
    out: Path                 # the AutoencoderTiny folder to write
    data: str = "shapes"      # images to learn on: a caption folder, or the procedural shapes
    channels: int = 32        # every block's width (TAESD's own: 64)
    resolution: int = 64
    batch_size: int = 32
    steps: int = 3000
    lr: float = 2e-3
    warmup: int = 100
    latent_weight: float = 1.0
    seed: int = 0
    save_every: int = 500
    save_dtype: str = "float16"


def new_tiny_vae(channels: int, latent_channels: int, levels: int) -> AutoencoderTiny:
    """A TAESD-shaped autoencoder with `levels` - 1 halvings (the teacher's latent factor), one block each."""
    widths, blocks = (channels,) * levels, (1,) * levels
    return AutoencoderTiny(encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                           num_encoder_blocks=blocks, num_decoder_blocks=blocks, latent_channels=latent_channels)


def save_tiny_vae(vae: AutoencoderTiny, folder: Path) -> None:
    """save_pretrained without the `block_out_channels` AutoencoderTiny registers for pipelines (it sets it again
    on load, and warns when the file has it)."""
    vae.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("block_out_channels", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def tiny_vae_loss(student: AutoencoderTiny, teacher: AutoencoderKL, x: torch.Tensor, latent_weight: float
                  ) -> torch.Tensor:
    with torch.no_grad():
        z = teacher.encode(x).latent_dist.mode() * teacher.config.scaling_factor   # (B, C, h, w) scaled
        target = teacher.decode(z / teacher.config.scaling_factor).sample          # (B, 3, H, W) in [-1, 1]
    decoded = student.decode(z).sample
    loss = (decoded - target).abs().mean() + (decoded - target).pow(2).mean()
    return loss + latent_weight * (student.encode(x).latents - z).pow(2).mean()


def train_tiny_vae(cfg: TinyVaeTrainConfig, progress: ProgressFn | None = None, resume: bool = False) -> Path:
    teacher = AutoencoderKL.from_pretrained(cfg.teacher, torch_dtype=torch.float32, local_files_only=True).eval()
    data = open_data(cfg.data, cfg.seed, cfg.resolution)
    saved = resume_point(cfg.out, cfg, resume)
    torch.manual_seed(cfg.seed)
    student = new_tiny_vae(cfg.channels, teacher.config.latent_channels, len(teacher.config.block_out_channels))
    student.train()
    opt = Optimizer(student.parameters(), cfg.lr, cfg.warmup, cfg.steps)
    start = opt.resume(saved, student, cfg.out)

    def step(i: int) -> float:
        x, _ = load_batch(data, batch_indices(cfg.seed, i, cfg.batch_size, data.size), cfg.resolution)
        loss = tiny_vae_loss(student, teacher, x, cfg.latent_weight)
        return opt.step(loss)

    def save(done: int) -> Path:
        export = copy.deepcopy(student).eval()
        save_tiny_vae(export.to(resolve_dtype(cfg.save_dtype, torch.device("cpu"))), cfg.out)
        save_state(cfg.out, done, config_json(cfg), opt.state(),
                   lambda folder: student.save_pretrained(folder))
        return cfg.out

    run_steps(start, cfg.steps, step, save, cfg.save_every, progress)
    return cfg.out
