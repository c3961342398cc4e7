"""LoRA files: read them, check them against a model, merge them into its weights and take them out again.

Mechanism: merge with a backup. For every module a request's LoRAs touch, the original weight is copied
aside (to the CPU by default), then replaced by
    W' = W + Σ_i w_i · scale_i · up_i @ down_i      (computed in float32, stored in W's dtype)
On exit the copy is written back with `copy_`, so the model is bit-for-bit what it was. Merging costs one
low-rank product per module per request and nothing per denoising step (unlike adapter layers, which add
two matmuls per step). Nothing is patched: the modules stay the same objects with the same classes.

`apply_loras` merges for good (e.g. to bake LoRAs into a checkpoint); `loras_applied` merges for the
duration of a `with` block. Both first build a `LoraReport` (`check_loras` builds only that): which keys
matched which modules and which were dropped and why. A file that matches nothing raises `ModelError`
naming the family the file seems to be for; a partial match logs a warning with the summary.

Hashes follow AUTOMATIC1111 (extensions-builtin/Lora/network.py, modules/hashes.py): the safetensors
metadata's `sshs_model_hash` if present, else for `.safetensors` the "addnet" hash (sha256 of the bytes
after the 8-byte header length and the JSON header, i.e. of the tensor data only, so editing metadata
keeps the hash), for other files the sha256 of the whole file. The short hash in the infotext's
"Lora hashes" is its first 12 hex digits.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from sdstudio.errors import ModelError
from sdstudio.models.addons.lora_keys import COMPONENTS, Dropped, LoraFile, parse_lora
from sdstudio.models.addons.lora_plan import FileReport, LoraReport, ModulePlan, plan_loras
from sdstudio.models.load.checkpoint_io import read_metadata, read_state_dict

log = logging.getLogger(__name__)

__all__ = ["Dropped", "FileReport", "LoraFile", "LoraReport", "apply_loras", "check_loras", "lora_from_state_dict",
           "loras_applied", "read_lora"]

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth", ".bin")
_CHUNK = 1 << 20




def read_lora(path: Path) -> LoraFile:
    """Read a LoRA (`.safetensors`, or a pickle through the weights-only loader: it never runs code)."""
    path = Path(path)
    if path.suffix not in LORA_SUFFIXES:
        raise ModelError(f"{path.name}: a LoRA must be one of {', '.join(LORA_SUFFIXES)}, got {path.suffix!r}")
    state_dict = read_state_dict(path)
    metadata = read_metadata(path)
    return lora_from_state_dict(path.stem, state_dict, metadata=metadata, path=path, sha256=lora_sha256(path, metadata))


def lora_from_state_dict(name: str, state_dict: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None,
                         path: Path | None = None, sha256: str = "") -> LoraFile:
    """A LoraFile from tensors already in memory (`sha256` empty: no hash in the infotext)."""
    parsed = parse_lora(state_dict, metadata)
    return LoraFile(name, path, sha256, parsed.format, dict(state_dict), dict(metadata or {}),
                    parsed.layers, parsed.dropped)


def lora_sha256(path: Path, metadata: Mapping[str, str] | None = None) -> str:
    """A1111's LoRA hash: metadata `sshs_model_hash`, else the addnet hash (.safetensors) or the file's sha256."""
    given = (metadata or {}).get("sshs_model_hash", "")
    if re.fullmatch(r"[0-9a-fA-F]{64}", given):
        return given.lower()
    h = hashlib.sha256()
    with path.open("rb") as f:
        if path.suffix == ".safetensors":  # skip u64 header length + JSON header: hash the tensor bytes only
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_loras(unet: nn.Module, text_encoders: Sequence[nn.Module | None],
                loras: Sequence[tuple[LoraFile, float]]) -> LoraReport:
    """The pre-flight report, without touching the model. Raises ModelError for a file that matches nothing."""
    report, _ = _plan(unet, text_encoders, loras)
    return report


def apply_loras(unet: nn.Module, text_encoders: Sequence[nn.Module | None],
                loras: Sequence[tuple[LoraFile, float]]) -> LoraReport:
    """Merge LoRAs into the weights for good. `text_encoders[0]` is te1 (CLIP-L), `[1]` te2 (SDXL's G).

    Each (file, weight) adds weight · scale · up @ down to its modules; weight 0 skips the file and a
    negative weight subtracts. For an undo, use `loras_applied`.
    """
    report, plans = _plan(unet, text_encoders, loras)
    _merge(plans, backups=None)
    return report


@contextmanager
def loras_applied(unet: nn.Module, text_encoders: Sequence[nn.Module | None],
                  loras: Sequence[tuple[LoraFile, float]], *,
                  backup_device: torch.device | str = "cpu") -> Iterator[LoraReport]:
    """Merge LoRAs for the `with` block; on exit (exceptions included) restore every weight bit-exactly.

    The model must not be used by anyone else meanwhile (one worker owns the device). Backups of the
    touched weights live on `backup_device` (CPU: no extra GPU memory).
    """
    report, plans = _plan(unet, text_encoders, loras)
    backups: list[tuple[Tensor, Tensor]] = []
    try:
        _merge(plans, backups=backups, backup_device=torch.device(backup_device))
        yield report
    finally:
        _restore(backups)


def _plan(unet: nn.Module, text_encoders: Sequence[nn.Module | None],
          loras: Sequence[tuple[LoraFile, float]]) -> tuple[LoraReport, list[ModulePlan]]:
    if len(text_encoders) > len(COMPONENTS) - 1:
        raise ValueError(f"at most {len(COMPONENTS) - 1} text encoders (te1, te2), got {len(text_encoders)}")
    models = dict(zip(COMPONENTS, [unet, *text_encoders], strict=False))
    report, plans = plan_loras(models, loras)
    for file in report.files:
        if not file.skipped and file.partial:
            log.warning("LoRA matches only part of this model: %s", file.summary())
        elif not file.skipped:
            log.info("LoRA: %s", file.summary())
    return report, plans


@torch.no_grad()
def _merge(plans: Sequence[ModulePlan], *, backups: list[tuple[Tensor, Tensor]] | None,
           backup_device: torch.device | str = "cpu") -> None:
    for plan in plans:
        weight = plan.module.weight
        delta = plan.delta(weight.device)  # (out, in[, kh, kw]) float32
        if backups is not None:
            backups.append((weight, weight.detach().to(backup_device, copy=True)))
        weight.copy_((weight.float() + delta).to(weight.dtype))


@torch.no_grad()
def _restore(backups: list[tuple[Tensor, Tensor]]) -> None:
    for weight, saved in reversed(backups):
        weight.copy_(saved)
    backups.clear()
