"""The bundled configs-only diffusers folders build the real architectures (on the meta device, no weights)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import diffusers
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.errors import ModelError
from sdstudio.models.load.configs import FAMILIES, config_dir, load_tokenizer

# Published parameter counts of the real models, each checked against a public source:
# - SD1.5 UNet 859,520,964: diffusers' `ModelMixin.num_parameters` docstring (stable-diffusion-v1-5 unet);
#   SD VAE 83,653,863 and CLIP ViT-L/14 text 123,060,480: counted on the SD1.5 repo components.
# - SD1.5 inpainting UNet 859,535,364 (conv_in 9 channels: +5 x 320 x 3 x 3): counted on sd-v1-5-inpainting.ckpt.
# - SD2.x UNet 865,910,724 and OpenCLIP-H text (23 layers) 340,387,840: buddy-mlir's SD2 example buffers.
# - SDXL base UNet 2,567,463,684: printed by diffusers' SDXL DreamBooth training; OpenCLIP-bigG text with
#   projection 694,659,840: diffusers' memory table (SD3 text_encoder_2 is the same bigG tower).
# - SDXL refiner UNet 2,259,526,660 and SDXL inpainting 0.1 UNet 2,567,478,084: counted on the hub configs.
SD_VAE, CLIP_L, OPENCLIP_H, OPENCLIP_BIGG = 83_653_863, 123_060_480, 340_387_840, 694_659_840
PARAMS = {
    "sd1": {"unet": 859_520_964, "vae": SD_VAE, "text_encoder": CLIP_L},
    "sd1-inpaint": {"unet": 859_535_364, "vae": SD_VAE, "text_encoder": CLIP_L},
    "sd2": {"unet": 865_910_724, "vae": SD_VAE, "text_encoder": OPENCLIP_H},
    "sd2-v": {"unet": 865_910_724, "vae": SD_VAE, "text_encoder": OPENCLIP_H},
    "sdxl": {"unet": 2_567_463_684, "vae": SD_VAE, "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG},
    "sdxl-refiner": {"unet": 2_259_526_660, "vae": SD_VAE, "text_encoder_2": OPENCLIP_BIGG},
    "sdxl-inpaint": {"unet": 2_567_478_084, "vae": SD_VAE, "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG},
}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd1-inpaint": "StableDiffusionInpaintPipeline",
             "sd2": "StableDiffusionPipeline", "sd2-v": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
             "sdxl-inpaint": "StableDiffusionXLInpaintPipeline"}
PREDICTION = {"sd2-v": "v_prediction"}
TEXT_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
ASTRONAUT = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]  # "a photograph of an astronaut riding a horse"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_families_and_unknown_family():
    assert FAMILIES == ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "sdxl-inpaint")
    assert all(config_dir(f).is_dir() for f in FAMILIES)
    with pytest.raises(ModelError, match="sd1, sd1-inpaint, sd2"):
        config_dir("sd3")


@pytest.mark.parametrize("family", FAMILIES)
def test_components_have_the_real_parameter_counts(family):
    folder, expected = config_dir(family), PARAMS[family]
    with init_empty_weights():  # meta tensors: shapes only, no memory
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    counts = {"unet": count(unet), "vae": count(vae)}
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name).is_dir():
            config = AutoConfig.from_pretrained(folder / name, local_files_only=True)
            with torch.device("meta"):
                counts[name] = count(TEXT_CLASSES[config.architectures[0]](config))
    assert counts == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_model_index_matches_the_folders(family):
    folder = config_dir(family)
    index = read(folder / "model_index.json")
    assert index["_class_name"] == PIPELINES[family]
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
    assert {p.name for p in folder.iterdir() if p.is_dir()} == set(components)
    for name, (library, cls) in components.items():
        assert hasattr(importlib.import_module(library), cls), (name, library, cls)
    for name in ("text_encoder", "text_encoder_2"):
        if name in components:
            assert read(folder / name / "config.json")["architectures"] == [components[name][1]]
    if family.startswith("sdxl"):
        assert index["force_zeros_for_empty_prompt"] is (family != "sdxl-refiner")
        assert index.get("requires_aesthetics_score", False) is (family == "sdxl-refiner")
    assert not [p for p in folder.rglob("*") if p.suffix in {".safetensors", ".bin", ".ckpt", ".pt"}]


@pytest.mark.parametrize("family", FAMILIES)
def test_scheduler_and_vae_settings(family):
    folder = config_dir(family)
    config = read(folder / "scheduler" / "scheduler_config.json")
    cls = getattr(diffusers, config["_class_name"])
    _, unused, _ = cls.extract_init_dict(config)
    assert not {k for k in unused if not k.startswith("_")}, f"{family}: keys {cls.__name__} ignores: {unused}"
    assert config["prediction_type"] == PREDICTION.get(family, "epsilon")
    assert (config["beta_start"], config["beta_end"], config["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    vae = read(folder / "vae" / "config.json")
    xl = family.startswith("sdxl")
    assert vae["scaling_factor"] == (0.13025 if xl else 0.18215)
    assert vae.get("force_upcast", True) is True  # the stock VAEs overflow in fp16 (diffusers' default is True)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizers_load_offline_with_their_own_pad_token(family):
    folder = config_dir(family)
    for name in ("tokenizer", "tokenizer_2"):
        if not (folder / name).is_dir():
            continue
        assert sorted(p.name for p in (folder / name).iterdir()) == ["special_tokens_map.json",
                                                                        "tokenizer_config.json"]
        tok = load_tokenizer(folder / name)
        # OpenAI CLIP pads with <|endoftext|>; the OpenCLIP tokenizers (SD2, SDXL's second) pad with "!".
        pad = 0 if name == "tokenizer_2" or family.startswith("sd2") else 49407
        assert (len(tok), tok.model_max_length, tok.pad_token_id) == (49408, 77, pad)
        ids = tok("a photograph of an astronaut riding a horse", padding="max_length", max_length=77).input_ids
        assert ids == ASTRONAUT + [pad] * (77 - len(ASTRONAUT))


def test_load_tokenizer_keeps_a_folders_own_vocabulary(tmp_path):
    load_tokenizer(config_dir("sd2") / "tokenizer").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (len(tok), tok.pad_token_id) == (49408, 0)
    with pytest.raises(ModelError, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_folders_are_what_the_build_script_writes():
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_model_configs.py"
    spec = importlib.util.spec_from_file_location("build_model_configs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for family, parts in module.families().items():
        folder, expected = config_dir(family), {}
        for name, value in parts.items():
            if name.startswith("tokenizer"):
                expected[f"{name}/tokenizer_config.json"], expected[f"{name}/special_tokens_map.json"] = value
            else:
                file = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}
                expected[file.get(name, f"{name}/config.json")] = value
        shipped = {p.relative_to(folder).as_posix(): read(p) for p in folder.rglob("*.json")}
        assert shipped == expected, f"{family}: run scripts/build_model_configs.py"
