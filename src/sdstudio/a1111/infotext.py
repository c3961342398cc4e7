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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdstudio.a1111.guidance_infotext import guidance_fields, guidance_params
from sdstudio.a1111.hires_infotext import hires_fields, hires_params
from sdstudio.errors import RequestError
from sdstudio.samplers import resolve_sampler, split_legacy_name

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


def generation_params(request: Mapping[str, Any], seed: int, model_hash: str, version: str,
                      extra: dict[str, Any] | None = None, vae: tuple[str, str] | None = None,
                      index: int = 0) -> dict[str, Any]:
    """A1111's keys, in A1111's order, for image `index` of a resolved request given as its record
    (`GenerationRequest.to_dict()`: fields a mode does not use are absent)."""
    r = request
    inpaint = r["mode"] == "inpaint"
    resized = r["seed_resize_from_w"] > 0 and r["seed_resize_from_h"] > 0
    uses_strength = r["enable_hr"] or (r["mode"] != "txt2img" and r["denoising_start"] is None)
    return {
        "Steps": r["steps"],
        "Sampler": r["sampler"],
        "Schedule type": r["schedule"],
        "CFG scale": r["cfg_scale"],
        "Seed": seed,
        "Size": f"{r['width']}x{r['height']}",
        "Model hash": model_hash,
        "Model": r["model"],
        "VAE hash": vae[1] if vae else None,
        "VAE": vae[0] if vae else None,
        "Variation seed": r["subseed"] + index if r["subseed_strength"] > 0 else None,
        "Variation seed strength": r["subseed_strength"] if r["subseed_strength"] > 0 else None,
        "Seed resize from": f"{r['seed_resize_from_w']}x{r['seed_resize_from_h']}" if resized else None,
        "Denoising strength": r["strength"] if uses_strength else None,
        "Denoising start": r["denoising_start"],  # a latent handoff (engine/sd/handoff.py)
        "Denoising end": r["denoising_end"],
        "Clip skip": r["clip_skip"] if r["clip_skip"] > 1 else None,
        "Mask blur": r["mask_blur"] if inpaint else None,
        "Masked content": r["masked_content"] if inpaint else None,
        "Inpaint area": "Only masked" if inpaint and r["only_masked"] else None,
        "Masked area padding": r["only_masked_padding"] if inpaint and r["only_masked"] else None,
        "Soft inpainting enabled": True if inpaint and r["soft_inpainting"] else None,
        "CFG Rescale phi": r["guidance_rescale"] or None,
        "Noise Schedule": "Zero Terminal SNR" if r["zero_terminal_snr"] else None,
        "Eta": r.get("eta"),
        "ENSD": r["eta_noise_seed_delta"] if r.get("eta_noise_seed_delta") and _uses_ensd(r["sampler"]) else None,
        **hires_params(r),
        **guidance_params(r),
        **(extra or {}),
        "Version": f"sdstudio {version}",
    }


def _uses_ensd(sampler: str) -> bool:
    """A1111 writes ENSD only for samplers that draw step noise."""
    try:
        return resolve_sampler(sampler).sampler.stochastic
    except RequestError:
        return False


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
                   "Distilled CFG Scale": ("distilled_cfg_scale", float), "Shift": ("shift", float),
                   "Masked area padding": ("only_masked_padding", int),
                   "Denoising start": ("denoising_start", float), "Denoising end": ("denoising_end", float),
                   "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
                   "Seed resize from-1": ("seed_resize_from_w", int), "Seed resize from-2": ("seed_resize_from_h", int),
                   "ENSD": ("eta_noise_seed_delta", int), "Eta DDIM": ("eta", float), "Eta": ("eta", float)}
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
    fields.update(guidance_fields(p))
    if "Sampler" in p:
        sampler, legacy_schedule = split_legacy_name(p["Sampler"])
        fields["sampler"] = sampler
        fields["schedule"] = p.get("Schedule type") or legacy_schedule or "Automatic"
    return fields
