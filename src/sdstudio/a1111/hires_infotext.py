"""A1111's infotext keys for the hires fix (`Hires upscale`, `Hires resize`, `Hires steps`, `Hires upscaler`,
`Hires sampler`, `Hires schedule type`, `Hires prompt`, `Hires negative prompt`), written and read back.
"Denoising strength" (the request's `strength`) is written with the main keys in infotext.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdstudio.samplers import split_legacy_name


def hires_params(r: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's infotext keys for the hires fix, from a request record; "Denoising strength" is written with the
    others."""
    if not r["enable_hr"]:
        return {}
    resize = bool(r["hr_resize_x"] or r["hr_resize_y"])

    def differs(value: str, first: str) -> str | None:
        return value if value and value != first else None

    return {
        "Hires sampler": differs(r["hr_sampler_name"], r["sampler"]),
        "Hires schedule type": differs(r["hr_scheduler"], r["schedule"]),
        "Hires prompt": differs(r["hr_prompt"], r["prompt"]),
        "Hires negative prompt": differs(r["hr_negative_prompt"], r["negative_prompt"]),
        "Hires upscale": None if resize else r["hr_scale"],
        "Hires resize": f"{r['hr_resize_x']}x{r['hr_resize_y']}" if resize else None,
        "Hires steps": r["hr_second_pass_steps"] or None,
        "Hires upscaler": r["hr_upscaler"],
    }


def hires_fields(params: dict[str, str]) -> dict[str, Any]:
    """Request fields from parsed infotext params ("Hires resize: WxH" arrives as Hires resize-1 / -2)."""
    if not any(key in params for key in ("Hires upscale", "Hires resize-1", "Hires upscaler")):
        return {}
    fields: dict[str, Any] = {"enable_hr": True}
    conversions = {"Hires upscale": ("hr_scale", float), "Hires resize-1": ("hr_resize_x", int),
                   "Hires resize-2": ("hr_resize_y", int), "Hires steps": ("hr_second_pass_steps", int),
                   "Hires upscaler": ("hr_upscaler", str), "Hires schedule type": ("hr_scheduler", str),
                   "Hires prompt": ("hr_prompt", str), "Hires negative prompt": ("hr_negative_prompt", str)}
    for key, (name, convert) in conversions.items():
        if key in params:
            try:
                fields[name] = convert(params[key])
            except ValueError:
                continue
    if "Hires sampler" in params:
        sampler, legacy_schedule = split_legacy_name(params["Hires sampler"])
        fields["hr_sampler_name"] = sampler
        if legacy_schedule and "hr_scheduler" not in fields:
            fields["hr_scheduler"] = legacy_schedule
    return fields
