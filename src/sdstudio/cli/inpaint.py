"""The inpainting and outpainting commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sdstudio.cli import guidance as addon
from sdstudio.cli.common import fail
from sdstudio.cli.control import ControlNetOpt, IpAdapterOpt, control_units, ip_adapter_units
from sdstudio.cli.generate import (
    Batch,
    CaptureEvery,
    Cfg,
    ClipSkip,
    DistilledCfg,
    Height,
    Model,
    Negative,
    NIter,
    Out,
    Sampler,
    Schedule,
    Seed,
    Shift,
    Steps,
    Syntax,
    Vae,
    Width,
    build_request,
    overrides,
    run_request,
)
from sdstudio.errors import SdStudioError
from sdstudio.storage.images import open_image

Strength = Annotated[float | None, typer.Option(help="Denoising strength 0-1. (default: 0.75; outpaint 0.9)")]
MaskBlur = Annotated[int | None, typer.Option(help="Mask blur radius in pixels; also the paste-back feather. "
                                                   "(default: 4)")]
KeepUnmasked = Annotated[bool | None, typer.Option("--keep-unmasked/--no-keep-unmasked",
                                                   help="Paste the result back so pixels outside the mask stay "
                                                        "exactly as given. (default: keep)")]
Method = Annotated[str | None, typer.Option("--method", help="auto, condition (9-channel inpainting checkpoints) or "
                                                             "blend (any checkpoint). (default: auto)")]


def inpaint(ctx: typer.Context,
            image: Annotated[Path, typer.Argument(help="The image to repaint part of.")],
            mask: Annotated[Path, typer.Argument(help="White where the image is repainted, black where it is kept.")],
            prompt: Annotated[str | None, typer.Argument(help="What to draw in the masked part.")] = None,
            strength: Strength = None, mask_blur: MaskBlur = None,
            invert: Annotated[bool | None, typer.Option("--invert", help="Repaint the black part instead.")] = None,
            fill: Annotated[str | None, typer.Option("--fill", help="Masked content: fill, original, 'latent noise' "
                                                                    "or 'latent nothing'. (default: original)")] = None,
            only_masked: Annotated[bool | None, typer.Option(
                "--only-masked", help="Generate only the mask's box (plus padding) at the full resolution, "
                                      "then scale it back into the image.")] = None,
            padding: Annotated[int | None, typer.Option(help="Context pixels around the mask's box for "
                                                             "--only-masked. (default: 32)")] = None,
            keep_unmasked: KeepUnmasked = None,
            soft: Annotated[bool | None, typer.Option("--soft", help="Soft inpainting: grey mask values are "
                                                                     "per-pixel strengths.")] = None,
            method: Method = None, controlnet: ControlNetOpt = None, ip_adapter: IpAdapterOpt = None,
            negative: Negative = None, model: Model = None, steps: Steps = None, cfg: Cfg = None,
            distilled_cfg: DistilledCfg = None, shift: Shift = None,
            sampler: Sampler = None, schedule: Schedule = None, seed: Seed = None, width: Width = None,
            height: Height = None, batch_size: Batch = None, n_iter: NIter = None, out: Out = None,
            capture_every: CaptureEvery = None, prompt_syntax: Syntax = None, clip_skip: ClipSkip = None,
            vae: Vae = None, freeu: addon.FreeU = None, pag: addon.Pag = None, pag_layers: addon.PagLayers = None,
            guidance: addon.Guidance = None, apg_eta: addon.ApgEta = None,
            apg_norm_threshold: addon.ApgThreshold = None, apg_momentum: addon.ApgMomentum = None,
            preset: addon.PresetOpt = None, eta: addon.Eta = None) -> None:
    """Repaint the masked part of an image: inpainting checkpoints use the mask directly, ordinary ones keep
    the unmasked part at every step."""
    fields = overrides(prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
                       distilled_cfg_scale=distilled_cfg, shift=shift,
                       sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                       batch_size=batch_size, n_iter=n_iter, capture_every=capture_every, strength=strength,
                       mask_blur=mask_blur, invert_mask=invert, masked_content=fill, only_masked=only_masked,
                       only_masked_padding=padding, keep_unmasked=keep_unmasked, soft_inpainting=soft,
                       inpaint_method=method, prompt_syntax=prompt_syntax, clip_skip=clip_skip, vae=vae,
                       **control_units(controlnet), **ip_adapter_units(ip_adapter),
                       **addon.add_on_fields(freeu, pag, pag_layers, guidance, apg_eta, apg_norm_threshold,
                                             apg_momentum),
                       eta=eta)
    pictures = {"init_image": _open(image), "mask": _open(mask)}
    run_request(ctx.obj, build_request(addon.preset_base(preset, {}), {**fields, **pictures}), out, preset)


def outpaint(ctx: typer.Context,
             image: Annotated[Path, typer.Argument(help="The image to extend.")],
             prompt: Annotated[str | None, typer.Argument(help="What the new area shows.")] = None,
             left: Annotated[int, typer.Option(help="Pixels to add on the left.")] = 0,
             right: Annotated[int, typer.Option(help="Pixels to add on the right.")] = 0,
             up: Annotated[int, typer.Option(help="Pixels to add at the top.")] = 0,
             down: Annotated[int, typer.Option(help="Pixels to add at the bottom.")] = 0,
             prefill: Annotated[str, typer.Option(help="What the new area starts from: edge (stretched border), "
                                                       "blur (blurred surrounding colour) or noise.")] = "blur",
             overlap: Annotated[int, typer.Option(help="Pixels of the original repainted along the seam.")] = 8,
             strength: Strength = None, mask_blur: MaskBlur = None, keep_unmasked: KeepUnmasked = None,
             method: Method = None,
             negative: Negative = None, model: Model = None, steps: Steps = None, cfg: Cfg = None,
            distilled_cfg: DistilledCfg = None, shift: Shift = None,
             sampler: Sampler = None, schedule: Schedule = None, seed: Seed = None,
             batch_size: Batch = None, n_iter: NIter = None, out: Out = None,
             capture_every: CaptureEvery = None, prompt_syntax: Syntax = None, clip_skip: ClipSkip = None,
             vae: Vae = None) -> None:
    """Extend an image on chosen sides and paint the new area to match it and the prompt."""
    from sdstudio.engine.workflows.outpaint import Extension, outpaint_request

    fields = overrides(prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
                       distilled_cfg_scale=distilled_cfg, shift=shift,
                       sampler=sampler, schedule=schedule, seed=seed, batch_size=batch_size, n_iter=n_iter,
                       capture_every=capture_every, strength=strength if strength is not None else 0.9,
                       mask_blur=mask_blur, keep_unmasked=keep_unmasked, inpaint_method=method,
                       prompt_syntax=prompt_syntax, clip_skip=clip_skip, vae=vae)
    picture = _open(image)
    try:
        request = outpaint_request(build_request({}, {**fields, "init_image": picture}), picture,
                                   Extension(left, right, up, down), prefill, overlap)
    except SdStudioError as e:
        fail(str(e))
    run_request(ctx.obj, request, out)


def _open(path: Path) -> Any:
    try:
        return open_image(path)
    except SdStudioError as e:
        fail(str(e))
