"""Finding and loading ControlNets, offline: diffusers folders and single files.

A single file (lllyasviel's `control_*.safetensors`/`.pth`, original layout `input_blocks...`,
`zero_convs...`, `input_hint_block...`, sometimes prefixed `control_model.`; or diffusers' own keys)
gets its architecture from the UNet it will control (ControlNetModel.from_unet), so no config
download is needed; the hint encoder's widths are read from the file.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from sdstudio.errors import RequestError
from sdstudio.models.find.catalog import ModelRef, unknown_message
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.find.names import check_inside, leaf
from sdstudio.models.load.checkpoint_io import read_state_dict
from sdstudio.models.load.memory import realign
from sdstudio.models.load.parts import build_module

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


FLOW_CLASSES = {"FluxControlNetModel": "flux", "SD3ControlNetModel": "sd3"}  # engine/flow/control.py runs these


def is_controlnet_folder(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and any(f'"{name}"' in config.read_text(errors="replace")
                                    for name in ("ControlNetModel", *FLOW_CLASSES))


def controlnet_family(path: Path) -> str | None:
    """'flux' or 'sd3' for a diffusers ControlNet folder of those families (None: Stable Diffusion's, or a file)."""
    try:
        return FLOW_CLASSES.get(json.loads((path / "config.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return None


def available(folders: Sequence[Path]) -> list[Path]:
    """ControlNet folders and files in `folders`, sorted by name within each folder."""
    found: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir())
                      if (p.is_dir() and is_controlnet_folder(p)) or (p.is_file() and p.suffix in SUFFIXES)]
    return found


def find_controlnet(wanted: str, folders: Sequence[Path], names_only: bool = False) -> Path:
    """A ControlNet by path, or by name (with or without suffix, or A1111's "name [hash]") in `folders`.
    names_only: never a path (models/find/names.py)."""
    path = Path(wanted).expanduser()
    if not names_only and (path.is_file() or (path.is_dir() and is_controlnet_folder(path))):
        return path
    key = wanted.split(" [")[0].strip().lower()
    key = leaf(key) if names_only else key
    candidates = available(folders)
    for p in candidates:
        if key in (p.name.lower(), p.stem.lower()):
            return check_inside(p, folders, "ControlNet") if names_only else p
    refs = [ModelRef(p.stem if p.is_file() else p.name, p) for p in candidates]
    raise RequestError(unknown_message(wanted, refs).replace("unknown model", "unknown ControlNet"), "controlnets")


def load_controlnet(path: Path, unet: UNet2DConditionModel) -> ControlNetModel:
    """On the CPU in float32; the caller places it."""
    if path.is_dir() and (family := controlnet_family(path)):
        raise RequestError(f"the ControlNet {path.name} is for {'Flux' if family == 'flux' else 'SD3'} models, not "
                           "Stable Diffusion", "controlnets")
    if path.is_dir():
        return ControlNetModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    state = read_state_dict(path)
    state = {k.removeprefix("control_model."): v for k, v in state.items()}
    hint = sorted((k for k in state if k.startswith("input_hint_block.") and k.endswith(".weight")),
                  key=lambda k: int(k.split(".")[1]))
    embedding = "controlnet_cond_embedding.conv_in.weight"
    if hint:  # original layout: conv layers 0, 2, 4, ...; the last maps to the UNet width
        widths = tuple(int(state[k].shape[0]) for k in hint[:-1])[::2]
    elif embedding in state:
        blocks = sorted((k for k in state if k.startswith("controlnet_cond_embedding.blocks.")
                         and k.endswith(".weight")), key=lambda k: int(k.split(".")[2]))
        widths = (int(state[embedding].shape[0]), *(int(state[k].shape[0]) for k in blocks[1::2]))
    else:
        raise RequestError(f"{path.name} is not a ControlNet (no hint encoder weights)", "controlnets")
    conv_in = state.get("input_blocks.0.0.weight", state.get("conv_in.weight"))
    with init_empty_weights():  # only the config is wanted, not a copy of the UNet's weights
        like = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                         load_weights_from_unet=False)
    config = {**like.config, "in_channels": int(conv_in.shape[1]) if conv_in is not None else 4}
    if hint:
        state = convert_controlnet_checkpoint(state, config)
    return build_module(lambda: ControlNetModel.from_config(config), state, f"ControlNet {path.name}")


def check_fits(net: ControlNetModel, unet: UNet2DConditionModel, path: Path) -> None:
    """A ControlNet made for another family (SD1 vs SD2 vs SDXL) fails deep inside the UNet call; say so."""
    mine, theirs = net.config, unet.config
    for key in ("cross_attention_dim", "addition_embed_type"):
        if mine.get(key) != theirs.get(key):
            raise RequestError(f"the ControlNet {path.name} does not fit this model: its {key} is {mine.get(key)}, "
                               f"the model's is {theirs.get(key)} (a ControlNet for another family?)", "controlnets")


class ControlNetCache:
    """Loaded ControlNets, a few at a time, keyed by file, its modification time, device and dtype."""

    def __init__(self, hashes: HashCache, keep: int = 4):
        self.hashes, self.keep = hashes, keep
        self._loaded: OrderedDict[tuple, ControlNetModel] = OrderedDict()

    def get(self, path: Path, unet: UNet2DConditionModel, device: torch.device, dtype: torch.dtype) -> ControlNetModel:
        """On the device the model runs on (its UNet may be offloaded elsewhere between calls)."""
        key = (str(path.resolve()), path.stat().st_mtime_ns, str(device), str(dtype))
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        model = load_controlnet(path, unet)
        check_fits(model, unet, path)
        model = realign(model.to(device=device, dtype=dtype).eval().requires_grad_(False))
        self._loaded[key] = model
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        return model

    def short_hash(self, path: Path) -> str:
        """8 hex digits of the sha256, as A1111's ControlNet extension shows `name [hash]`."""
        return self.hashes.model_sha256(path)[:8]
