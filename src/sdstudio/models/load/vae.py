"""Choosing a VAE per request, as A1111's SD VAE setting does.

"auto" (or None): a VAE file beside the checkpoint named `<model>.vae.safetensors` (or .pt/.ckpt) if
there is one, else the model's own; "none": the model's own; "taesd"/"taesdxl": a tiny VAE (tiny_vae.py);
anything else: a VAE file by name (in the VAE folders) or path. VAE files come in the original layout
(`encoder.down.0.block.0...`, sometimes prefixed `first_stage_model.`) or diffusers'
(`encoder.down_blocks.0.resnets.0...`).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from sdstudio.errors import RequestError
from sdstudio.models.find.catalog import ModelRef, unknown_message
from sdstudio.models.find.hashing import HashCache, short_hash
from sdstudio.models.find.names import check_inside, leaf
from sdstudio.models.load.checkpoint_io import read_state_dict
from sdstudio.models.load.loader import LoadedModel
from sdstudio.models.load.memory import place, realign
from sdstudio.models.load.parts import build_module
from sdstudio.models.load.tiny_vae import TINY_NAMES, find_tiny_vae, load_tiny_vae, weights_file

log = logging.getLogger(__name__)

VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
OWN = ("none", "automatic", "auto", "")


@dataclass(frozen=True)
class VaeChoice:
    """A VAE other than the model's own: its module and what the infotext records."""

    name: str       # file name, as A1111 writes `VAE: ...`
    hash: str       # A1111 `VAE hash`: first 10 hex of the file's sha256
    vae: AutoencoderKL | AutoencoderTiny


def find_vae(wanted: str | None, model: ModelRef, folders: Sequence[Path], names_only: bool = False,
             approx: Sequence[Path] = ()) -> Path | None:
    """The VAE file a request asks for, or None for the model's own. names_only: never a path
    (models/find/names.py). approx: the VAE-approx folders, where original tiny VAE files are kept."""
    key = (wanted or "auto").strip()
    if key.lower() in OWN:
        return _beside(model) if key.lower() in ("auto", "automatic", "") else None
    if key.lower() in TINY_NAMES:  # a folder: the model's own tiny VAE, or one in the VAE folders
        tiny = find_tiny_vae(key.lower(), model.path, folders, approx)
        if tiny is None:
            raise RequestError(f"unknown VAE {key!r}: no tiny VAE of that name for {model.name} (put a diffusers "
                               f"AutoencoderTiny folder named {key.lower()} in a VAE folder, or "
                               f"{key.lower()}_decoder.pth in a VAE-approx folder)", "vae")
        return tiny
    if not names_only and (path := Path(key).expanduser()).is_file():
        return path
    key = leaf(key) if names_only else key
    files = vae_files(folders)
    for p in files:
        if key.lower() in (p.name.lower(), p.stem.lower()):
            return check_inside(p, folders, "VAE") if names_only else p
    beside = _beside(model)
    if beside is not None and key.lower() == beside.name.lower():  # an automatic choice, read back from infotext
        return beside
    refs = [ModelRef(p.name, p) for p in files]
    raise RequestError(unknown_message(key, refs).replace("unknown model", "unknown VAE"), "vae")


def vae_files(folders: Sequence[Path]) -> list[Path]:
    """The VAE files in `folders` (not their subfolders), sorted by name within each folder."""
    return [p for d in folders if d.is_dir() for p in sorted(d.iterdir()) if p.suffix in VAE_SUFFIXES]


def _beside(model: ModelRef) -> Path | None:
    if not model.path.is_file():
        return None
    for suffix in VAE_SUFFIXES:
        candidate = model.path.with_name(model.path.stem + ".vae" + suffix)
        if candidate.is_file():
            return candidate
    return None


def load_vae_file(path: Path, like: AutoencoderKL) -> AutoencoderKL:
    """A VAE with `like`'s architecture and scaling factor, weights from `path` (strict key check), on the CPU."""
    state_dict = read_state_dict(path)
    if not any(k.startswith("decoder.up_blocks.") for k in state_dict):  # original layout
        prefixed = {k if k.startswith("first_stage_model.") else "first_stage_model." + k: v
                    for k, v in state_dict.items()}
        state_dict = convert_ldm_vae_checkpoint(prefixed, dict(like.config))
    vae = build_module(lambda: AutoencoderKL.from_config(like.config), state_dict, f"VAE {path.name}")
    return realign(vae.to(like.dtype).eval().requires_grad_(False))


def is_tiny_path(path: Path) -> bool:
    """find_vae gives a folder, or a `*_decoder` file, only for a tiny VAE."""
    return path.is_dir() or path.stem.endswith("_decoder")


class VaeCache:
    """The last few VAE files loaded, so switching back and forth does not reload them."""

    def __init__(self, hashes: HashCache, capacity: int = 2):
        self.hashes, self.capacity = hashes, capacity
        self._loaded: OrderedDict[tuple, VaeChoice] = OrderedDict()

    def get(self, path: Path, model: LoadedModel) -> VaeChoice:
        """The VAE file with `model`'s VAE config (scaling factor...), placed like the model's own."""
        like = model.vae
        key = (path.resolve(), path.stat().st_mtime_ns, json.dumps(dict(like.config), sort_keys=True, default=str),
               model.device, like.dtype, model.offload)
        if key not in self._loaded:
            log.info("loading VAE %s", path.name)
            tiny = is_tiny_path(path)
            vae = load_tiny_vae(path, like.dtype) if tiny else load_vae_file(path, like)
            place([vae], model.device, model.offload)
            name = path.name.split("_decoder")[0] if tiny else path.name  # taesd_decoder.pth is VAE "taesd"
            self._loaded[key] = VaeChoice(name, short_hash(self.hashes.file_sha256(weights_file(path))), vae)
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return self._loaded[key]
