"""`sdstudio xyz`: the X/Y/Z plot door. Saves every image as txt2img/img2img would, and one labelled grid
per Z value into <outputs>/<mode>-grids/<date>/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdstudio.cli.common import err, fail, quiet_libraries, settings_from
from sdstudio.cli.generate import (
    Cfg,
    ClipSkip,
    Height,
    Model,
    Negative,
    Out,
    Rescale,
    Sampler,
    Schedule,
    Seed,
    SeedResize,
    StepProgress,
    Steps,
    Subseed,
    SubseedStrength,
    Syntax,
    Vae,
    Width,
    build_request,
    overrides,
    seed_resize,
    with_progress,
)
from sdstudio.errors import SdStudioError

AXES = ("seed, subseed, subseed_strength, steps, cfg, sampler, schedule, strength (denoising), clip_skip, "
        "prompt_sr, width, height, size (WxH), model, vae, guidance_rescale, guidance, pag_scale (pag), eta")
AXIS_HELP = (f"Axis 'name=v1,v2,...'; names: {AXES}. Numbers take ranges: 1-5, 1-10 (+2), 1-10 [4]. "
             "prompt_sr=a,b,c replaces 'a' in the prompt by each value.")


def xyz(ctx: typer.Context,
        prompt: Annotated[str, typer.Argument(help="What to draw.")],
        x: Annotated[str, typer.Option("--x", help=f"Columns. {AXIS_HELP}")],
        y: Annotated[str | None, typer.Option("--y", help="Rows (same form as --x).")] = None,
        z: Annotated[str | None, typer.Option("--z", help="One grid per value (same form as --x).")] = None,
        image: Annotated[Path | None, typer.Option("--image", help="Init image: plot img2img instead.")] = None,
        strength: Annotated[float | None, typer.Option(help="Denoising strength 0-1 with --image.")] = None,
        negative: Negative = None, model: Model = None, steps: Steps = None, cfg: Cfg = None,
        sampler: Sampler = None, schedule: Schedule = None, seed: Seed = None, width: Width = None,
        height: Height = None, out: Out = None, prompt_syntax: Syntax = None, clip_skip: ClipSkip = None,
        vae: Vae = None, guidance_rescale: Rescale = None, subseed: Subseed = None,
        subseed_strength: SubseedStrength = None, seed_resize_from: SeedResize = None) -> None:
    """X/Y/Z plot: vary settings along up to three axes; saves the images and a labelled grid."""
    from sdstudio.engine.engine import Engine
    from sdstudio.engine.workflows.xyz import XYZResult, build_plan, run_xyz, save_xyz
    from sdstudio.storage.images import open_image

    fields = overrides(prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
                       sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                       strength=strength, prompt_syntax=prompt_syntax, clip_skip=clip_skip, vae=vae,
                       guidance_rescale=guidance_rescale, subseed=subseed, subseed_strength=subseed_strength,
                       **seed_resize(seed_resize_from))
    settings = settings_from(ctx.obj, out)
    try:
        if image is not None:
            fields["init_image"] = open_image(image)
        plan = build_plan(build_request({}, fields), x, y, z, settings.limits.max_images)
    except SdStudioError as e:
        fail(str(e))
    quiet_libraries()

    def run(bar: StepProgress) -> XYZResult:
        def on_progress(p) -> None:
            bar.bar.update(bar.task, completed=p.fraction * len(plan.cells), total=len(plan.cells),
                           description=f"cell {p.cell + 1}/{p.cells}")

        return run_xyz(Engine(settings), plan, progress=on_progress)

    result = with_progress(run)
    saved = save_xyz(result, settings.outputs_dir)
    for cell, images in zip(result.results, saved.cells, strict=True):
        for warning in cell.warnings:
            err.print(f"[yellow]warning:[/yellow] {warning}")
        for image in images:
            typer.echo(str(image.path))
    for grid in saved.grids:
        typer.echo(str(grid))
    err.print(f"[dim]{len(plan.cells)} cell(s) in {len(result.grids)} grid(s), seed {plan.base.seed}[/dim]")
