"""Distilling a model into an LCM-LoRA (Luo et al. 2023, "LCM-LoRA"): a LoRA (through peft) that turns the model
into a latent consistency model, which samples in 2-8 steps with the LCM scheduler and CFG 1.

Consistency distillation with a guided DDIM teacher, on the 50-step grid LCMScheduler samples from
(t_n = 20 n - 1; k = 20 timesteps apart):
    x_t       = sqrt(a_t) z + sqrt(1 - a_t) eps                       z: a training latent, t = t_n, n random
    teacher   x0_w = x0_c + w (x0_c - x0_u), eps_w likewise           base model (LoRA off), w ~ U(w_min, w_max)
              x_s  = sqrt(a_s) x0_w + sqrt(1 - a_s) eps_w             one DDIM step to s = t - k (>= 0)
    f(x, t)   = c_skip(t) x + c_out(t) x0(x, t)                       the student (LoRA on); LCMScheduler's
              c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2), s_d = 0.5
    loss      = huber(f(x_t, t), stopgrad f(x_s, s)),  huber(a, b) = sqrt((a - b)^2 + c^2) - c
The guidance w is baked in: the LoRA samples at CFG 1 what the base gives at CFG 1 + w.
The output is one .safetensors in kohya's layout (`lora_unet_<module>.lora_down/up.weight`, `.alpha`), which our
LoRA code, A1111 and ComfyUI load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from sdstudio.train.data import batch_indices, open_data
from sdstudio.train.latents import LatentSource
from sdstudio.train.loop import Optimizer, TrainConfigError, config_json, resume_point, run_steps
from sdstudio.train.sd import load_vae
from sdstudio.train.state import ProgressFn, save_state, state_dir, step_generator

log = logging.getLogger(__name__)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
LORA_FILE = "lora.safetensors"  # the live LoRA in the training state


@dataclass(frozen=True)
class LcmTrainConfig:
    base: str                   # the teacher: a diffusers model folder
    out: Path                   # a folder: <out>/<out name>.safetensors, and the resumable state
    data: str = "shapes"        # latents to learn on: a caption folder, or the procedural shapes
    resolution: int = 64
    rank: int = 16
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    w_min: float = 3.0          # guidance baked in: CFG 1 + w, w ~ U(w_min, w_max)
    w_max: float = 9.0
    ddim_steps: int = 50        # the teacher's solver grid (LCMScheduler's original_inference_steps)
    huber_c: float = 0.001
    seed: int = 0
    save_every: int = 250


def boundary(t: Tensor, sigma_data: float = 0.5, scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) at timesteps t, shaped (B, 1, 1, 1), as LCMScheduler computes them."""
    scaled = scaling * t.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def eps_and_x0(unet: UNet2DConditionModel, alphas: Tensor, x: Tensor, t: Tensor, context: Tensor
               ) -> tuple[Tensor, Tensor]:
    """The epsilon prediction and x0 = (x - sqrt(1 - a) eps) / sqrt(a) for each row."""
    eps = unet(x, t, encoder_hidden_states=context).sample
    a = alphas[t].view(-1, 1, 1, 1)
    return eps, (x - (1 - a).sqrt() * eps) / a.sqrt()


def consistency(unet: UNet2DConditionModel, alphas: Tensor, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
    c_skip, c_out = boundary(t)
    return c_skip * x + c_out * eps_and_x0(unet, alphas, x, t, context)[1]


def lcm_loss(unet: UNet2DConditionModel, alphas: Tensor, z: Tensor, context: Tensor, empty: Tensor,
             cfg: LcmTrainConfig, g: torch.Generator) -> Tensor:
    b, k = z.shape[0], len(alphas) // cfg.ddim_steps
    t = (torch.randint(1, cfg.ddim_steps + 1, (b,), generator=g) * k - 1).long()   # t_n = k n - 1
    s = (t - k).clamp(min=0)
    noise = torch.randn(z.shape, generator=g)
    a_t = alphas[t].view(-1, 1, 1, 1)
    x_t = a_t.sqrt() * z + (1 - a_t).sqrt() * noise
    w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=g)).view(-1, 1, 1, 1)
    with torch.no_grad():
        unet.disable_adapters()
        eps, x0 = eps_and_x0(unet, alphas, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, empty]))
        unet.enable_adapters()
        (eps_c, eps_u), (x0_c, x0_u) = eps.chunk(2), x0.chunk(2)
        a_s = alphas[s].view(-1, 1, 1, 1)
        x_s = a_s.sqrt() * (x0_c + w * (x0_c - x0_u)) + (1 - a_s).sqrt() * (eps_c + w * (eps_c - eps_u))
        target = consistency(unet, alphas, x_s, s, context)
    pred = consistency(unet, alphas, x_t, t, context)
    return ((pred - target).pow(2) + cfg.huber_c**2).sqrt().sub(cfg.huber_c).mean()


def kohya_state(unet: UNet2DConditionModel, rank: int) -> dict[str, Tensor]:
    """peft's `<module>.lora_A/B.weight` -> kohya's `lora_unet_<module with _>.lora_down/up.weight` and alpha."""
    out = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, _, part = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.detach().to(torch.float16)
        out[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return out


def lora_file(out: Path) -> Path:
    return out / f"{out.name}.safetensors"


def train_lcm_lora(cfg: LcmTrainConfig, progress: ProgressFn | None = None, resume: bool = False) -> Path:
    base = Path(cfg.base)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", local_files_only=True)
    if (base / "text_encoder_2").is_dir() or scheduler.config.prediction_type != "epsilon":
        raise TrainConfigError(f"{base.name}: the LCM-LoRA trainer distils SD 1.x/2.x epsilon-prediction models; this "
                               "one is SDXL or predicts v/x0 (use the published lcm-lora-sdxl for SDXL)")
    saved = resume_point(cfg.out, cfg, resume)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32,
                                                 local_files_only=True).eval()
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32,
                                                local_files_only=True).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=list(TARGETS),
                                init_lora_weights="gaussian"))
    alphas = scheduler.alphas_cumprod  # (1000,) the teacher's own noise schedule
    data = open_data(cfg.data, cfg.seed, cfg.resolution)
    latents = LatentSource(load_vae(str(base)), data, cfg.resolution, cache=True)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = Optimizer(params, cfg.lr, cfg.warmup, cfg.steps)
    start = 0
    if saved is not None:
        set_peft_model_state_dict(unet, load_file(state_dir(cfg.out) / LORA_FILE))
        opt.opt.load_state_dict(saved["optimizer"])
        opt.sched.load_state_dict(saved["scheduler"])
        start = saved["step"]

    @torch.no_grad()
    def encode(captions: list[str]) -> Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return text_encoder(ids.input_ids)[0]                                  # (B, 77, D)

    empty = encode([""])

    def step(i: int) -> float:
        g = step_generator(cfg.seed, i)
        z, captions = latents.batch(batch_indices(cfg.seed, i, cfg.batch_size, data.size), g)
        context = encode(captions)
        return opt.step(lcm_loss(unet, alphas, z, context, empty.expand(len(captions), -1, -1), cfg, g))

    def save(done: int) -> Path:
        cfg.out.mkdir(parents=True, exist_ok=True)
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
                    "ss_network_alpha": str(cfg.rank), "ss_output_name": cfg.out.name, "ss_steps": str(done),
                    "sdstudio_preset": "lcm"}
        save_file(kohya_state(unet, cfg.rank), lora_file(cfg.out), metadata=metadata)
        save_state(cfg.out, done, config_json(cfg), opt.state(), lambda folder: save_file(
            {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, folder / LORA_FILE))
        return lora_file(cfg.out)

    run_steps(start, cfg.steps, step, save, cfg.save_every, progress)
    return lora_file(cfg.out)
