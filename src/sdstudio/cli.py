"""The command-line door: parses options into a GenerationRequest and hands it to the engine.

Bad input prints one line saying what to fix and exits with status 2; no traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdstudio import __version__
from sdstudio.cli_common import err, fail, quiet_libraries, settings_from
from sdstudio.cli_models import app as models_app
from sdstudio.cli_prompt import app as prompt_app
from sdstudio.cli_train import app as train_app
from sdstudio.engine.output import read_metadata, save_result
from sdstudio.engine.requests import GenerationRequest
from sdstudio.errors import SdStudioError
from sdstudio.samplers import SAMPLERS, SCHEDULE_TYPES
from sdstudio.storage.images import open_image

if TYPE_CHECKING:
    from sdstudio.engine.hooks import ProgressEvent

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sdstudio: Stable Diffusion from the command line.")
app.add_typer(train_app, name="train")
app.add_typer(models_app, name="models")
app.add_typer(prompt_app, name="prompt")

Negative = Annotated[str | None, typer.Option("--negative", "-n", help="Negative prompt.")]
Model = Annotated[str | None, typer.Option("--model", "-m", help="Model folder, or a model name.")]
Steps = Annotated[int | None, typer.Option("--steps", help="Sampling steps (1-150). [default: 20]")]
Cfg = Annotated[float | None, typer.Option("--cfg", help="Classifier-free guidance scale. [default: 7]")]
Sampler = Annotated[str | None, typer.Option("--sampler", help="Sampler, e.g. 'Euler a', 'DPM++ 2M'.")]
Schedule = Annotated[str | None, typer.Option("--schedule", help="Automatic, Karras, Exponential, ...")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed; -1 for random. [default: -1]")]
Width = Annotated[int | None, typer.Option("--width", "-W", help="Width in pixels (multiple of 8).")]
Height = Annotated[int | None, typer.Option("--height", "-H", help="Height in pixels (multiple of 8).")]
Batch = Annotated[int | None, typer.Option("--batch-size", help="Images per batch. [default: 1]")]
NIter = Annotated[int | None, typer.Option("--n-iter", help="Number of batches. [default: 1]")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Output root folder. [default: ./outputs]")]
CaptureEvery = Annotated[int | None, typer.Option("--capture-every", help="Save the denoising process every N steps.")]
Syntax = Annotated[str | None, typer.Option("--prompt-syntax", help="a1111 (weights, BREAK, [a:b:0.5], AND), "
                                                                   "compel or plain. [default: a1111]")]
ClipSkip = Annotated[int | None, typer.Option("--clip-skip", help="Skip the last N-1 text-encoder layers "
                                                                   "(A1111's Clip skip). [default: 1]")]
Vae = Annotated[str | None, typer.Option("--vae", help="VAE: auto, none (the model's own), or a VAE file name/path.")]
Rescale = Annotated[float | None, typer.Option("--guidance-rescale", help="Rescale-CFG phi, 0-1 (0.7 suits "
                                                                         "v-prediction models). [default: 0]")]
ZeroSnr = Annotated[bool | None, typer.Option("--zero-terminal-snr", help="Zero-terminal-SNR noise schedule.")]
FromImage = Annotated[Path | None, typer.Option("--from-image", help="Re-run the parameters stored in this PNG.")]


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the engine does.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=lambda v: _print_version(v))] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    ctx.obj = {"device": device, "dtype": dtype, "prediction": prediction, "offload": offload,
               "vae_tiling": vae_tiling}


def _print_version(requested: bool) -> None:
    if requested:
        typer.echo(f"sdstudio {__version__}")
        raise typer.Exit()




@app.command()
def txt2img(ctx: typer.Context,
            prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
            negative: Negative = None, model: Model = None, steps: Steps = None, cfg: Cfg = None,
            sampler: Sampler = None, schedule: Schedule = None, seed: Seed = None, width: Width = None,
            height: Height = None, batch_size: Batch = None, n_iter: NIter = None, out: Out = None,
            capture_every: CaptureEvery = None, prompt_syntax: Syntax = None, clip_skip: ClipSkip = None,
            vae: Vae = None,
            guidance_rescale: Rescale = None, zero_terminal_snr: ZeroSnr = None,
            from_image: FromImage = None) -> None:
    """Generate images from a prompt."""
    overrides = _overrides(prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
                           sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                           batch_size=batch_size, n_iter=n_iter, capture_every=capture_every,
                           prompt_syntax=prompt_syntax, clip_skip=clip_skip, vae=vae,
                           guidance_rescale=guidance_rescale,
                           zero_terminal_snr=zero_terminal_snr)
    base = _fields_from_image(from_image) if from_image else {}
    base.pop("strength", None)
    _run(ctx.obj, _request(base, overrides), out)


@app.command()
def img2img(ctx: typer.Context,
            image: Annotated[Path, typer.Argument(help="The init image.")],
            prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
            strength: Annotated[float | None, typer.Option(help="Denoising strength 0-1. [default: 0.75]")] = None,
            negative: Negative = None, model: Model = None, steps: Steps = None, cfg: Cfg = None,
            sampler: Sampler = None, schedule: Schedule = None, seed: Seed = None, width: Width = None,
            height: Height = None, batch_size: Batch = None, n_iter: NIter = None, out: Out = None,
            capture_every: CaptureEvery = None, prompt_syntax: Syntax = None, clip_skip: ClipSkip = None,
            vae: Vae = None,
            guidance_rescale: Rescale = None, zero_terminal_snr: ZeroSnr = None,
            from_image: FromImage = None) -> None:
    """Redraw an image guided by a prompt; low strength stays close to the input."""
    overrides = _overrides(prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
                           sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                           batch_size=batch_size, n_iter=n_iter, capture_every=capture_every, strength=strength,
                           prompt_syntax=prompt_syntax, clip_skip=clip_skip, vae=vae,
                           guidance_rescale=guidance_rescale,
                           zero_terminal_snr=zero_terminal_snr)
    base = _fields_from_image(from_image) if from_image else {}
    try:
        init = open_image(image)
    except SdStudioError as e:
        fail(str(e))
    _run(ctx.obj, _request(base, {**overrides, "init_image": init}), out)


@app.command()
def inpaint(ctx: typer.Context,
            image: Annotated[Path, typer.Argument(help="The image to repaint part of.")],
            mask: Annotated[Path, typer.Argument(help="White where the image is repainted, black where it is kept.")],
            prompt: Annotated[str | None, typer.Argument(help="What to draw in the masked part.")] = None,
            strength: Annotated[float | None, typer.Option(help="Denoising strength 0-1. [default: 0.75]")] = None,
            mask_blur: Annotated[int | None, typer.Option(help="Mask blur radius in pixels. [default: 4]")] = None,
            invert: Annotated[bool | None, typer.Option("--invert", help="Repaint the black part instead.")] = None,
            fill: Annotated[str | None, typer.Option("--fill", help="Masked content: fill, original, 'latent noise' "
                                                                    "or 'latent nothing'. [default: original]")] = None,
            negative: Negative = None, model: Model = None, steps: Steps = None, cfg: Cfg = None,
            sampler: Sampler = None, schedule: Schedule = None, seed: Seed = None, width: Width = None,
            height: Height = None, batch_size: Batch = None, n_iter: NIter = None, out: Out = None,
            capture_every: CaptureEvery = None, prompt_syntax: Syntax = None, clip_skip: ClipSkip = None,
            vae: Vae = None) -> None:
    """Repaint the masked part of an image: inpainting checkpoints use the mask directly, ordinary ones keep
    the unmasked part at every step."""
    overrides = _overrides(prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
                           sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                           batch_size=batch_size, n_iter=n_iter, capture_every=capture_every, strength=strength,
                           mask_blur=mask_blur, invert_mask=invert, masked_content=fill, prompt_syntax=prompt_syntax,
                           clip_skip=clip_skip, vae=vae)
    try:
        pictures = {"init_image": open_image(image), "mask": open_image(mask)}
    except SdStudioError as e:
        fail(str(e))
    _run(ctx.obj, _request({}, {**overrides, **pictures}), out)


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
        typer.echo(json.dumps({"infotext": meta.infotext, "request": meta.request_fields(),
                               "record": meta.record}, indent=2))
        return
    if meta.infotext:
        typer.echo(meta.infotext)
        typer.echo("")
    for key, value in meta.request_fields().items():
        typer.echo(f"{key:>16}: {value}")
    if meta.record:
        env = meta.record.get("environment", {})
        typer.echo(f"{'environment':>16}: " + ", ".join(f"{k} {v}" for k, v in env.items()))


@app.command()
def samplers() -> None:
    """List the samplers and the schedule types each supports."""
    for s in SAMPLERS:
        typer.echo(f"{s.name:<14} {s.scheduler_class:<34} schedules: {', '.join(('Automatic', *s.schedules))}"
                   f"  (Automatic = {s.default_schedule})")
    typer.echo(f"\nSchedule types: {', '.join(SCHEDULE_TYPES)}")


@app.command("eval-demo")
def eval_demo(ctx: typer.Context, model: Model = None,
              per_triple: Annotated[int, typer.Option(help="Images per held-out combination.")] = 4,
              steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
              seed: Annotated[int, typer.Option(help="First seed.")] = 0,
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
                              on_image=lambda done, total: bar.advance(done, total))
        except SdStudioError as e:
            fail(str(e))
    typer.echo(f"{report.count} images from held-out combinations, {steps} steps")
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


def _overrides(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _fields_from_image(path: Path) -> dict[str, Any]:
    try:
        fields = read_metadata(path).request_fields()
    except SdStudioError as e:
        fail(str(e))
    if not fields:
        fail(f"{path} has no generation parameters to re-run")
    return fields


def _request(base: dict[str, Any], overrides: dict[str, Any]) -> GenerationRequest:
    fields = {**base, **overrides}
    if not fields.get("prompt") and "init_image" not in fields:
        fail("give a prompt (or --from-image IMAGE to re-run one)")
    try:
        return GenerationRequest(**fields)
    except TypeError as e:
        fail(f"invalid parameters: {e}")


def _run(options: dict[str, str], request: GenerationRequest, out: Path | None) -> None:
    from sdstudio.engine.engine import Engine

    settings = settings_from(options, out)
    quiet_libraries()
    with StepProgress() as bar:
        try:
            result = Engine(settings).generate(request, progress=bar.on_event)
        except SdStudioError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
    for saved in save_result(result, settings.outputs_dir):
        typer.echo(str(saved.path))
        if saved.capture_dir:
            typer.echo(str(saved.capture_dir))
    err.print(f"[dim]{len(result.images)} image(s), seed {result.request.seed}, {result.seconds:.2f} s[/dim]")


class StepProgress:
    """A rich bar over all steps of all batches with it/s and ETA; silent when stderr is not a terminal."""

    def __enter__(self) -> StepProgress:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=err, transient=True, disable=not err.is_terminal)
        self.bar.start()
        self.task = self.bar.add_task("loading", total=None, rate="")
        return self

    def on_event(self, event: ProgressEvent) -> None:
        speed = self.bar.tasks[0].speed
        self.bar.update(self.task, completed=event.iteration * event.steps + event.step,
                        total=event.steps * event.n_iter, rate=f"{speed:.1f} it/s" if speed else "",
                        description=f"batch {event.iteration + 1}/{event.n_iter}")

    def advance(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total, description="images")

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()






def main() -> None:
    app(prog_name="sdstudio")
