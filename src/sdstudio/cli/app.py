"""The command-line door: parses options into a GenerationRequest and hands it to the engine.

Bad input prints one line saying what to fix and exits with status 2; no traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from sdstudio import __version__
from sdstudio.cli import guidance as addon
from sdstudio.cli.common import GlobalOptions, fail, quiet_libraries, settings_from
from sdstudio.cli.control import ControlNetOpt, IpAdapterOpt, control_units, ip_adapter_units
from sdstudio.cli.generate import (
    Batch,
    CaptureEvery,
    Cfg,
    ClipSkip,
    DistilledCfg,
    FromImage,
    Height,
    Hires,
    HrDenoise,
    HrScale,
    HrSteps,
    HrUpscaler,
    Model,
    Negative,
    NIter,
    Out,
    Rescale,
    Sampler,
    Schedule,
    Seed,
    SeedResize,
    Shift,
    StepProgress,
    Steps,
    Subseed,
    SubseedStrength,
    Syntax,
    Vae,
    Width,
    ZeroSnr,
    build_request,
    fields_from_image,
    overrides,
    run_request,
    seed_resize,
)
from sdstudio.cli.inpaint import inpaint, outpaint
from sdstudio.cli.models import app as models_app
from sdstudio.cli.prompt import app as prompt_app
from sdstudio.cli.serve import serve
from sdstudio.cli.train import app as train_app
from sdstudio.cli.upscale import upscale
from sdstudio.cli.xyz import xyz
from sdstudio.engine.record import image_fields
from sdstudio.errors import SdStudioError
from sdstudio.samplers import SAMPLERS, SCHEDULE_TYPES
from sdstudio.storage.images import open_image
from sdstudio.storage.results import read_metadata

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sdstudio: Stable Diffusion from the command line.")
app.add_typer(train_app, name="train")
app.add_typer(models_app, name="models")
app.add_typer(prompt_app, name="prompt")

@app.callback()
def setup(
    ctx: typer.Context,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps or auto.", envvar="SDSTUDIO_DEVICE")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16.", envvar="SDSTUDIO_DTYPE")] = "auto",
    prediction: Annotated[str | None, typer.Option(help="epsilon or v_prediction: for SD 2.x single files whose "
                                               "type cannot be detected.")] = None,
    offload: Annotated[str, typer.Option(help="none, model or sequential: CPU offload for small GPUs.",
                                     envvar="SDSTUDIO_OFFLOAD")] = "none",
    vae_tiling: Annotated[str, typer.Option(help="auto, on or off: tiled VAE for large images.",
                                        envvar="SDSTUDIO_VAE_TILING")] = "auto",
    compile: Annotated[str, typer.Option(help="none, unet or unet+vae: torch.compile (slow first image; pays off "
                                         "over many images).", envvar="SDSTUDIO_COMPILE")] = "none",
    compile_mode: Annotated[str, typer.Option(help="default, reduce-overhead (CUDA graphs) or max-autotune.",
                                              envvar="SDSTUDIO_COMPILE_MODE")] = "default",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the engine does.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                      callback=lambda v: _print_version(v))] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    ctx.obj = GlobalOptions(device, dtype, prediction, offload, vae_tiling, compile, compile_mode)


def _print_version(requested: bool) -> None:
    if requested:
        typer.echo(f"sdstudio {__version__}")
        raise typer.Exit()


@app.command()
def txt2img(ctx: typer.Context,
            prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
            negative: Negative = None, model: Model = None, steps: Steps = None, cfg: Cfg = None,
            distilled_cfg: DistilledCfg = None, shift: Shift = None,
            sampler: Sampler = None, schedule: Schedule = None, seed: Seed = None, width: Width = None,
            height: Height = None, batch_size: Batch = None, n_iter: NIter = None, out: Out = None,
            capture_every: CaptureEvery = None, prompt_syntax: Syntax = None, clip_skip: ClipSkip = None,
            vae: Vae = None, guidance_rescale: Rescale = None, zero_terminal_snr: ZeroSnr = None,
            from_image: FromImage = None, subseed: Subseed = None, subseed_strength: SubseedStrength = None,
            seed_resize_from: SeedResize = None, hires: Hires = None, hr_scale: HrScale = None,
            hr_upscaler: HrUpscaler = None, hr_steps: HrSteps = None, hr_denoise: HrDenoise = None,
            freeu: addon.FreeU = None, pag: addon.Pag = None, pag_layers: addon.PagLayers = None,
            guidance: addon.Guidance = None, apg_eta: addon.ApgEta = None,
            apg_norm_threshold: addon.ApgThreshold = None, apg_momentum: addon.ApgMomentum = None,
            preset: addon.PresetOpt = None, eta: addon.Eta = None, controlnet: ControlNetOpt = None,
            ip_adapter: IpAdapterOpt = None) -> None:
    """Generate images from a prompt."""
    if hires is None and any(v is not None for v in (hr_scale, hr_upscaler, hr_steps, hr_denoise)):
        hires = True  # an --hr-* option asks for the hires fix
    fields = overrides(prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
                       distilled_cfg_scale=distilled_cfg, shift=shift,
                       sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                       batch_size=batch_size, n_iter=n_iter, capture_every=capture_every,
                       prompt_syntax=prompt_syntax, clip_skip=clip_skip, vae=vae,
                       guidance_rescale=guidance_rescale, zero_terminal_snr=zero_terminal_snr,
                       subseed=subseed, subseed_strength=subseed_strength, **seed_resize(seed_resize_from),
                       enable_hr=hires, hr_scale=hr_scale, hr_upscaler=hr_upscaler, hr_second_pass_steps=hr_steps,
                       strength=hr_denoise, **control_units(controlnet), **ip_adapter_units(ip_adapter),
                       **addon.add_on_fields(freeu, pag, pag_layers, guidance, apg_eta, apg_norm_threshold,
                                             apg_momentum),
                       eta=eta)
    base = addon.preset_base(preset, fields_from_image(from_image) if from_image else {})
    if not base.get("enable_hr"):
        base.pop("strength", None)  # an img2img's strength; with hires fix it is the second pass's
    run_request(ctx.obj, build_request(base, fields), out, preset)


@app.command()
def img2img(ctx: typer.Context,
            image: Annotated[Path, typer.Argument(help="The init image.")],
            prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
            strength: Annotated[float | None, typer.Option(help="Denoising strength 0-1. (default: 0.75)")] = None,
            negative: Negative = None, model: Model = None, steps: Steps = None, cfg: Cfg = None,
            distilled_cfg: DistilledCfg = None, shift: Shift = None,
            sampler: Sampler = None, schedule: Schedule = None, seed: Seed = None, width: Width = None,
            height: Height = None, batch_size: Batch = None, n_iter: NIter = None, out: Out = None,
            capture_every: CaptureEvery = None, prompt_syntax: Syntax = None, clip_skip: ClipSkip = None,
            vae: Vae = None, guidance_rescale: Rescale = None, zero_terminal_snr: ZeroSnr = None,
            from_image: FromImage = None, subseed: Subseed = None, subseed_strength: SubseedStrength = None,
            seed_resize_from: SeedResize = None, controlnet: ControlNetOpt = None, ip_adapter: IpAdapterOpt = None,
            freeu: addon.FreeU = None, pag: addon.Pag = None, pag_layers: addon.PagLayers = None,
            guidance: addon.Guidance = None, apg_eta: addon.ApgEta = None,
            apg_norm_threshold: addon.ApgThreshold = None, apg_momentum: addon.ApgMomentum = None,
            preset: addon.PresetOpt = None, eta: addon.Eta = None) -> None:
    """Redraw an image guided by a prompt; low strength stays close to the input."""
    fields = overrides(prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
                       distilled_cfg_scale=distilled_cfg, shift=shift,
                       sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                       batch_size=batch_size, n_iter=n_iter, capture_every=capture_every, strength=strength,
                       prompt_syntax=prompt_syntax, clip_skip=clip_skip, vae=vae,
                       guidance_rescale=guidance_rescale, zero_terminal_snr=zero_terminal_snr,
                       subseed=subseed, subseed_strength=subseed_strength, **seed_resize(seed_resize_from),
                       **control_units(controlnet), **ip_adapter_units(ip_adapter),
                       **addon.add_on_fields(freeu, pag, pag_layers, guidance, apg_eta, apg_norm_threshold,
                                             apg_momentum),
                       eta=eta)
    base = addon.preset_base(preset, fields_from_image(from_image) if from_image else {})
    try:
        init = open_image(image)
    except SdStudioError as e:
        fail(str(e))
    run_request(ctx.obj, build_request(base, {**fields, "init_image": init}), out, preset)


app.command()(inpaint)
app.command()(outpaint)
app.command()(serve)
app.command()(upscale)
app.command("xyz")(xyz)


@app.command()
def info(image: Annotated[Path, typer.Argument(help="A PNG made by sdstudio or AUTOMATIC1111.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print the parsed request as JSON.")] = False) -> None:
    """Print the generation parameters stored in an image."""
    try:
        meta = read_metadata(image)
    except SdStudioError as e:
        fail(str(e))
    if meta.infotext is None and meta.record is None:
        fail(f"{image} has no generation parameters (no 'parameters' or 'sdstudio' text chunk)")
    if as_json:
        typer.echo(json.dumps({"infotext": meta.infotext, "request": image_fields(meta),
                           "record": meta.record}, indent=2))
        return
    if meta.infotext:
        typer.echo(meta.infotext)
        typer.echo("")
    for key, value in image_fields(meta).items():
        typer.echo(f"{key:>16}: {value}")
    if meta.record:
        env = meta.record.get("environment", {})
        typer.echo(f"{'environment':>16}: " + ", ".join(f"{k} {v}" for k, v in env.items()))


@app.command()
def samplers() -> None:
    """List the samplers and the schedule types each supports."""
    for s in SAMPLERS:
        native = f"{s.scheduler_class} for {', '.join(('Automatic', *s.native))}" if s.scheduler_class else ""
        rest = "the rest" if s.scheduler_class else "every schedule type"
        ours = f"our k-diffusion steps for {rest}" if s.ksampler else "its own timesteps for the rest"
        automatic = "model's own" if s.default_schedule == "Automatic" else s.default_schedule
        typer.echo(f"{s.name:<18} Automatic = {automatic:<12} {'; '.join(x for x in (native, ours) if x)}")
    typer.echo(f"\nSchedule types (every sampler takes each): {', '.join(SCHEDULE_TYPES)}")


@app.command("eval-demo")
def eval_demo(ctx: typer.Context, model: Model = None,
              per_triple: Annotated[int, typer.Option(help="Images per held-out combination.")] = 4,
              steps: Annotated[int | None, typer.Option(help="Sampling steps. (default: 20, or the preset's)")] = None,
              seed: Annotated[int, typer.Option(help="First seed.")] = 0, preset: addon.PresetOpt = None,
              sheet: Annotated[Path | None, typer.Option(help="Save a contact sheet of the images here.")] = None,
              check: Annotated[bool, typer.Option(help="Exit 1 if an accuracy is below its target.")] = False) -> None:
    """Score a shapes model on caption combinations it never saw in training."""
    from sdstudio.engine.engine import Engine
    from sdstudio.train.evaluate import TARGETS, contact_sheet, evaluate

    engine = Engine(settings_from(ctx.obj, None))
    quiet_libraries()
    with StepProgress() as bar:
        try:
            report = evaluate(engine, model, per_triple, steps, seed,
                          on_image=lambda done, total: bar.advance(done, total), preset=preset)
        except SdStudioError as e:
            fail(str(e))
    typer.echo(f"{report.count} images from held-out combinations, {report.steps} steps"
               + (f", preset {preset}" if preset else ""))
    failed = False
    for attribute, target in TARGETS.items():
        acc = report.accuracy(attribute)
        failed |= acc < target
        typer.echo(f"{attribute:>10}: {acc:6.1%}  (target {target:.0%}) {'ok' if acc >= target else 'BELOW TARGET'}")
    if sheet:
        contact_sheet(report.images).save(sheet)
        typer.echo(str(sheet))
    if check and failed:
        raise typer.Exit(1)



def main() -> None:
    app(prog_name="sdstudio")
