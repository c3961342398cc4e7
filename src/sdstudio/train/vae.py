"""Training a small AutoencoderKL (SD's VAE architecture and key layout, 4 latent channels).

Loss per image (pixel means):
    |x - x'|_1 + |x - x'|^2                          reconstruction
  + edge_weight * |grad x - grad x'|_1               finite differences: sharp edges
  + rgb_weight * |mean(z)[:3] - avgpool_f(x)|_1      latent channels 0-2 follow the image's colours
  + kl_weight * KL(q(z|x) || N(0, I)) / pixels
The colour term is ours: with flat-colour images the encoder and decoder of a from-scratch
AutoencoderKL co-adapt very slowly (GroupNorm removes the constant colour signal; each alone learns it
in a few hundred steps, the pair not in thousands). Tying three latent channels to the average colour
of their 8x8 patch breaks the deadlock and makes the latent->RGB preview almost exact.
The posterior log-variance starts at -6 (std 0.05) so that early samples are not drowned in noise.
As for SD, the latent scaling factor is 1 / std of posterior samples over the data, stored in the
VAE config, so that scaled latents have unit variance for the diffusion model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from sdstudio.settings import resolve_dtype
from sdstudio.train.data import CaptionedImages, batch_indices, load_batch, open_data
from sdstudio.train.loop import Optimizer, config_json, resume_point, run_steps
from sdstudio.train.state import ProgressFn, save_state, step_generator

log = logging.getLogger(__name__)

# Four resolution levels as in SD (8 pixels per latent cell); channels kept small for CPU training.
VAE_ARCHS = {
    "demo": {"block_out_channels": (16, 32, 64, 64), "norm_num_groups": 8},
    "tiny": {"block_out_channels": (8, 16, 16, 16), "norm_num_groups": 8},
}


@dataclass(frozen=True)
class VaeTrainConfig:
    data: str                 # a caption folder, or "shapes" to stream the procedural dataset
    out: Path                 # the diffusers AutoencoderKL folder to write
    arch: str = "demo"
    base: str | None = None   # fine-tune this VAE folder instead of starting from scratch
    resolution: int = 64
    batch_size: int = 16
    steps: int = 4000
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-4
    edge_weight: float = 1.0
    rgb_weight: float = 1.0
    seed: int = 0
    save_every: int = 500
    save_dtype: str = "float32"
    scale_samples: int = 1024  # images used to measure the latent scaling factor


def new_vae(arch: str, resolution: int) -> AutoencoderKL:
    spec = VAE_ARCHS[arch]
    levels = len(spec["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, sample_size=resolution, **spec)
    with torch.no_grad():  # moments = quant_conv(encoder(x)) = [mean (4), logvar (4)]
        vae.quant_conv.bias[vae.config.latent_channels:] -= 6.0
    return vae


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, cfg: VaeTrainConfig, g: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.sample(generator=g)).sample
    loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
    loss = loss + cfg.kl_weight * posterior.kl().mean() / x[0].numel()
    if cfg.edge_weight:
        loss = loss + cfg.edge_weight * sum((a - b).abs().mean() for a, b in zip(_edges(rec), _edges(x), strict=True))
    if cfg.rgb_weight:
        factor = x.shape[-1] // posterior.mean.shape[-1]
        loss = loss + cfg.rgb_weight * (posterior.mean[:, :3] - F.avg_pool2d(x, factor)).abs().mean()
    return loss


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, data: CaptionedImages, cfg: VaeTrainConfig) -> float:
    """1 / std of posterior samples over `scale_samples` images (SD's 0.18215 was found this way)."""
    zs = []
    for step in range(max(1, cfg.scale_samples // cfg.batch_size)):
        idx = batch_indices(cfg.seed + 1, step, cfg.batch_size, data.size)
        x, _ = load_batch(data, idx, cfg.resolution)
        zs.append(vae.encode(x).latent_dist.sample(generator=step_generator(cfg.seed + 1, step)))
    return float(1.0 / torch.cat(zs).std())


def train_vae(cfg: VaeTrainConfig, progress: ProgressFn | None = None, resume: bool = False) -> Path:
    data = open_data(cfg.data, cfg.seed, cfg.resolution)
    saved = resume_point(cfg.out, cfg, resume)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL.from_pretrained(cfg.base, torch_dtype=torch.float32, local_files_only=True) if cfg.base else \
        new_vae(cfg.arch, cfg.resolution)
    vae.train()
    opt = Optimizer(vae.parameters(), cfg.lr, cfg.warmup, cfg.steps)
    start = opt.resume(saved, vae, cfg.out)

    def step(i: int) -> float:
        x, _ = load_batch(data, batch_indices(cfg.seed, i, cfg.batch_size, data.size), cfg.resolution)
        loss = vae_loss(vae, x, cfg, step_generator(cfg.seed, i))
        return opt.step(loss)

    def save(done: int) -> Path:
        vae.eval()
        export = copy.deepcopy(vae)
        export.register_to_config(scaling_factor=latent_scaling_factor(vae, data, cfg))
        export.to(resolve_dtype(cfg.save_dtype, torch.device("cpu"))).save_pretrained(cfg.out)
        save_state(cfg.out, done, config_json(cfg), opt.state(),
                   lambda folder: vae.save_pretrained(folder))
        vae.train()
        return cfg.out

    run_steps(start, cfg.steps, step, save, cfg.save_every, progress)
    return cfg.out
