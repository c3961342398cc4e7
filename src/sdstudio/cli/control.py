"""`--controlnet` and `--ip-adapter` for the generating commands: one repeatable option per unit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdstudio.cli.common import fail
from sdstudio.engine.requests import ControlUnit, IpAdapterUnit
from sdstudio.errors import SdStudioError
from sdstudio.storage.images import open_image

ControlNetOpt = Annotated[list[str] | None, typer.Option(
    "--controlnet", metavar="SPEC",
    help="A ControlNet unit, repeatable, as key=value pairs joined by commas, e.g. "
         "'model=NAME,image=FILE,preprocessor=canny'. Keys: model (required), image (default: the init image), "
         "preprocessor, weight, start, end, guess, resize, low, high.")]

IpAdapterOpt = Annotated[list[str] | None, typer.Option(
    "--ip-adapter", metavar="SPEC",
    help="An IP-Adapter image prompt, repeatable, as key=value pairs joined by commas, e.g. "
         "'model=ip-adapter_sd15,image=FILE,weight=0.8'. Keys: model and image (both required; image may repeat), "
         "weight, start, end, encoder (a CLIP image encoder by name; default: the first that fits).")]

_FLOATS = {"weight": "weight", "start": "start", "end": "end"}
_INTS = {"low": "low_threshold", "high": "high_threshold"}
_TEXTS = {"model": "model", "preprocessor": "preprocessor", "resize": "resize_mode"}


def control_units(specs: list[str] | None) -> dict[str, tuple[ControlUnit, ...]]:
    """Request fields for the given --controlnet specs (none when there are none)."""
    if not specs:
        return {}
    return {"controlnets": tuple(_unit(spec) for spec in specs)}


def ip_adapter_units(specs: list[str] | None) -> dict[str, tuple[IpAdapterUnit, ...]]:
    """Request fields for the given --ip-adapter specs (none when there are none)."""
    if not specs:
        return {}
    units = []
    for spec in specs:
        fields: dict[str, object] = {}
        images = []
        for key, value in _pairs(spec, "--ip-adapter"):
            try:
                if key in _FLOATS:
                    fields[key] = float(value)
                elif key in ("model", "encoder"):
                    fields[key] = value
                elif key == "image":
                    images.append(open_image(Path(value)))
                else:
                    fail(f"unknown --ip-adapter key {key!r}; use model, image, weight, start, end, encoder")
            except ValueError:
                fail(f"--ip-adapter {key} must be a number, got {value!r}")
            except SdStudioError as e:
                fail(str(e))
        if "model" not in fields or not images:
            fail(f"--ip-adapter needs model=NAME and image=FILE, got {spec!r}")
        units.append(IpAdapterUnit(images=tuple(images), **fields))  # type: ignore[arg-type]
    return {"ip_adapters": tuple(units)}


def _pairs(spec: str, option: str) -> list[tuple[str, str]]:
    pairs = []
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            fail(f"{option} takes key=value pairs separated by commas, got {part!r} in {spec!r}")
        pairs.append((key.strip().lower(), value.strip()))
    return pairs


def _unit(spec: str) -> ControlUnit:
    fields: dict[str, object] = {}
    for key, value in _pairs(spec, "--controlnet"):
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
