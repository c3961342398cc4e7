"""Diffusers components <-> one original-layout (CompVis LDM / Stability SGM) state dict, as civitai ships them.

`to_ldm` is ours (`ldm_keys`: diffusers has no reverse converter); `from_ldm` runs diffusers' own
`convert_ldm_*` / `convert_open_clip_checkpoint` and checks the result against the key set the config's
model expects: a weight missing from the file, or one in the file that no model weight comes from, is a
`ModelError` naming it, never a silent drop. Round trip: from_ldm(to_ldm(x)) == x bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.errors import ModelError
from sdstudio.models.load.ldm_layout import (
    LDM_LAYOUTS,
    Part,
    has_component,
    ldm_layout,
    pipeline_options,
    read_family_from_folder,
)
from sdstudio.models.tools.ldm_keys import clip_to_ldm, openclip_to_ldm, sd2_openclip_extras, unet_to_ldm, vae_to_ldm

__all__ = ["CONFIGS_KEY", "FAMILY_KEY", "LDM_LAYOUTS", "SingleFileInfo", "from_ldm", "meta_model",
           "read_component_weights", "read_family_from_folder", "read_single_file_info", "to_ldm", "write_single_file"]

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
FAMILY_KEY, CONFIGS_KEY = "sdstudio.family", "sdstudio.configs"  # safetensors __metadata__ (str -> str)
_IGNORED = re.compile(r".*\.(position_ids|logit_scale)")  # buffers / CLIP's contrastive temperature: no weights


def _part_to_ldm(part: Part, sd: Mapping[str, Tensor]) -> StateDict:
    """One component -> absolute LDM names. SD2's text encoder gains the layer diffusers drops (identity)."""
    if part.kind == "unet":
        rel = unet_to_ldm(sd)
    elif part.kind == "vae":
        rel = vae_to_ldm(sd)
    elif part.kind == "clip":
        rel = clip_to_ldm(sd)
    else:
        rel = openclip_to_ldm(sd)
        if part.kind == "openclip-sd2":
            rel |= sd2_openclip_extras(rel)
    return {part.root + k: v for k, v in rel.items()}


def to_ldm(components: Mapping[str, Mapping[str, Tensor]], family: str) -> StateDict:
    """{"unet": unet.state_dict(), "vae": ..., "text_encoder": ..., "text_encoder_2": ...} -> one LDM state dict.

    Components may be left out (a refiner has no `text_encoder`; a UNet-only file has only `unet`)."""
    layout = ldm_layout(family)
    unknown = sorted(set(components) - set(layout))
    if unknown:
        raise ModelError(f"{family} has no component(s) {unknown}; expected some of {sorted(layout)}")
    out: StateDict = {}
    for name, sd in components.items():
        out |= _part_to_ldm(layout[name], sd)
    return out


def meta_model(part: Part, config: Mapping[str, Any]) -> torch.nn.Module:
    """The model `config` describes, without memory (meta tensors): its state-dict keys and shapes."""
    with torch.device("meta"):
        if part.kind == "unet":
            return UNet2DConditionModel.from_config(dict(config))
        if part.kind == "vae":
            return AutoencoderKL.from_config(dict(config))
        default = "CLIPTextModelWithProjection" if part.kind == "openclip" else "CLIPTextModel"
        arch = (config.get("architectures") or [default])[0]
        cls = CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel
        return cls(CLIPTextConfig.from_dict(dict(config)))


def _names(keys: Iterable[str], n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _problems(missing: set[str], unexpected: set[str], shapes: Iterable[str] = ()) -> str:
    """'' when all is well, else e.g. '2 missing: a, b; 1 unexpected: c'."""
    shapes = list(shapes)
    return "; ".join(([f"{len(missing)} missing: {_names(missing)}"] if missing else [])
                     + ([f"{len(unexpected)} unexpected: {_names(unexpected)}"] if unexpected else [])
                     + ([f"other shapes (file vs config): {_names(shapes, 4)}"] if shapes else []))


def _check_ldm_keys(name: str, family: str, part: Part, present: StateDict, expected: StateDict,
                    optional: set[str]) -> None:
    if not present and expected:
        raise ModelError(f"the file has no {name} weights (no keys under {part.root!r}); is it a {family} checkpoint?")
    problems = _problems(set(expected) - set(present) - optional,
                         {k for k in set(present) - set(expected) if not _IGNORED.fullmatch(k)})
    if problems:
        raise ModelError(f"{family} {name} weights do not match its config: {problems}")


def _check_converted(name: str, converted: StateDict, model_sd: Mapping[str, Tensor]) -> None:
    """After diffusers' converter: exactly the model's keys, each with the model's shape."""
    have, want = set(converted), set(model_sd)
    problems = _problems(want - have, have - want, _shape_diffs(converted, model_sd))
    if problems:
        raise ModelError(f"{name} weights do not match its config after conversion: {problems}")


def _shape_diffs(have: Mapping[str, Tensor], want: Mapping[str, Tensor]) -> list[str]:
    return [f"{k} {tuple(v.shape)} vs {tuple(want[k].shape)}" for k, v in have.items()
            if k in want and v.shape != want[k].shape]


def _diffusers_convert(part: Part, sd: StateDict, config: Mapping[str, Any], model: torch.nn.Module) -> StateDict:
    """diffusers' own LDM -> diffusers converters, `text_model.` kept or stripped as the class expects."""
    if part.kind == "unet":
        return convert_ldm_unet_checkpoint(sd, dict(config))
    if part.kind == "vae":
        return convert_ldm_vae_checkpoint(sd, dict(config))
    if part.kind == "clip":
        out = convert_ldm_clip_checkpoint(sd, remove_prefix=part.root + "transformer.")
    else:  # the width only matters when the file has no text_projection (SD2): it splits in_proj into q, k, v
        width = SimpleNamespace(config=SimpleNamespace(hidden_size=model.config.hidden_size))
        out = convert_open_clip_checkpoint(width, sd, prefix=part.root + "model.")
    wrapped = any(k.startswith("text_model.") for k in model.state_dict())
    flat = {k.removeprefix("text_model."): v for k, v in out.items() if not k.endswith("position_ids")}
    return {("text_model." + k if wrapped and k != "text_projection.weight" else k): v for k, v in flat.items()}


def _component_from_ldm(name: str, family: str, part: Part, state_dict: Mapping[str, Tensor],
                        config: Mapping[str, Any]) -> StateDict:
    model = meta_model(part, config)
    model_sd = model.state_dict()
    expected = _part_to_ldm(part, model_sd)  # the LDM names (meta tensors) this config's weights have
    optional: set[str] = set()
    if part.kind == "openclip-sd2":  # the identity layer/projection `to_ldm` adds: dropped, as diffusers does
        optional = set(expected) - {part.root + k for k in openclip_to_ldm(model_sd)}
    present = {k: v for k, v in state_dict.items() if k.startswith(part.root)}
    _check_ldm_keys(name, family, part, present, expected, optional)
    kept = {k: v for k, v in present.items() if k not in optional and not _IGNORED.fullmatch(k)}
    try:
        converted = _diffusers_convert(part, kept, config, model)
    except (KeyError, IndexError, ValueError) as e:
        raise ModelError(f"{family} {name}: the weights could not be converted ({type(e).__name__}: {e})") from e
    _check_converted(name, converted, model_sd)
    return converted


def from_ldm(state_dict: Mapping[str, Tensor], family: str,
             configs: Mapping[str, Mapping[str, Any]]) -> dict[str, StateDict]:
    """One LDM state dict -> {component: diffusers state dict} for each component in `configs`
    (component name -> its diffusers config dict, e.g. `dict(unet.config)` or a config.json; entries that
    are not weight components of `family`, such as "scheduler", are ignored).

    Keys outside every component (EMA copies `model_ema.*`, noise-schedule buffers such as `alphas_cumprod`)
    are not weights of the model and are skipped (logged). A component the file has but `configs` lacks
    is an error, so nothing is dropped unnoticed."""
    layout = ldm_layout(family)
    configs = {k: v for k, v in configs.items() if k in layout}  # "scheduler", "options", ...: no weights
    unasked = [n for n, p in layout.items() if n not in configs and any(k.startswith(p.root) for k in state_dict)]
    if unasked:
        raise ModelError(f"the file has {', '.join(unasked)} weights but no config was given for them")
    roots = tuple(p.root for p in layout.values())
    skipped = [k for k in state_dict if not k.startswith(roots)]
    if skipped:
        log.info("skipped %d keys outside the model components: %s", len(skipped), _names(skipped, 4))
    return {name: _component_from_ldm(name, family, layout[name], state_dict, cfg) for name, cfg in configs.items()}


# --- files -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SingleFileInfo:
    """What `write_single_file` stores in a file's metadata: enough to rebuild the models offline."""

    family: str
    configs: dict[str, dict[str, Any]]  # component name, "scheduler", "options" -> its config

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        """The configs of the weight components: what `from_ldm` takes."""
        return {k: v for k, v in self.configs.items() if k in ldm_layout(self.family)}

    @property
    def scheduler(self) -> dict[str, Any] | None:
        return self.configs.get("scheduler")


def read_component_weights(folder: Path) -> StateDict:
    """A diffusers component folder's weights: one .safetensors (the plain one before `.fp16.` variants),
    or the shards its `*.safetensors.index.json` lists."""
    folder = Path(folder)
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    files = sorted(folder.glob("*.safetensors"), key=lambda p: (p.name.count("."), p.name))
    if not files:
        raise ModelError(f"{folder} has no .safetensors weights")
    return load_file(files[0])




def _folder_configs(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Component configs, plus "scheduler" and "options" (the model_index flags SDXL pipelines read)."""
    configs = {n: json.loads((folder / n / "config.json").read_text()) for n in names}
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        configs["scheduler"] = json.loads(scheduler.read_text())
    index = folder / "model_index.json"
    flags = json.loads(index.read_text()) if index.is_file() else {}
    configs["options"] = pipeline_options(flags)
    return configs


def _check_folder_weights(where: Path, part: Part, sd: Mapping[str, Tensor], config: Mapping[str, Any]) -> None:
    """Every weight the config's model has, with its shape, and no other: an export is never incomplete."""
    model = {k.removeprefix("text_model."): v for k, v in meta_model(part, config).state_dict().items()}
    have = {k.removeprefix("text_model."): v for k, v in sd.items() if not _IGNORED.fullmatch(k)}
    problems = _problems(set(model) - set(have), set(have) - set(model), _shape_diffs(have, model))
    if problems:
        raise ModelError(f"{where} weights do not match its config.json: {problems}")


def write_single_file(folder: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A diffusers folder -> one original-layout `.safetensors` (written atomically), e.g. for A1111/ComfyUI.

    `dtype` (e.g. torch.float16) casts the floating-point weights. The family and the component and
    scheduler configs go into the file's metadata (FAMILY_KEY, CONFIGS_KEY), so a model of any size,
    tiny ones included, can be rebuilt from the file alone (`read_single_file_info` + `from_ldm`).
    Tokenizers are not stored: SD's are the standard CLIP ones."""
    folder, out = Path(folder), Path(out)
    family = read_family_from_folder(folder)
    layout = ldm_layout(family)
    names = [n for n in layout if has_component(folder, n)]
    configs = _folder_configs(folder, names)
    weights = {n: read_component_weights(folder / n) for n in names}
    for n in names:
        _check_folder_weights(folder / n, layout[n], weights[n], configs[n])
    sd = to_ldm(weights, family)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    metadata = {"format": "pt", FAMILY_KEY: family,
                CONFIGS_KEY: json.dumps(configs, sort_keys=True)}
    partial = out.with_name(out.name + ".partial")
    save_file({k: v.contiguous() for k, v in sd.items()}, partial, metadata=metadata)
    os.replace(partial, out)
    log.info("wrote %s (%s, %d tensors) from %s", out, family, len(sd), folder)
    return out


def read_single_file_info(path: Path) -> SingleFileInfo | None:
    """The family and configs `write_single_file` stored, or None for a file from elsewhere."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if FAMILY_KEY not in metadata:
        return None
    try:
        configs = json.loads(metadata.get(CONFIGS_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: its {CONFIGS_KEY} metadata is not valid JSON ({e})") from None
    return SingleFileInfo(family=metadata[FAMILY_KEY], configs=configs)
