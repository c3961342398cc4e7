"""`--controlnet` for the generating commands: one repeatable option per ControlNet unit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdstudio.cli.common import fail
from sdstudio.engine.requests import ControlUnit
from sdstudio.errors import SdStudioError
from sdstudio.storage.images import open_image

ControlNetOpt = Annotated[list[str] | None, typer.Option(
    "--controlnet", metavar="SPEC",
    help="A ControlNet unit, repeatable, as key=value pairs joined by commas, e.g. "
         "'model=NAME,image=FILE,preprocessor=canny'. Keys: model (required), image (default: the init image), "
         "preprocessor, weight, start, end, guess, resize, low, high.")]

_FLOATS = {"weight": "weight", "start": "start", "end": "end"}
_INTS = {"low": "low_threshold", "high": "high_threshold"}
_TEXTS = {"model": "model", "preprocessor": "preprocessor", "resize": "resize_mode"}


def control_units(specs: list[str] | None) -> dict[str, tuple[ControlUnit, ...]]:
    """Request fields for the given --controlnet specs (none when there are none)."""
    if not specs:
        return {}
    return {"controlnets": tuple(_unit(spec) for spec in specs)}


def _unit(spec: str) -> ControlUnit:
    fields: dict[str, object] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            fail(f"--controlnet takes key=value pairs separated by commas, got {part!r} in {spec!r}")
        try:
            if key in _FLOATS:
                fields[_FLOATS[key]] = float(value)
            elif key in _INTS:
                fields[_INTS[key]] = int(value)
            elif key in _TEXTS:
                fields[_TEXTS[key]] = value
            elif key == "guess":
                fields["guess_mode"] = value.lower() in ("1", "true", "yes", "on")
            elif key == "image":
                fields["image"] = open_image(Path(value))
            else:
                known = ", ".join([*_TEXTS, *_FLOATS, *_INTS, "guess", "image"])
                fail(f"unknown --controlnet key {key!r}; use {known}")
        except ValueError:
            fail(f"--controlnet {key} must be a number, got {value!r}")
        except SdStudioError as e:
            fail(str(e))
    if "model" not in fields:
        fail(f"--controlnet needs model=NAME (a ControlNet folder or file), got {spec!r}")
    return ControlUnit(**fields)  # type: ignore[arg-type]
