"""The step loop shared by the trainers: resume check, progress with a running loss, periodic saves."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from sdstudio.errors import SdStudioError
from sdstudio.train.state import ProgressFn, TrainProgress, load_state, state_dir

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"  # a diffusers model folder's weights

# Config fields that may change when a run is resumed (train longer, save more or less often).
RESUMABLE_CHANGES = {"steps", "save_every", "out"}


class TrainConfigError(SdStudioError):
    pass


def resume_point(out: Path, config: Any, resume: bool) -> dict[str, Any] | None:
    """The saved trainer state to continue from, or None for a fresh run; refuses to clobber a run."""
    saved = load_state(out)
    if saved is None:
        if resume:
            log.warning("nothing to resume in %s: starting from scratch", out)
        return None
    tensors, old = saved
    if not resume:
        raise TrainConfigError(f"{out} already holds a training run (step {tensors['step']}): "
                               "pass --resume to continue it, or choose another output folder")
    new = _jsonable(asdict(config))
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        raise TrainConfigError("cannot resume with different settings: " +
                               ", ".join(f"{k} was {old.get(k)!r}, now {new[k]!r}" for k in changed))
    return tensors


class Optimizer:
    """AdamW (no weight decay) with a warm-up, then cosine learning rate; its state is saved and resumed."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, warmup: int, steps: int):
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.sched = get_scheduler("cosine", self.opt, num_warmup_steps=warmup, num_training_steps=steps)

    def step(self, loss: torch.Tensor) -> float:
        """Backward, update, advance the schedule; the loss as a number."""
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def resume(self, saved: dict[str, Any] | None, module: torch.nn.Module, out: Path) -> int:
        """The step to start from: 0 for a fresh run, else the saved run's, with `module`'s weights (saved as
        a diffusers folder in the state) and this optimizer's state restored."""
        if saved is None:
            return 0
        module.load_state_dict(load_file(state_dir(out) / WEIGHTS))
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        log.info("resuming %s at step %d", out, saved["step"])
        return saved["step"]


def run_steps(start: int, total: int, step: Callable[[int], float], save: Callable[[int], Path],
              save_every: int, progress: ProgressFn | None) -> None:
    """Run steps start..total-1; save every `save_every` steps and after the last one."""
    recent: deque[float] = deque(maxlen=50)
    for i in range(start, total):
        recent.append(step(i))
        done = i + 1
        saved = save(done) if done == total or (save_every and done % save_every == 0) else None
        if progress:
            progress(TrainProgress(done, total, sum(recent) / len(recent), saved))


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in config.items()}


def config_json(config: Any) -> dict[str, Any]:
    return _jsonable(asdict(config))
