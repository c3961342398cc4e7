"""Resumable training state: saved atomically beside the exported model, loaded without running pickles.

<out>/training-state/ holds trainer.pt (step, optimizer, LR schedule, EMA, config) and the live
weights; a save writes a fresh folder and renames it into place, so an interrupted save never
leaves a broken checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_DIR = "training-state"


@dataclass(frozen=True)
class TrainProgress:
    step: int          # steps done
    total: int
    loss: float        # running mean over the last steps
    saved: Path | None = None


ProgressFn = Callable[[TrainProgress], None]


def state_dir(out: Path) -> Path:
    return out / STATE_DIR


def save_state(out: Path, step: int, config: dict[str, Any], tensors: dict[str, Any],
               write_weights: Callable[[Path], None]) -> None:
    """tensors: optimizer/scheduler/EMA state dicts; write_weights(folder) saves the live weights."""
    final = state_dir(out)
    tmp = out / f".{STATE_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, **tensors}, tmp / "trainer.pt")
    (tmp / "train_config.json").write_text(json.dumps(config, indent=2))
    write_weights(tmp)
    old = out / f".{STATE_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_state(out: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(trainer tensors incl. step, config) of the last save, or None if there is none."""
    folder = state_dir(out)
    if not (folder / "trainer.pt").is_file():
        return None
    tensors = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
    return tensors, json.loads((folder / "train_config.json").read_text())


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for everything random in one step: resumable and order-independent."""
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + step)
