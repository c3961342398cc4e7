"""Training a ControlNet (Zhang et al. 2023) for a trained SD1.x-layout model.

The ControlNet starts as a copy of the base UNet's encoder and middle block (ControlNetModel.from_unet),
with zero-initialised output convolutions, so at step 0 it adds nothing. The base model (UNet, text
encoder, VAE) stays frozen; the loss is the base objective with the ControlNet's residuals added to the
UNet: || eps - UNet(x_t, t, c, residuals = ControlNet(x_t, t, c, control)) ||^2, Min-SNR weighted.
Half the captions are dropped (as in the paper). With `layout_from_control` (the default) the shapes
captions also lose their position and size phrases ("at the top right", "small"): what the edge map
shows is then the only source of the layout, so the ControlNet cannot leave it to the text.
The control image is the canny edge map of the training image (engine/sd/preprocess.py), in [0, 1].
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from sdstudio.engine.sd.preprocess import canny_edges
from sdstudio.settings import resolve_dtype
from sdstudio.train.data import batch_indices, open_data
from sdstudio.train.latents import LatentSource
from sdstudio.train.loop import config_json, resume_point, run_steps
from sdstudio.train.sd import drop_captions, load_vae
from sdstudio.train.shapes import POSITIONS
from sdstudio.train.state import ProgressFn, save_state, state_dir, step_generator

log = logging.getLogger(__name__)

CONTROLS = ("canny",)


@dataclass(frozen=True)
class ControlNetTrainConfig:
    data: str                   # a caption folder, or "shapes"
    out: Path                   # the ControlNet folder to write (diffusers layout)
    base: str                   # the model folder it controls (frozen)
    control: str = "canny"
    resolution: int = 64
    batch_size: int = 64
    steps: int = 3000
    lr: float = 3e-4
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.5
    snr_gamma: float = 5.0
    embedding_channels: tuple[int, ...] = (16, 16, 32, 32)  # control-image encoder; len - 1 = log2(VAE factor)
    seed: int = 0
    save_every: int = 500
    save_dtype: str = "float32"
    cache_latents: bool = True
    layout_from_control: bool = True  # drop position and size phrases from the captions


_PHRASES = sorted(POSITIONS.values(), key=len, reverse=True)  # "at the top right" before "at the top"
LAYOUT = re.compile("|".join([r"\b(small|large) ", *(" " + re.escape(p) for p in _PHRASES)]))


def strip_layout(caption: str) -> str:
    """"a small red circle at the top right on a blue background" -> "a red circle on a blue background"."""
    return LAYOUT.sub("", caption)


def control_images(pixels: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, H, W) canny edge maps in [0, 1], white edges on black."""
    return canny_edges((pixels + 1) * 127.5).expand(-1, 3, -1, -1)


def train_controlnet(cfg: ControlNetTrainConfig, progress: ProgressFn | None = None, resume: bool = False) -> Path:
    data = open_data(cfg.data, cfg.seed, cfg.resolution)
    saved = resume_point(cfg.out, cfg, resume)
    torch.manual_seed(cfg.seed)
    base = Path(cfg.base)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32,
                                                local_files_only=True)
    unet.eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32,
                                                 local_files_only=True).eval()
    vae = load_vae(str(base))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cfg.embedding_channels)
    controlnet.train()
    # the base's noise schedule and target
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler", local_files_only=True)
    params = list(controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True) if cfg.ema_decay else None
    start = 0
    if saved is not None:
        controlnet.load_state_dict(load_file(state_dir(cfg.out) / "controlnet.safetensors"))
        opt.load_state_dict(saved["optimizer"])
        lr_sched.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        start = saved["step"]
        log.info("resuming %s at step %d", cfg.out, start)
    latents = LatentSource(vae, data, cfg.resolution, cache=cfg.cache_latents)

    def step(i: int) -> float:
        idx = batch_indices(cfg.seed, i, cfg.batch_size, data.size)
        g = step_generator(cfg.seed, i)
        z, captions = latents.batch(idx, g)
        control = control_images(latents.pixels(idx))
        if cfg.layout_from_control:
            captions = [strip_layout(c) for c in captions]
        ids = tokenizer(drop_captions(captions, cfg.caption_dropout, cfg.seed, i), padding="max_length",
                        max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            context = text_encoder(ids)[0]                                    # (B, 77, D)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],), generator=g)
        x_t = sched.add_noise(z, noise, t)
        down, mid = controlnet(x_t, t, encoder_hidden_states=context, controlnet_cond=control, return_dict=False)
        pred = unet(x_t, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        v = sched.config.prediction_type == "v_prediction"
        target = sched.get_velocity(z, noise, t) if v else noise
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma:
            snr = compute_snr(sched, t)
            per_sample = per_sample * torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if v else snr)
        loss = per_sample.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        return loss.item()

    def save(done: int) -> Path:
        export = copy.deepcopy(controlnet)
        if ema is not None:
            ema.copy_to(export.parameters())
        export.to(resolve_dtype(cfg.save_dtype, torch.device("cpu"))).save_pretrained(cfg.out)
        (cfg.out / "training.json").write_text(json.dumps(config_json(cfg), indent=2))
        state = {"optimizer": opt.state_dict(), "scheduler": lr_sched.state_dict()}
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_state(cfg.out, done, config_json(cfg), state,
                   lambda folder: save_file(controlnet.state_dict(), folder / "controlnet.safetensors"))
        return cfg.out

    run_steps(start, cfg.steps, step, save, cfg.save_every, progress)
    return cfg.out
