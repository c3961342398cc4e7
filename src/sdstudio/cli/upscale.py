"""The upscale command: a resampler or the SD x4 upscaler model on one image, saved as A1111's extras do."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdstudio.cli.common import err, fail, quiet_libraries, settings_from
from sdstudio.cli.generate import Negative, Out, overrides, with_progress
from sdstudio.errors import SdStudioError
from sdstudio.storage.images import open_image

Upscaler = Annotated[str, typer.Option(
    "--upscaler", "-u", help="Lanczos, Nearest, Bilinear or Bicubic; or an x4 upscaler model "
                             "(a name in the model folders, or a diffusers folder).")]
Scale = Annotated[float, typer.Option("--scale", "-s", help="Scale factor (1-8; the x4 model: 1-4).")]
Prompt = Annotated[str | None, typer.Option("--prompt", "-p", help="What the image shows (x4 model only).")]
NoiseLevel = Annotated[int | None, typer.Option("--noise-level", help="Noise added to the input before upscaling, "
                                                                      "0-350 (x4 model only; default 20).")]
Steps = Annotated[int | None, typer.Option("--steps", help="Sampling steps (x4 model only; default 20).")]
Cfg = Annotated[float | None, typer.Option("--cfg", help="Guidance scale (x4 model only; default 9).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed (x4 model only; default -1: random).")]


def upscale(ctx: typer.Context,
            image: Annotated[Path, typer.Argument(help="The image to upscale.")],
            scale: Scale = 4.0, upscaler: Upscaler = "Lanczos", prompt: Prompt = None, negative: Negative = None,
            steps: Steps = None, cfg: Cfg = None, noise_level: NoiseLevel = None, seed: Seed = None,
            out: Out = None) -> None:
    """Upscale an image with a resampler or the Stable Diffusion x4 upscaler; saved under extras-images."""
    from sdstudio.engine.engine import Engine
    from sdstudio.engine.pipelines.upscale import UpscaleRequest, resampler, save_upscale

    model_only = overrides(prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg,
                           noise_level=noise_level, seed=seed)
    if resampler(upscaler) and model_only:
        flags = {"prompt": "--prompt", "negative_prompt": "--negative", "steps": "--steps", "cfg_scale": "--cfg",
                 "noise_level": "--noise-level", "seed": "--seed"}
        verb = "applies" if len(model_only) == 1 else "apply"
        fail(f"{', '.join(flags[k] for k in model_only)} {verb} only to an x4 upscaler model; "
             f"{resampler(upscaler)} is a plain resampler")
    try:
        picture = open_image(image)
    except SdStudioError as e:
        fail(str(e))
    request = UpscaleRequest(image=picture, scale=scale, upscaler=upscaler, **model_only)
    settings = settings_from(ctx.obj, out)
    quiet_libraries()
    result = with_progress(lambda bar: Engine(settings).upscale(request, progress=bar.on_event))
    typer.echo(str(save_upscale(result, settings.outputs_dir)))
    (w, h), (w2, h2) = picture.size, result.image.size
    seed_note = f", seed {result.seed}" if result.seed is not None else ""
    err.print(f"[dim]{w}x{h} -> {w2}x{h2} with {result.request.upscaler}{seed_note}, {result.seconds:.2f} s[/dim]")
