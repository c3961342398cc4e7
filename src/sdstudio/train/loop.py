"""The step loop shared by the trainers: resume check, progress with a running loss, periodic saves."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sdstudio.errors import SdStudioError
from sdstudio.train.state import ProgressFn, TrainProgress, load_state

log = logging.getLogger(__name__)

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
