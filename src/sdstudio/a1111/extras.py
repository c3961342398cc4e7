"""A1111's infotext keys beyond the generation's own (infotext.py): those its extensions and tabs write for
ControlNet, LoRA and embedding hashes, the X/Y/Z plot script and the extras tab's upscale. The engine gives
plain values; the key names, labels and formats are here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# our ControlNet resize modes -> the sd-webui-controlnet extension's labels
CONTROLNET_RESIZE_LABELS = {"just resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


def controlnet_params(units: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """`ControlNet 0: "Module: canny, Model: name [hash], ..."` per unit, as the extension writes them; each unit
    gives preprocessor, name, hash, weight, resize_mode, start, end and guess_mode."""
    out = {}
    for j, u in enumerate(units):
        mode = "ControlNet is more important" if u["guess_mode"] else "Balanced"
        out[f"ControlNet {j}"] = (f"Module: {u['preprocessor']}, Model: {u['name']} [{u['hash']}], "
                                  f"Weight: {u['weight']}, Resize Mode: {CONTROLNET_RESIZE_LABELS[u['resize_mode']]}, "
                                  f"Guidance Start: {u['start']}, Guidance End: {u['end']}, Control Mode: {mode}")
    return out


def _hashes(pairs: Iterable[tuple[str, str]]) -> str | None:
    """`name: hash, ...` with ':' and ',' taken out of names (A1111's format); None when there is none."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in pairs) or None


def addon_params(loras: Iterable[tuple[str, str]], embeddings: Iterable[tuple[str, str]]) -> dict[str, str | None]:
    """"Lora hashes" and "TI hashes" from (name, short hash) pairs."""
    return {"Lora hashes": _hashes(loras), "TI hashes": _hashes(embeddings)}


def xyz_params(axes: Sequence[tuple[str, Sequence[str]] | None]) -> dict[str, str]:
    """The X/Y/Z plot script's keys: its name, then each axis's type and values (X, Y, Z; None: no axis)."""
    out = {"Script": "X/Y/Z plot"}
    for letter, axis in zip("XYZ", axes, strict=True):
        if axis:
            out[f"{letter} Type"] = axis[0]
            out[f"{letter} Values"] = ", ".join(axis[1])
    return out


def upscale_params(scale: float, upscaler: str, model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The extras tab's text: "Postprocess upscale by", "Postprocess upscaler", then an upscaler model's own keys
    (steps, cfg_scale, seed, noise_level, size, model_hash, version)."""
    out: dict[str, Any] = {"Postprocess upscale by": scale, "Postprocess upscaler": upscaler}
    if model:
        width, height = model["size"]
        out.update({"Steps": model["steps"], "CFG scale": model["cfg_scale"], "Seed": model["seed"],
                    "Noise level": model["noise_level"], "Size": f"{width}x{height}",
                    "Model hash": model["model_hash"], "Version": f"sdstudio {model['version']}"})
    return out
