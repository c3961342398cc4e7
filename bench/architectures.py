"""Random-weight models with real Stable Diffusion architectures, written as diffusers folders for benchmarks.

Speed does not depend on weight values, so these stand in for the real checkpoints (which cannot be
downloaded here). The demo model's CLIP tokenizer (the real 49,408-token vocabulary) is reused.

mid:  SD1.5's UNet at half width (160/320/640/640), a 4-layer CLIP-L-width text encoder, the SD VAE.
sd15: SD1.5 exactly (UNet 859.5 M parameters, CLIP-L 123 M, VAE 83.7 M).
sdxl: SDXL base exactly (UNet 2.57 G parameters, CLIP-L + OpenCLIP bigG with projection, the SDXL VAE).
sd35-medium, flux-dev: the flow families from the bundled configs (assets/configs/sd3.5-medium, flux-dev), every
    component at its published size (MMDiT-X 2.24 G parameters + its 226 M positional table, Flux-dev 11.9 G,
    T5-XXL 4.76 G, CLIP-L, OpenCLIP-G, the 16-channel VAE). Each is built on the meta device to count it, then
    materialised with random weights directly in the target dtype, on `device` (a GPU: 33 GB in bf16 for Flux-dev).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdstudio.settings import PACKAGED_MODELS

TOKENIZER = PACKAGED_MODELS / "demo" / "tokenizer"
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                "num_train_timesteps": 1000, "set_alpha_to_one": False}
NATIVE_SIZE = {"mid": 256, "sd15": 512, "sdxl": 1024, "sd35-medium": 1024, "flux-dev": 1024}
FLOW = {"sd35-medium": "sd3.5-medium", "flux-dev": "flux-dev"}  # bench name -> bundled config folder


def clip(width: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, projection_dim=projection or width)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build(name: str, folder: Path, dtype: torch.dtype = torch.float16, device: str = "cpu") -> Path:
    """Write model `name` to `folder` (weights in `dtype`); returns the folder. Reuses an existing one."""
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    if name in FLOW:
        return _flow(FLOW[name], folder, dtype, device)
    pipe = {"mid": _mid, "sd15": _sd15, "sdxl": _sdxl}[name]()
    pipe.to(dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _sd(unet_widths: tuple[int, ...], text_layers: int):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    unet = UNet2DConditionModel(block_out_channels=unet_widths, layers_per_block=2, cross_attention_dim=768,
                                attention_head_dim=8, sample_size=64)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD_VAE, sample_size=512, scaling_factor=0.18215), text_encoder=clip(768, text_layers, 12),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER), unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _mid():
    return _sd((160, 320, 640, 640), text_layers=4)


def _sd15():
    return _sd((320, 640, 1280, 1280), text_layers=12)


def _sdxl():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    unet = UNet2DConditionModel(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)  # 6 time ids x 256 + the 1280 pooled projection
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=clip(768, 12, 12), text_encoder_2=clip(1280, 32, 20, projection=1280, act="gelu"),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER, pad_token="!"), unet=unet,
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"},
                                         timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True)


def flow_components(config_name: str, meta: bool = True) -> dict:
    """The components of a bundled flow config (transformer, vae, CLIP, T5), on the meta device or materialised
    (random) on the current default device and dtype."""
    import json
    from contextlib import nullcontext

    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from sdstudio.models.load.configs import CONFIGS

    folder = CONFIGS / config_name
    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    with init_empty_weights() if meta else nullcontext():
        for part, entry in index.items():
            if part.startswith(("_", "tokenizer", "scheduler")):
                continue
            library, cls_name = entry
            if library == "diffusers":
                cls = getattr(diffusers, cls_name)
                parts[part] = cls.from_config(cls.load_config(folder / part))
            else:
                cls = getattr(transformers, cls_name)
                parts[part] = cls(cls.config_class.from_pretrained(folder / part))
    return parts


def count(module: torch.nn.Module) -> int:
    """Parameters and persistent tables (SD3's positional embedding), as the releases count them. T5's input table
    is its shared one (tied when materialised, two entries on the meta device): counted once."""
    params = dict(module.named_parameters())
    if "shared.weight" in params:
        params.pop("encoder.embed_tokens.weight", None)
    return sum(p.numel() for p in params.values()) + sum(b.numel() for b in module.buffers())


def _flow(config_name: str, folder: Path, dtype: torch.dtype, device: str) -> Path:
    import shutil

    from sdstudio.models.load.configs import CONFIGS

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            parts = flow_components(config_name, meta=False)
    finally:
        torch.set_default_dtype(previous)
    shutil.copytree(CONFIGS / config_name, folder)  # model_index, scheduler, tokenizer configs
    for part, module in parts.items():
        module.save_pretrained(folder / part, safe_serialization=True)
    return folder


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or list(FLOW):
        sizes = {part: count(m) for part, m in flow_components(FLOW[name]).items()}
        print(name, ", ".join(f"{part} {n / 1e9:.3f} G" for part, n in sizes.items()))
