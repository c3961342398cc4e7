"""Forge's built-in always-on scripts over the API (alwayson_scripts), as request fields: "FreeU Integrated"
args [enabled, b1, b2, s1, s2] and "Perturbed Attention Guidance Integrated" args [enabled, scale]. Script
names match case-insensitively, as A1111 looks them up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdstudio.errors import RequestError

FREEU_SCRIPT = "freeu integrated"
PAG_SCRIPT = "perturbed attention guidance integrated"
FORGE_SCRIPTS = (FREEU_SCRIPT, PAG_SCRIPT)
_DEFAULTS = {FREEU_SCRIPT: [False, 1.01, 1.02, 0.99, 0.95], PAG_SCRIPT: [False, 3.0]}  # Forge's sliders


def forge_script_fields(scripts: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields of the Forge scripts in `alwayson_scripts` that are enabled; {} when none is."""
    fields: dict[str, Any] = {}
    for name, script in scripts.items():
        key = name.lower()
        if key not in FORGE_SCRIPTS or not isinstance(script, dict):
            continue
        sent = script.get("args", [])
        if not isinstance(sent, list) or len(sent) > len(_DEFAULTS[key]):
            raise RequestError(f"alwayson_scripts.{name}.args must be a list of at most {len(_DEFAULTS[key])} "
                               "values (enabled, then the script's sliders)", "alwayson_scripts")
        args = sent + _DEFAULTS[key][len(sent):]
        if not args[0]:
            continue
        numbers = args[1:]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
            raise RequestError(f"alwayson_scripts.{name}.args after 'enabled' must be numbers, got {numbers!r:.80}",
                               "alwayson_scripts")
        if key == FREEU_SCRIPT:
            fields["freeu"] = tuple(float(v) for v in numbers)
        else:
            fields["pag_scale"] = float(numbers[0])
    return fields
