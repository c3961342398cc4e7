"""ControlNet units in the one loop: control images prepared per request, residuals added per step.

A ControlNet (Zhang et al. 2023) maps (x_t, t, text, control image) to residuals for each UNet skip
connection and the middle block; several units add up. Unit j is active at evaluation i of N when
start_j <= i / N and (i + 1) / N <= end_j, as diffusers' control_guidance_start/end. Guess mode
(A1111's "ControlNet is more important") runs the ControlNet on the conditional rows only, gives the
unconditional rows zero residuals, and scales the 13 residuals by logspace(-1, 0) (inside diffusers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdstudio.engine.requests import ControlUnit
from sdstudio.engine.sd.preprocess import canny, preprocess
from sdstudio.engine.sd.rows import per_image
from sdstudio.errors import RequestError
from sdstudio.pictures import fit
from sdstudio.prompts.conditioning import GuidedConditioning, TextConditioning

RESIZE_MODES = ("just resize", "crop", "fill")  # stretch; cover and centre-crop; fit and pad


@dataclass(frozen=True)
class ControlInput:
    """One unit ready for the loop."""

    model: Any        # diffusers ControlNetModel on the UNet's device and dtype
    image: Tensor     # (1, 3, H, W) control image, [0, 1] (the inpaint control has -1 where masked)
    scale: float
    start: float
    end: float
    guess_mode: bool

    def scale_at(self, i: int, total: int) -> float:
        return 0.0 if i / total < self.start or (i + 1) / total > self.end else self.scale


@dataclass(frozen=True)
class LoadedControl:
    """A unit's ControlNet as loaded for the job, and how the infotext names it."""

    model: Any
    name: str
    hash: str


def infotext_units(units: Sequence[ControlUnit], loaded: Sequence[LoadedControl]) -> list[dict[str, Any]]:
    """What A1111's ControlNet infotext states of each unit (a1111/extras.py writes it)."""
    return [{"preprocessor": unit.preprocessor, "name": net.name, "hash": net.hash, "weight": unit.weight,
             "resize_mode": unit.resize_mode, "start": unit.start, "end": unit.end, "guess_mode": unit.guess_mode}
            for unit, net in zip(units, loaded, strict=True)]




def control_image(unit: ControlUnit, width: int, height: int, init: Image.Image | None,
                  mask: Image.Image | None, annotators: Path | None = None) -> Image.Image | Tensor:
    """The unit's control image at the output size, preprocessed; the inpaint control as a tensor.
    annotators: the folder of pose/depth annotator weights."""
    if unit.preprocessor == "inpaint":
        if init is None or mask is None:
            raise RequestError("the inpaint preprocessor needs an init image and a mask (inpainting)", "controlnets")
        pixels = np.asarray(fit(init, width, height, "just resize"), np.float32) / 255.0       # (H, W, 3)
        masked = np.asarray(mask.convert("L").resize((width, height)), np.float32) / 255.0 > 0.5
        pixels[masked] = -1.0  # masked pixels, as the inpaint ControlNet was trained (seed 000)
        return torch.from_numpy(pixels).permute(2, 0, 1)[None]
    source = unit.image if unit.image is not None else init
    if source is None:
        raise RequestError("a ControlNet unit needs a control image (or an init image to take it from)",
                           "controlnets")
    fitted = fit(source, width, height, unit.resize_mode)
    return preprocess_control(fitted, unit.preprocessor, unit.low_threshold, unit.high_threshold, annotators)


def preprocess_control(image: Image.Image, preprocessor: str, low_threshold: int = 100, high_threshold: int = 200,
                       annotators: Path | None = None) -> Image.Image:
    """A unit's preprocessor applied to its (already fitted) picture; canny takes the unit's thresholds."""
    if preprocessor == "canny":
        return canny(image, low_threshold, high_threshold)
    return preprocess(preprocessor, image, annotators)


def to_tensor(image: Image.Image | Tensor) -> Tensor:
    if isinstance(image, Tensor):
        return image
    return torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)[None]


def _positives(cond: GuidedConditioning) -> TextConditioning:
    out = cond.positives[0]
    for p in cond.positives[1:]:
        out = out.cat(p)
    return out


def residuals(controls: Sequence[ControlInput], x_in: Tensor, t: Tensor, cond: GuidedConditioning, guided: bool,
              batch: int, i: int, total: int, between: Callable[[], None] | None = None,
              images: int = 1) -> dict[str, Any]:
    """UNet kwargs with the summed residuals of the active units for one evaluation; {} when none is.

    x_in: ((k+1)B | B, C, h, w) the scaled model input, 4 latent channels (9-channel inpainting UNets
    take their extra channels; the ControlNet does not). `between` runs before each unit (a cancel check);
    images > 1: each unit runs image by image (rows.py)."""
    down: list[Tensor] | None = None
    mid: Tensor | None = None
    for unit in controls:
        if between is not None:
            between()
        scale = unit.scale_at(i, total)
        if scale == 0.0:
            continue
        cond_only = guided and unit.guess_mode
        x_c = x_in[batch:] if cond_only else x_in
        context = _positives(cond) if cond_only else (cond.cfg_batch if guided else cond.positive)
        image = unit.image.expand(x_c.shape[0], -1, -1, -1)
        run = partial(unit.model, timestep=t, conditioning_scale=scale, guess_mode=unit.guess_mode, return_dict=False)
        d, m = per_image(run, x_c, {"controlnet_cond": image, **context.unet_kwargs()}, images)
        if cond_only:  # zero residuals for the unconditional rows
            d = [torch.cat([torch.zeros_like(r[:batch]), r]) for r in d]
            m = torch.cat([torch.zeros_like(m[:batch]), m])
        down = list(d) if down is None else [a + b for a, b in zip(down, d, strict=True)]
        mid = m if mid is None else mid + m
    if down is None:
        return {}
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
