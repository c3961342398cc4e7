"""Single-file checkpoints (original LDM key layout) loaded offline.

diffusers' `from_single_file` looks up configs on the model hub unless pointed at a local folder, and
it leaves weights missing from the file silently uninitialised. We do what it does at its core, with
neither problem: detect the family from the keys, take the architecture from configs bundled with
sdstudio (or embedded in the file by `sdstudio models convert`, or a folder the user names), convert
the keys with diffusers' own LDM converters, and load every component with strict key checking.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdstudio.errors import ModelError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.load.checkpoint_io import read_state_dict
from sdstudio.models.load.configs import FAMILIES, config_dir
from sdstudio.models.load.families import FAMILY_INFO, detect_family, sidecar_says_v
from sdstudio.models.load.ldm_layout import pipeline_options
from sdstudio.models.load.parts import LoadOptions, Parts, build_module, build_text_encoders, read_json
from sdstudio.models.tools import convert
from sdstudio.models.tools.convert import SingleFileInfo, read_single_file_info
from sdstudio.models.tools.layout import save_parts
from sdstudio.models.tools.merge import compute_recipe, is_recipe_file

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


X0_NAME = re.compile(r"(^|[_\-.])x0([_\-.]|$)", re.IGNORECASE)  # sdxl_lightning_1step_x0, ..._unet_x0


def load_single_file(ref: ModelRef, options: LoadOptions, models_dirs: Sequence[Path] = ()) -> Parts:
    """models_dirs: where a merge recipe's inputs are looked up by name."""
    path = ref.path
    state_dict = compute_recipe(path, models_dirs) if is_recipe_file(path) else read_state_dict(path)
    info = read_single_file_info(path) if path.suffix == ".safetensors" else None
    family = choose_family(path, state_dict, info, options)
    configs = component_configs(family, info, options.config)
    weights = convert.from_ldm(state_dict, family, configs)
    del state_dict
    unet = build_module(lambda: UNet2DConditionModel.from_config(configs["unet"]), weights["unet"], "UNet")
    vae = build_module(lambda: AutoencoderKL.from_config(configs["vae"]), weights["vae"], "VAE")
    text = build_text_encoders(family, configs, weights, options.config)
    scheduler = dict(configs["scheduler"])
    if options.prediction and info is None:  # original-layout files cannot say (SD 2.x; v-pred SD 1.x tunes)
        scheduler["prediction_type"] = options.prediction
    elif X0_NAME.search(path.stem):
        log.info("%s: an x0 (\"sample\") prediction model, as its name says (SDXL-Lightning's 1-step files)", path.name)
        scheduler["prediction_type"] = "sample"
    return Parts(family, text, unet, vae, scheduler, configs.get("options", {}))


def choose_family(path: Path, state_dict: dict, info: SingleFileInfo | None, options: LoadOptions) -> str:
    if options.family:
        return options.family
    if info is not None:
        return info.family
    v = {"v_prediction": True, "epsilon": False}.get(options.prediction or "", sidecar_says_v(path))
    family = detect_family(state_dict, v_prediction=v)
    if family == "sd2-v" and v is None:
        log.info("%s: SD 2.x checkpoint, assuming 768 v-prediction; pass prediction 'epsilon' for 512 base "
                 "models (or put a %s.yaml with parameterization: \"eps\" beside it)", path.name, path.stem)
    log.info("%s: detected %s", path.name, FAMILY_INFO[family].label)
    return family


def component_configs(family: str, info: SingleFileInfo | None, folder: Path | None) -> dict[str, Any]:
    """Config dicts per component (+ "scheduler", "options"): from `folder`, else stored in the file by
    `sdstudio models convert`, else the configs bundled for `family`."""
    if folder is None and info is not None and info.scheduler is not None:
        return info.configs
    if folder is None and family not in FAMILIES:
        raise ModelError(f"sdstudio ships no configs for {FAMILY_INFO[family].label} single files; convert the model "
                         "from a diffusers folder, or load the folder itself")
    root = folder or config_dir(family)
    configs: dict[str, Any] = {name: read_json(root / name / "config.json") for name in COMPONENTS
                               if (root / name / "config.json").is_file()}
    configs["scheduler"] = read_json(root / "scheduler" / "scheduler_config.json")
    configs["options"] = pipeline_options(read_json(root / "model_index.json"))
    return configs


def single_file_to_folder(path: Path, out: Path, prediction: str | None = None, config: Path | None = None,
                          half: bool = False) -> Path:
    """Load a single file offline and save it as a diffusers folder (with tokenizers and scheduler)."""
    parts = load_single_file(ModelRef(path.stem, path), LoadOptions(prediction=prediction, config=config))
    return save_parts(out, parts, torch.float16 if half else torch.float32)
