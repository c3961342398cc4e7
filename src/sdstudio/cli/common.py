"""What every CLI sub-app shares: settings from options, quiet libraries, one-line failures."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sdstudio.settings import Settings

err = Console(stderr=True)


@dataclass(frozen=True)
class GlobalOptions:
    """The options given before the command (`sdstudio --device cuda txt2img ...`); typer fills them from the
    command line and the SDSTUDIO_* variables."""

    device: str = "auto"
    dtype: str = "auto"
    prediction: str | None = None
    offload: str = "none"
    vae_tiling: str = "auto"
    compile: str = "none"
    compile_mode: str = "default"


def settings_from(options: GlobalOptions, out: Path | None = None) -> Settings:
    from sdstudio.settings import Settings, resolve_device, resolve_dtype  # deferred: imports torch

    try:
        device = resolve_device(options.device or "auto")
        settings = Settings.from_env(device=device, dtype=resolve_dtype(options.dtype or "auto", device))
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    changes = {k: getattr(options, k) for k in ("prediction", "offload", "vae_tiling", "compile", "compile_mode")
               if getattr(options, k)}
    try:
        settings = replace(settings, **changes)
    except ValueError as e:
        fail(str(e))
    if out is not None:
        check_output_folder(out)
    return replace(settings, outputs_dir=out) if out is not None else settings


def model_path(name: str | Path, settings: Settings) -> Path:
    """A path as given, else a model by the name, title or hash the catalog knows (`demo`, ...); fails
    with the catalog's "did you mean" when there is none."""
    from sdstudio.errors import ModelError
    from sdstudio.models.find import catalog

    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    try:
        return catalog.resolve(str(name), catalog.model_folders(settings)).path
    except ModelError as e:
        fail(str(e))


def check_output_folder(out: Path) -> None:
    """Before any work: --out must be a folder we can write in (it is made if missing)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: give a folder (it is created if it does not exist)")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--out {out}: cannot write in {existing}")


def quiet_libraries() -> None:
    """Library progress bars and advisory warnings would drown ours; errors still show."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    # torchsde warns about float rounding of Brownian interval ends (1e-7), which DPM++ SDE always causes.
    warnings.filterwarnings("ignore", message="Should have ta>=t0", module="torchsde")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
