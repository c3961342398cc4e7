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
                   scheduler_config: dict[str, Any], pipeline: str = "StableDiffusionPipeline") -> Path:
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
    index = dict(SD_MODEL_INDEX, _class_name=pipeline, _diffusers_version=diffusers.__version__,
                 scheduler=["diffusers", scheduler["_class_name"]])
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


PIPELINE_CLASSES = {
    "sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sd2-v": "StableDiffusionPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline", "sd2-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
}


def save_parts(path: Path, parts: Any, dtype: Any) -> Path:
    """Any family's loaded parts (`loader.Parts`) as a diffusers folder in `dtype`."""
    path.mkdir(parents=True, exist_ok=True)
    names = [("tokenizer_2", "text_encoder_2")] if parts.family == "sdxl-refiner" else \
        [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")][: len(parts.text.encoders)]
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASSES[parts.family], "_diffusers_version": diffusers.__version__,
                             "tokenizer": [None, None], "text_encoder": [None, None], **parts.options}
    for (tok_name, enc_name), tok, enc in zip(names, parts.text.tokenizers, parts.text.encoders, strict=True):
        tok.save_pretrained(path / tok_name)
        enc.to(dtype).save_pretrained(path / enc_name, safe_serialization=True)
        index[tok_name], index[enc_name] = ["transformers", "CLIPTokenizer"], ["transformers", type(enc).__name__]
    for name in ("unet", "vae"):
        getattr(parts, name).to(dtype).save_pretrained(path / name, safe_serialization=True)
        index[name] = ["diffusers", type(getattr(parts, name)).__name__]
    scheduler = {"_class_name": "PNDMScheduler", **parts.scheduler_config}
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
