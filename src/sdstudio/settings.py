"""Settings: paths, device, dtype and limits, built once at the entry point and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

PACKAGED_MODELS = Path(__file__).resolve().parent / "assets" / "models"
DEMO_MODEL = "demo"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on accelerators and float32 on the CPU (bf16 is opt-in there)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}") from None


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 8
    max_n_iter: int = 100
    max_steps: int = 150
    min_side: int = 64
    max_side: int = 4096


@dataclass(frozen=True)
class Settings:
    """Everything the engine needs to know about its environment.

    home: sdstudio's own folder (models/, cache/); outputs_dir: where images are written.
    models_dirs: folders searched for models by name, in order.
    default_model: the model used when a request names none (a name or a path).
    """

    home: Path
    outputs_dir: Path
    models_dirs: tuple[Path, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    default_model: str | None = None
    limits: Limits = Limits()

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """Defaults, overridden by SDSTUDIO_* environment variables, overridden by keyword arguments.

        SDSTUDIO_HOME (default ~/.sdstudio), SDSTUDIO_OUTPUTS (default ./outputs),
        SDSTUDIO_MODELS (extra model folders, os.pathsep-separated), SDSTUDIO_MODEL (default: the
        bundled demo model), SDSTUDIO_DEVICE (auto), SDSTUDIO_DTYPE (auto). Models are looked up in
        <home>/models, then the SDSTUDIO_MODELS folders, then the models bundled with the package.
        """
        env = os.environ
        home = Path(env.get("SDSTUDIO_HOME", Path.home() / ".sdstudio")).expanduser()
        extra = [Path(p).expanduser() for p in env.get("SDSTUDIO_MODELS", "").split(os.pathsep) if p]
        device = resolve_device(env.get("SDSTUDIO_DEVICE", "auto"))
        settings = cls(
            home=home,
            outputs_dir=Path(env.get("SDSTUDIO_OUTPUTS", "outputs")),
            models_dirs=(home / "models", *extra, PACKAGED_MODELS),
            device=device,
            dtype=resolve_dtype(env.get("SDSTUDIO_DTYPE", "auto"), device),
            default_model=env.get("SDSTUDIO_MODEL") or DEMO_MODEL,
        )
        return replace(settings, **overrides)
