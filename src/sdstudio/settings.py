"""Settings: paths, device, dtype and limits, built once at the entry point and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sdstudio.models.load.speed import COMPILE_MODES, COMPILE_TARGETS
from sdstudio.pictures import DEFAULT_UPLOAD_PIXELS

PACKAGED_MODELS = Path(__file__).resolve().parent / "assets" / "models"
PACKAGED_LORAS = Path(__file__).resolve().parent / "assets" / "loras"  # the demo model's LCM-LoRA
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
    max_pixels: int = 2048 * 2048     # width * height of one image
    max_images: int = 64              # batch_size * n_iter of one job
    max_prompt_chars: int = 20_000    # prompt and negative prompt, each
    max_upload_bytes: int = 64 << 20  # one HTTP request body
    max_upload_pixels: int = DEFAULT_UPLOAD_PIXELS  # width * height of one uploaded picture, checked before decoding
    max_controlnet_units: int = 8     # ControlNet units of one request
    max_prompt_breaks: int = 32       # BREAKs (each starts a 75-token window) in a prompt and its negative, each
    max_prompt_nesting: int = 32      # brackets nested in a prompt ((((x)))) is 4)
    # pixel-steps of one job: width x height x steps x images x (1 + ControlNet units), plus the hires pass likewise.
    # The default refuses only the extreme corners of the other limits; a CPU server may want 100x less.
    max_work: float = 1e10


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
    prediction: str | None = None  # "epsilon" | "v_prediction": override for single files that cannot say
    a1111_dir: Path | None = None    # an AUTOMATIC1111 install whose models/ and embeddings/ we also list
    comfyui_dir: Path | None = None  # a ComfyUI install whose models/ we also list
    hf_cache: Path | None = None     # the Hugging Face hub cache (diffusers folders downloaded earlier)
    offload: str = "none"            # none | model | sequential: CPU offload for small GPUs
    vae_tiling: str = "auto"         # auto (images over 4x the native area, or when offloading) | on | off
    channels_last: bool = True       # UNet convolutions in NHWC order (models/load/speed.py)
    compile: str = "none"            # none | unet | unet+vae: torch.compile, for long sessions (models/load/speed.py)
    compile_mode: str = "default"    # default | reduce-overhead (CUDA graphs) | max-autotune
    batch_invariant: str = "auto"    # auto (CPU) | on | off: each image computed alone, the same in any batch
    tiny_vae_previews: bool = True   # live previews decoded by the model's tiny VAE (TAESD) when there is one
    models_in_memory: int = 1        # loaded models kept (LRU) ...
    memory_budget_gb: float | None = None  # ... and at most this many GB of weights
    limits: Limits = Limits()
    names_only: bool = False         # model-like fields take names, not paths (the server: models/find/names.py)

    def __post_init__(self) -> None:
        for name, allowed in (("offload", ("none", "model", "sequential")), ("vae_tiling", ("auto", "on", "off")),
                              ("compile", COMPILE_TARGETS), ("compile_mode", COMPILE_MODES),
                              ("prediction", (None, "epsilon", "v_prediction"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
        if self.models_in_memory < 1:
            raise ValueError(f"models_in_memory must be at least 1, got {self.models_in_memory}")

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """Defaults, overridden by SDSTUDIO_* environment variables, overridden by keyword arguments.

        SDSTUDIO_HOME (default ~/.sdstudio), SDSTUDIO_OUTPUTS (default ./outputs),
        SDSTUDIO_MODELS (extra model folders, os.pathsep-separated), SDSTUDIO_MODEL (default: the
        bundled demo model), SDSTUDIO_DEVICE (auto), SDSTUDIO_DTYPE (auto), SDSTUDIO_A1111 and
        SDSTUDIO_COMFYUI (existing installs), HF_HUB_CACHE / HF_HOME (the Hugging Face cache),
        SDSTUDIO_OFFLOAD, SDSTUDIO_VAE_TILING, SDSTUDIO_CHANNELS_LAST (1/0), SDSTUDIO_COMPILE,
        SDSTUDIO_COMPILE_MODE, SDSTUDIO_MODELS_IN_MEMORY, SDSTUDIO_MEMORY_BUDGET_GB. Models
        are looked up in <home>/models, the SDSTUDIO_MODELS folders, the bundled models, then the
        A1111, ComfyUI and Hugging Face folders.
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
            a1111_dir=_path(env.get("SDSTUDIO_A1111")),
            comfyui_dir=_path(env.get("SDSTUDIO_COMFYUI")),
            hf_cache=_hf_cache(env),
            offload=env.get("SDSTUDIO_OFFLOAD", "none"),
            vae_tiling=env.get("SDSTUDIO_VAE_TILING", "auto"),
            batch_invariant=env.get("SDSTUDIO_BATCH_INVARIANT", "auto"),
            channels_last=env.get("SDSTUDIO_CHANNELS_LAST", "1") not in ("0", "false", "off"),
            compile=env.get("SDSTUDIO_COMPILE", "none"),
            compile_mode=env.get("SDSTUDIO_COMPILE_MODE", "default"),
            models_in_memory=int(env.get("SDSTUDIO_MODELS_IN_MEMORY", "1")),
            memory_budget_gb=float(env["SDSTUDIO_MEMORY_BUDGET_GB"]) if env.get("SDSTUDIO_MEMORY_BUDGET_GB") else None,
        )
        return replace(settings, **overrides)


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _hf_cache(env: os._Environ | dict[str, str]) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    return Path(env.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser() / "hub"
