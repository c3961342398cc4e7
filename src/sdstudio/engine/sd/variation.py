"""Variation seeds as AUTOMATIC1111 defines them (modules/rng.py `ImageRNG.first`, `slerp`).

With subseed strength s > 0, image k of a job starts from

    slerp(s, noise(seed), noise(subseed + k))        every image keeps the main seed, as A1111 does

and with "seed resize from" (W0, H0) both noises are drawn at the latent shape (C, H0/f, W0/f) and pasted
centred into the noise the main seed draws at the target shape (cropped centrally where larger).

Reproducibility contract (see stages.py): the per-image CPU generator of the main seed makes its one
target-shape draw first, exactly as without a variation; the variation seed and the resized draws come from
fresh generators of their own. Stochastic samplers keep drawing step noise from the main seed's generator.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sdstudio.engine.requests import VARIATION_KEYS
from sdstudio.engine.sd.stages import initial_noise
from sdstudio.errors import RequestError

if TYPE_CHECKING:
    from sdstudio.engine.requests import GenerationRequest
    from sdstudio.settings import Limits

MAX_SEED = 2**63 - 1
_CPU = torch.device("cpu")


def uses_variation(req: GenerationRequest) -> bool:
    return req.variation.strength > 0


def resizes_seed(req: GenerationRequest) -> bool:
    return req.variation.resize_from_w > 0 and req.variation.resize_from_h > 0


def image_seed(req: GenerationRequest, index: int) -> int:
    """The main seed of image `index`: seed + index, or `seed` for every image of a variation (A1111)."""
    return req.seed if uses_variation(req) else req.seed + index


def image_subseed(req: GenerationRequest, index: int) -> int:
    return req.variation.seed + index


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation of two (C, h, w) noises, A1111's `slerp` to the letter.

    Like A1111 it normalises along dim 1 of the unbatched tensor (so per channel and column: the angle
    omega has shape (C, w)), and where the noises are nearly parallel (mean cos > 0.9995) it falls back
    to A1111's linear mix `low * val + high * (1 - val)`. Both quirks are kept so images match A1111's.
    val 0 gives `low` and val 1 gives `high` exactly.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)  # (C, w)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def paste_centred(target: Tensor, source: Tensor) -> Tensor:
    """A1111's seed resize: `source` (C, h0, w0) into the centre of a copy of `target` (C, h, w).

    dx = (w - w0) // 2 (likewise dy); where the source is larger it is cropped by -dx on the left/top."""
    out = target.clone()
    dx = (target.shape[2] - source.shape[2]) // 2
    dy = (target.shape[1] - source.shape[1]) // 2
    w = source.shape[2] if dx >= 0 else source.shape[2] + 2 * dx
    h = source.shape[1] if dy >= 0 else source.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out[:, ty:ty + h, tx:tx + w] = source[:, sy:sy + h, sx:sx + w]
    return out


def _draw(seed: int, shape: tuple[int, ...]) -> Tensor:
    """The first (C, h, w) draw of a fresh CPU generator: the same numbers as randn((1, C, h, w))."""
    return torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(seed)))[0]


def start_noise(seeds: Sequence[int], generators: Sequence[torch.Generator], req: GenerationRequest, first: int,
                shape: tuple[int, int, int], factor: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(B, C, h, w) start noise of images first .. first+B-1; plain `initial_noise` without a variation.

    seeds/generators: the images' main seeds and their CPU generators (each draws its target shape here).
    """
    noise = initial_noise(generators, shape, _CPU, torch.float32)  # the main seeds' first draws
    if not uses_variation(req) and not resizes_seed(req):
        return noise.to(device=device, dtype=dtype)
    from_shape = (shape[0], req.variation.resize_from_h // factor, req.variation.resize_from_w // factor) \
        if resizes_seed(req) else shape
    rows = []
    for k, (seed, target) in enumerate(zip(seeds, noise, strict=True)):
        x = target if from_shape == shape else _draw(seed, from_shape)
        if uses_variation(req):
            x = slerp(float(req.variation.strength), x, _draw(image_subseed(req, first + k), from_shape))
        rows.append(x if from_shape == shape else paste_centred(target, x))
    return torch.stack(rows).to(device=device, dtype=dtype)


def check_variation(req: GenerationRequest, limits: Limits) -> None:
    """Checks that need no model: the variation seed, its strength, and a resize given as a pair."""
    variation = req.variation
    strength = variation.strength
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 <= strength <= 1.0:
        raise RequestError(f"subseed_strength must be between 0 and 1, got {strength!r}", "subseed_strength")
    subseed = variation.seed
    if isinstance(subseed, bool) or not isinstance(subseed, int) or not -1 <= subseed <= MAX_SEED - req.total_images:
        raise RequestError(f"subseed must be a whole number between -1 (random) and {MAX_SEED - req.total_images}, "
                           f"got {subseed!r}", "subseed")
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        value = getattr(variation, VARIATION_KEYS[name])
        if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or
                                                                       limits.min_side <= value <= limits.max_side):
            raise RequestError(f"{name} must be 0 (off) or between {limits.min_side} and {limits.max_side}, "
                               f"got {value!r}", name)
    if (variation.resize_from_w > 0) != (variation.resize_from_h > 0):
        raise RequestError("seed resize needs both a width and a height (or neither), got "
                           f"{variation.resize_from_w}x{variation.resize_from_h}", "seed_resize_from_w")


def resolve_variation(req: GenerationRequest, factor: int) -> GenerationRequest:
    """Check the resize against the latent factor and fix a random (-1) variation seed, when one is used."""
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        value = getattr(req.variation, VARIATION_KEYS[name])
        if value % factor:
            raise RequestError(f"{name} must be a multiple of {factor}, got {value} "
                               f"(nearest: {value // factor * factor or factor})", name)
    if uses_variation(req) and req.variation.seed == -1:
        return req.replace(subseed=random.randrange(2**32))
    return req
