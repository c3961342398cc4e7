"""Training or fine-tuning an SD1.x-layout model: UNet and CLIP text encoder, with a frozen VAE.

Objective (DDPM, Ho et al. 2020): x_t = sqrt(a_t) z + sqrt(1 - a_t) eps with SD1.x's scaled-linear
betas, predict eps (or v), MSE weighted by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. 2023).
Captions are replaced by "" with probability caption_dropout, which trains the unconditional branch
classifier-free guidance needs. Latents z = scaling_factor * VAE posterior sample.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdstudio.errors import RequestError
from sdstudio.models.tools.layout import SD15_SCHEDULER, save_sd_folder
from sdstudio.settings import resolve_dtype
from sdstudio.train.data import CaptionedImages, batch_indices, open_data
from sdstudio.train.inpaint import inpaint_condition, random_masks, widen_conv_in
from sdstudio.train.latents import LatentSource
from sdstudio.train.loop import config_json, resume_point, run_steps
from sdstudio.train.state import ProgressFn, save_state, state_dir, step_generator

log = logging.getLogger(__name__)

CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "clip-tokenizer"

UNET_ARCHS = {
    # 8x8 latents: 8 -> 4 -> 2, cross-attention at 4x4 and 2x2, no attention at full latent size.
    "demo": {"block_out_channels": (32, 64, 96), "layers_per_block": 1, "attention_head_dim": 8,
             "norm_num_groups": 8,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")},
    "tiny": {"block_out_channels": (32, 32), "layers_per_block": 1, "attention_head_dim": 8,
             "norm_num_groups": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
}
TEXT_ARCHS = {
    "demo": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4},
    "tiny": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
}


@dataclass(frozen=True)
class SdTrainConfig:
    data: str                    # a caption folder, or "shapes" to stream the procedural dataset
    out: Path                    # the diffusers model folder to write
    vae: str | None = None       # a VAE folder, or a model folder whose vae/ is used (frozen); None: the base's
    base: str | None = None      # fine-tune this model folder instead of training from scratch
    arch: str = "demo"
    resolution: int = 64
    batch_size: int = 64
    steps: int = 20000
    lr: float = 1e-3
    warmup: int = 500
    ema_decay: float = 0.999     # 0 turns EMA off; the exported weights are the EMA ones
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    prediction_type: str = "epsilon"
    seed: int = 0
    save_every: int = 1000
    save_dtype: str = "float32"
    cache_latents: bool = True   # encode a finite dataset once instead of every step
    inpaint: bool = False        # train a 9-channel inpainting UNet (train/inpaint.py); needs a base model


@dataclass
class Parts:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL

    def trainable(self) -> list[torch.nn.Parameter]:
        return [*self.unet.parameters(), *self.text_encoder.parameters()]


def load_vae(path: str) -> AutoencoderKL:
    folder = Path(path)
    sub = "vae" if (folder / "vae" / "config.json").is_file() else None
    vae = AutoencoderKL.from_pretrained(folder, subfolder=sub, torch_dtype=torch.float32, local_files_only=True)
    return vae.eval().requires_grad_(False)


def build_parts(cfg: SdTrainConfig) -> Parts:
    torch.manual_seed(cfg.seed)
    if not (cfg.vae or cfg.base):
        raise RequestError("training a model from scratch needs a VAE: give --vae (a VAE or a model)", "vae")
    vae = load_vae(cfg.vae or cfg.base)
    if cfg.base:
        base = Path(cfg.base)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32,
                                                    local_files_only=True)
        return Parts(CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True),
                     CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32, local_files_only=True),
                     widen_conv_in(unet) if cfg.inpaint else unet, vae)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER, local_files_only=True)
    text = TEXT_ARCHS[cfg.arch]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(sample_size=cfg.resolution // factor, in_channels=vae.config.latent_channels,
                                out_channels=vae.config.latent_channels, cross_attention_dim=text["hidden_size"],
                                **UNET_ARCHS[cfg.arch])
    return Parts(tokenizer, text_encoder, unet, vae)


def noise_scheduler(cfg: SdTrainConfig) -> DDPMScheduler:
    return DDPMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": cfg.prediction_type})


def diffusion_loss(parts: Parts, sched: DDPMScheduler, z: torch.Tensor, captions: list[str], cfg: SdTrainConfig,
                   g: torch.Generator, condition: torch.Tensor | None = None) -> torch.Tensor:
    """condition: (B, 5, h, w) inpainting input (mask, masked-image latents) concatenated after x_t."""
    ids = parts.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    context = parts.text_encoder(ids)[0]                                    # (B, 77, D)
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],), generator=g)
    x_t = sched.add_noise(z, noise, t)
    if condition is not None:
        x_t = torch.cat([x_t, condition], dim=1)  # (B, 9, h, w)
    pred = parts.unet(x_t, t, encoder_hidden_states=context).sample
    target = noise if cfg.prediction_type == "epsilon" else sched.get_velocity(z, noise, t)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma:
        snr = compute_snr(sched, t)
        weight = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if cfg.prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weight
    return per_sample.mean()


def drop_captions(captions: list[str], p: float, seed: int, step: int) -> list[str]:
    rng = random.Random(f"{seed}:captions:{step}")
    return ["" if rng.random() < p else c for c in captions]


def train_sd(cfg: SdTrainConfig, progress: ProgressFn | None = None, resume: bool = False) -> Path:
    data: CaptionedImages = open_data(cfg.data, cfg.seed, cfg.resolution)
    saved = resume_point(cfg.out, cfg, resume)
    parts = build_parts(cfg)
    parts.unet.train()
    parts.text_encoder.train()
    sched = noise_scheduler(cfg)
    opt = torch.optim.AdamW(parts.trainable(), lr=cfg.lr, weight_decay=1e-2)
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps)
    ema = EMAModel(parts.trainable(), decay=cfg.ema_decay, use_ema_warmup=True) if cfg.ema_decay else None
    start = 0
    if saved is not None:
        parts.unet.load_state_dict(load_file(state_dir(cfg.out) / "unet.safetensors"))
        parts.text_encoder.load_state_dict(load_file(state_dir(cfg.out) / "text_encoder.safetensors"))
        opt.load_state_dict(saved["optimizer"])
        lr_sched.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        start = saved["step"]
        log.info("resuming %s at step %d", cfg.out, start)
    latents = LatentSource(parts.vae, data, cfg.resolution, cache=cfg.cache_latents)

    def step(i: int) -> float:
        idx = batch_indices(cfg.seed, i, cfg.batch_size, data.size)
        g = step_generator(cfg.seed, i)
        z, captions = latents.batch(idx, g)
        condition = None
        if cfg.inpaint:
            masks = random_masks(len(idx), cfg.resolution, g)
            condition = inpaint_condition(parts.vae, latents.pixels(idx), masks)
        loss = diffusion_loss(parts, sched, z, drop_captions(captions, cfg.caption_dropout, cfg.seed, i), cfg, g,
                              condition)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.trainable(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(parts.trainable())
        return loss.item()

    def save(done: int) -> Path:
        export_model(cfg, parts, ema)
        state = {"optimizer": opt.state_dict(), "scheduler": lr_sched.state_dict()}
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_state(cfg.out, done, config_json(cfg), state, lambda folder: _save_live(parts, folder))
        return cfg.out

    run_steps(start, cfg.steps, step, save, cfg.save_every, progress)
    return cfg.out


def _save_live(parts: Parts, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(parts.unet.state_dict(), folder / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in parts.text_encoder.state_dict().items()},
              folder / "text_encoder.safetensors")


def export_model(cfg: SdTrainConfig, parts: Parts, ema: EMAModel | None) -> Path:
    """Write the diffusers folder: EMA weights when EMA is on, cast to save_dtype."""
    unet, text_encoder = copy.deepcopy(parts.unet), copy.deepcopy(parts.text_encoder)
    if ema is not None:
        ema.copy_to([*unet.parameters(), *text_encoder.parameters()])
    dtype = resolve_dtype(cfg.save_dtype, torch.device("cpu"))
    vae = copy.deepcopy(parts.vae)
    save_sd_folder(cfg.out, tokenizer=parts.tokenizer, text_encoder=text_encoder.to(dtype), unet=unet.to(dtype),
                   vae=vae.to(dtype), scheduler_config={**SD15_SCHEDULER, "prediction_type": cfg.prediction_type},
                   pipeline="StableDiffusionInpaintPipeline" if cfg.inpaint else "StableDiffusionPipeline")
    (cfg.out / "training.json").write_text(json.dumps(config_json(cfg), indent=2))
    return cfg.out
