"""Reading checkpoint files safely: safetensors, or pickles through a weights-only unpickler.

A `.ckpt`/`.pt` is a Python pickle, and unpickling can run arbitrary code. torch's weights-only
unpickler only rebuilds tensors and plain containers; anything else (a `__reduce__` payload calling
os.system, say) is refused before it runs, and we turn that refusal into a clear error.

Memory: a `.safetensors` file opened with `open_state_dict` is read one tensor per lookup. A zip-format
pickle (what `torch.save` writes since torch 1.6) is memory-mapped, so its tensors are paged in from
disk as they are used; a legacy (pre-zip) pickle is read whole, as torch allows nothing else.

Keys: old checkpoints name the CLIP text model with transformers' pre-2022 layout
(`cond_stage_model.transformer.encoder...`); like A1111's read_state_dict we rename them to the current
one (`cond_stage_model.transformer.text_model.encoder...`). No other key changes.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from sdstudio.errors import ModelError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Old transformers CLIP layout -> current one, as A1111's read_state_dict renames them.
KEY_RENAMES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


def rename_key(key: str) -> str:
    """A key in the current CLIP layout (see KEY_RENAMES); other keys unchanged."""
    for old, new in KEY_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


class SafetensorsReader(Mapping[str, Tensor]):
    """A .safetensors file as a read-only mapping; each lookup reads that one tensor from disk."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except (OSError, SafetensorError) as e:
            raise ModelError(f"{path.name} is not a readable safetensors file: {e}") from None
        stored: list[str] = self._file.keys()
        self._names = {rename_key(k): k for k in stored}  # our key -> key in the file

    def __getitem__(self, key: str) -> Tensor:
        name = self._names[key]
        try:
            return self._file.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise ModelError(f"{self.path.name}: cannot read tensor {name}: {e}") from None

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_pickle(path: Path) -> object:
    """torch.load with weights_only=True: tensors and plain containers only, never code.
    Zip-format files are memory-mapped; legacy-format ones are read whole."""
    try:
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            f"refused to load {path.name}: it is a pickle that asks to run code or build objects other than "
            f"tensors ({first}). It was not executed. Use a .safetensors version of this file, or convert it "
            "on a machine you trust.") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise ModelError(f"{path.name} is not a readable checkpoint: {e}") from None


def _load_pickle(path: Path) -> dict[str, Tensor]:
    """The tensors of a .ckpt/.pt (a nested "state_dict" unwrapped), keys renamed; never runs code."""
    obj = read_pickle(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors")
    return {rename_key(k): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def open_state_dict(path: Path) -> Mapping[str, Tensor]:
    """A checkpoint's tensors by key: safetensors lazily, .ckpt/.pt through the weights-only loader."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsReader(path)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise ModelError(f"{path.name}: unknown checkpoint format {suffix!r}; expected .safetensors or .ckpt")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of a single-file checkpoint, on the CPU: a nested "state_dict" unwrapped, old CLIP
    key names renamed as A1111 does (`cond_stage_model.transformer.X` -> `...transformer.text_model.X`)."""
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    sd = open_state_dict(path)
    return sd if isinstance(sd, dict) else {k: sd[k] for k in sd}


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file ({} for other formats)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path.name} is not a readable safetensors file: {e}") from None


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


def header_shapes(path: Path) -> dict[str, _Shape]:
    """Key -> shape of a safetensors file, read from its header without loading any tensor."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: _Shape(tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path.name} is not a readable safetensors file: {e}") from None
