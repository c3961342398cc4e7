"""AUTOMATIC1111 infotext: the `parameters` PNG text chunk, written and read in A1111's format.

    <prompt>
    Negative prompt: <negative prompt>          (only when there is one)
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Keys follow A1111's order; a value containing ',', ':' or a newline is JSON-quoted. Reading accepts
older forms: a combined sampler name ("DPM++ 2M Karras"), no schedule type, no negative prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sdstudio.engine.hires_infotext import hires_fields, hires_params
from sdstudio.engine.requests import GenerationRequest
from sdstudio.samplers import split_legacy_name

# "Key: value" pairs; a key starts with a word character; a value is a JSON string or runs to a comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE_PREFIX = "Negative prompt:"


def quote(value: Any) -> str:
    text = format_value(value)
    if "," in text or "\n" in text or ":" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def format_value(value: Any) -> str:
    """Numbers as A1111 users see them: 7.0 -> "7", 0.75 -> "0.75"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Params whose value is None are left out, as A1111 does."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def generation_params(req: GenerationRequest, seed: int, model_hash: str, version: str,
                      extra: dict[str, Any] | None = None, vae: tuple[str, str] | None = None,
                      index: int = 0) -> dict[str, Any]:
    """A1111's keys, in A1111's order, for image `index` of a resolved request."""
    resized = req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0
    uses_strength = req.enable_hr or (req.mode != "txt2img" and req.denoising_start is None)
    return {
        "Steps": req.steps,
        "Sampler": req.sampler,
        "Schedule type": req.schedule,
        "CFG scale": req.cfg_scale,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": model_hash,
        "Model": req.model,
        "VAE hash": vae[1] if vae else None,
        "VAE": vae[0] if vae else None,
        "Variation seed": req.subseed + index if req.subseed_strength > 0 else None,
        "Variation seed strength": req.subseed_strength if req.subseed_strength > 0 else None,
        "Seed resize from": f"{req.seed_resize_from_w}x{req.seed_resize_from_h}" if resized else None,
        "Denoising strength": req.strength if uses_strength else None,
        "Denoising start": req.denoising_start,  # a latent handoff (engine/handoff.py)
        "Denoising end": req.denoising_end,
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        "Mask blur": req.mask_blur if req.mode == "inpaint" else None,
        "Masked content": req.masked_content if req.mode == "inpaint" else None,
        "Inpaint area": "Only masked" if req.mode == "inpaint" and req.only_masked else None,
        "Masked area padding": req.only_masked_padding if req.mode == "inpaint" and req.only_masked else None,
        "Soft inpainting enabled": True if req.mode == "inpaint" and req.soft_inpainting else None,
        "CFG Rescale phi": req.guidance_rescale or None,
        "Noise Schedule": "Zero Terminal SNR" if req.zero_terminal_snr else None,
        **hires_params(req),
        **(extra or {}),
        "Version": f"sdstudio {version}",
    }


@dataclass(frozen=True)
class Infotext:
    prompt: str
    negative_prompt: str
    params: dict[str, str]


def parse_infotext(text: str) -> Infotext:
    """Split an infotext into prompt, negative prompt and raw "Key: value" strings.

    The last line holds the parameters if it has at least three "Key: value" pairs; "Size: WxH"
    becomes Size-1 (width) and Size-2 (height), as A1111 does."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    params: dict[str, str] = {}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = json.loads(value)
        size = _SIZE.match(value)
        if size:
            params[f"{key}-1"], params[f"{key}-2"] = size.group(1), size.group(2)
        else:
            params[key] = value
    return Infotext("\n".join(prompt), "\n".join(negative), params)


def request_fields(info: Infotext) -> dict[str, Any]:
    """GenerationRequest fields recovered from an infotext (only those it states)."""
    p = info.params
    fields: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    conversions = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
                   "Size-1": ("width", int), "Size-2": ("height", int), "Model": ("model", str),
                   "Denoising strength": ("strength", float), "Clip skip": ("clip_skip", int),
                   "Mask blur": ("mask_blur", int), "Masked content": ("masked_content", str), "VAE": ("vae", str),
                   "CFG Rescale phi": ("guidance_rescale", float),
                   "Masked area padding": ("only_masked_padding", int),
                   "Denoising start": ("denoising_start", float), "Denoising end": ("denoising_end", float),
                   "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
                   "Seed resize from-1": ("seed_resize_from_w", int), "Seed resize from-2": ("seed_resize_from_h", int)}
    for key, (name, convert) in conversions.items():
        if key in p:
            try:
                fields[name] = convert(p[key])
            except ValueError:
                continue
    if p.get("Noise Schedule") == "Zero Terminal SNR":
        fields["zero_terminal_snr"] = True
    if "Inpaint area" in p:
        fields["only_masked"] = p["Inpaint area"] == "Only masked"
    if p.get("Soft inpainting enabled") == "True":
        fields["soft_inpainting"] = True
    fields.update(hires_fields(p))
    if "Sampler" in p:
        sampler, legacy_schedule = split_legacy_name(p["Sampler"])
        fields["sampler"] = sampler
        fields["schedule"] = p.get("Schedule type") or legacy_schedule or "Automatic"
    return fields
