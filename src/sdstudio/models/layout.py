"""Writing a model in the diffusers folder layout (model_index.json + one folder per component)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers

# SD1.x's scheduler config (runwayml/stable-diffusion-v1-5): scaled-linear betas 0.00085..0.012.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
    "prediction_type": "epsilon",
}

SD_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_sd_folder(path: Path, *, tokenizer: Any, text_encoder: Any, unet: Any, vae: Any,
                   scheduler_config: dict[str, Any]) -> Path:
    """Save SD1.x/SD2.x components as a diffusers folder that `from_pretrained` and we both load."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path / "tokenizer")
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    (path / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": scheduler_config.get("_class_name", "PNDMScheduler"),
                 "_diffusers_version": diffusers.__version__, **scheduler_config}
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = dict(SD_MODEL_INDEX, _diffusers_version=diffusers.__version__,
                 scheduler=["diffusers", scheduler["_class_name"]])
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
