"""ControlNets for SD3 and Flux: diffusers' SD3ControlNetModel and FluxControlNetModel (InstantX, Shakker-Labs Union
and Union-Pro, Alimama...), as diffusers folders, in the one flow loop.

A unit's picture is fitted and preprocessed as for Stable Diffusion (engine/sd/control.py), encoded by the model's
VAE (posterior mean, shifted and scaled; Flux packs it 2x2 like the latents) and handed to its ControlNet at every
step where the unit is active (start <= i / N and (i + 1) / N <= end, as diffusers). The ControlNet returns residuals
for the transformer's blocks; several units add up:
    Flux   controlnet_block_samples (double blocks), controlnet_single_block_samples (single blocks)
    SD3    block_controlnet_hidden_states
A Union ControlNet (its config has `num_mode`) is told what its picture is by a mode, taken from the unit's
preprocessor: canny 0, tile 1, depth 2, blur 3, openpose 4, gray 5 (the InstantX/Shakker-Labs numbering).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdstudio.engine.flow.encode import FlowConditioning
from sdstudio.engine.flow.latents import pack
from sdstudio.engine.requests import ControlUnit
from sdstudio.engine.sd.control import control_image, to_tensor
from sdstudio.engine.sd.stages import image_processor
from sdstudio.errors import RequestError
from sdstudio.models.load.controlnet import controlnet_family
from sdstudio.models.load.flow import FlowModel
from sdstudio.models.load.memory import device_of

UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "openpose": 4, "gray": 5}


@dataclass(frozen=True)
class FlowControl:
    """One unit ready for the loop."""

    model: Any          # FluxControlNetModel | SD3ControlNetModel on the transformer's device and dtype
    cond: Tensor        # Flux: (1, tokens, 64) packed latents; SD3: (1, 16, h, w)
    scale: float
    start: float
    end: float
    mode: int | None    # a Union ControlNet's control type

    def scale_at(self, i: int, total: int) -> float:
        return 0.0 if i / total < self.start or (i + 1) / total > self.end else self.scale


class FlowControlNets:
    """Loaded flow ControlNets, a few at a time, keyed by folder, modification time, device and dtype."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._loaded: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, path: Path, model: FlowModel) -> Any:
        from diffusers import FluxControlNetModel, SD3ControlNetModel

        family = controlnet_family(path) if path.is_dir() else None
        if family != model.family:
            kind = {"flux": "Flux", "sd3": "SD3"}.get(str(family), "Stable Diffusion")
            raise RequestError(f"the ControlNet {path.name} is for {kind} models; {model.name} is "
                               f"{'Flux' if model.family == 'flux' else 'SD3'}", "controlnets")
        device, dtype = device_of(model.transformer), model.transformer.dtype
        key = (str(path.resolve()), (path / "config.json").stat().st_mtime_ns, str(device), str(dtype))
        if key not in self._loaded:
            cls = FluxControlNetModel if family == "flux" else SD3ControlNetModel
            net = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
            if family == "flux" and net.input_hint_block is not None:
                raise RequestError(f"{path.name} is an XLabs-style Flux ControlNet (pixel hint encoder), which "
                                   "sdstudio does not run yet; use an InstantX/Shakker-Labs style one", "controlnets")
            self._loaded[key] = net.to(device).eval().requires_grad_(False)
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return self._loaded[key]


@torch.inference_mode()
def prepare(model: FlowModel, unit: ControlUnit, net: Any, width: int, height: int, init: Any, mask: Any,
            annotators: Path | None) -> FlowControl:
    """The unit's picture as its ControlNet reads it."""
    picture = control_image(unit, width, height, init, mask, annotators)
    if isinstance(picture, Tensor):
        raise RequestError("the inpaint preprocessor is for Stable Diffusion's inpaint ControlNet; SD3 and Flux "
                           "inpaint ControlNets are not supported yet", "controlnets")
    pixels = image_processor(model.factor).preprocess(to_tensor(picture), height=height, width=width)  # [-1, 1]
    vae = model.vae
    mean = vae.encode(pixels.to(device_of(vae), vae.dtype)).latent_dist.mode()
    # InstantX's SD3 ControlNets were trained without the VAE's shift (diffusers: force_zeros_for_pooled_projection)
    shift = 0.0 if getattr(net.config, "force_zeros_for_pooled_projection", False) else vae.config.shift_factor
    z = (mean - shift) * vae.config.scaling_factor
    cond = pack(z) if model.family == "flux" else z
    mode = None
    if getattr(net.config, "num_mode", None):
        if unit.preprocessor not in UNION_MODES:
            raise RequestError(f"{unit.model} is a Union ControlNet: its preprocessor names the control type, one "
                               f"of {', '.join(UNION_MODES)}; got {unit.preprocessor!r}", "controlnets")
        mode = UNION_MODES[unit.preprocessor]
    dtype = model.transformer.dtype
    return FlowControl(net, cond.to(device_of(model.transformer), dtype), float(unit.weight), float(unit.start),
                       float(unit.end), mode)


def flux_residuals(controls: list[FlowControl], x: Tensor, t: Tensor, c: FlowConditioning, guidance: float | None,
                   txt_ids: Tensor, img_ids: Tensor, i: int, total: int) -> dict[str, Any]:
    """Transformer kwargs with the summed residuals of the active Flux units; {} when none is."""
    blocks: list[Tensor] | None = None
    singles: list[Tensor] | None = None
    rows = x.shape[0]
    for unit, scale in active(controls, i, total):
        net = unit.model
        g = torch.full((rows,), float(guidance), device=x.device, dtype=x.dtype) \
            if guidance is not None and net.config.guidance_embeds else None
        mode = None if unit.mode is None else torch.full((rows, 1), unit.mode, device=x.device, dtype=torch.long)
        b, s = net(hidden_states=x, controlnet_cond=unit.cond.expand(rows, -1, -1), controlnet_mode=mode,
                   conditioning_scale=scale, timestep=t, guidance=g, pooled_projections=c.pooled,
                   encoder_hidden_states=c.context, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
        blocks = _add(blocks, b)
        singles = _add(singles, s)
    if blocks is None and singles is None:
        return {}
    return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
            "controlnet_blocks_repeat": False}


def sd3_residuals(controls: list[FlowControl], x: Tensor, t: Tensor, c: FlowConditioning, i: int,
                  total: int) -> dict[str, Any]:
    """Transformer kwargs with the summed residuals of the active SD3 units; {} when none is."""
    blocks: list[Tensor] | None = None
    rows = x.shape[0]
    for unit, scale in active(controls, i, total):
        net = unit.model
        pooled = torch.zeros_like(c.pooled) if net.config.force_zeros_for_pooled_projection else c.pooled
        context = c.context if net.config.joint_attention_dim is not None else None
        out = net(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled,
                  controlnet_cond=unit.cond.expand(rows, -1, -1, -1), conditioning_scale=scale, return_dict=False)[0]
        blocks = _add(blocks, out)
    return {} if blocks is None else {"block_controlnet_hidden_states": blocks}


def active(controls: list[FlowControl], i: int, total: int) -> Iterator[tuple[FlowControl, float]]:
    """The units acting at step i of `total`, with their scales."""
    for unit in controls:
        scale = unit.scale_at(i, total)
        if scale != 0.0:
            yield unit, scale


def _add(total: list[Tensor] | None, more: Any) -> list[Tensor] | None:
    if more is None:
        return total
    more = list(more)
    return more if total is None else [a + b for a, b in zip(total, more, strict=True)]
