"""What the generating commands share: their options, request building, the run with a progress bar."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdstudio.cli.common import GlobalOptions, err, fail, quiet_libraries, settings_from
from sdstudio.cli.history import record_in_history
from sdstudio.engine.hooks import CancelToken
from sdstudio.engine.record import image_fields
from sdstudio.engine.requests import GenerationRequest, GenerationResult
from sdstudio.errors import SdStudioError
from sdstudio.storage.results import read_metadata, save_result

if TYPE_CHECKING:
    from sdstudio.engine.hooks import ProgressEvent

T = TypeVar("T")

Negative = Annotated[str | None, typer.Option("--negative", "-n", help="Negative prompt.")]
Model = Annotated[str | None, typer.Option("--model", "-m", help="A model name (sdstudio models list), a diffusers "
                                                                "folder or a .safetensors/.ckpt file. (default: demo)")]
Steps = Annotated[int | None, typer.Option("--steps", help="Sampling steps (1-150). (default: 20)")]
Cfg = Annotated[float | None, typer.Option("--cfg", help="Classifier-free guidance scale. (default: 7)")]
DistilledCfg = Annotated[float | None, typer.Option("--distilled-cfg", help="Flux-dev's distilled guidance (Forge's "
                                                                          "Distilled CFG Scale). (default: 3.5)")]
Shift = Annotated[float | None, typer.Option("--shift", help="SD3/Flux: the sigma shift (0: the model's own). "
                                                             "(default: 0)")]
Sampler = Annotated[str | None, typer.Option("--sampler", help="Sampler, e.g. 'Euler a', 'DPM++ 2M' (sdstudio "
                                                                "samplers lists them). (default: DPM++ 2M)")]
Schedule = Annotated[str | None, typer.Option("--schedule", help="Automatic, Karras, Exponential, ... "
                                                                  "(default: Automatic)")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed; -1 for random. (default: -1)")]
Width = Annotated[int | None, typer.Option("--width", "-W", help="Width in pixels, a multiple of 8. (default: the "
                                                                 "model's own, or the init image's)")]
Height = Annotated[int | None, typer.Option("--height", "-H", help="Height in pixels, a multiple of 8. (default: the "
                                                                   "model's own, or the init image's)")]
Batch = Annotated[int | None, typer.Option("--batch-size", help="Images per batch. (default: 1)")]
NIter = Annotated[int | None, typer.Option("--n-iter", help="Number of batches. (default: 1)")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Output root folder. (default: ./outputs)")]
CaptureEvery = Annotated[int | None, typer.Option("--capture-every", help="Save the denoising process every N steps.")]
Syntax = Annotated[str | None, typer.Option("--prompt-syntax", help="a1111 (weights, BREAK, prompt editing, AND), "
                                                                   "compel or plain. (default: a1111)")]
ClipSkip = Annotated[int | None, typer.Option("--clip-skip", help="Skip the last N-1 text-encoder layers "
                                                                   "(A1111's Clip skip). (default: 1)")]
Vae = Annotated[str | None, typer.Option("--vae", help="VAE: auto, none (the model's own), or a VAE file name/path.")]
Rescale = Annotated[float | None, typer.Option("--guidance-rescale", help="Rescale-CFG phi, 0-1 (0.7 suits "
                                                                         "v-prediction models). (default: 0)")]
ZeroSnr = Annotated[bool | None, typer.Option("--zero-terminal-snr", help="Zero-terminal-SNR noise schedule.")]
FromImage = Annotated[Path | None, typer.Option("--from-image", help="Re-run the parameters stored in this PNG.")]
Subseed = Annotated[int | None, typer.Option("--subseed", help="Variation seed; -1 for random. (default: -1)")]
SubseedStrength = Annotated[float | None, typer.Option("--subseed-strength", help="Variation strength 0-1: slerp "
                                                   "from the seed's noise to the variation seed's. (default: 0)")]
SeedResize = Annotated[str | None, typer.Option("--seed-resize-from", metavar="WxH", help="Draw the seed's noise "
                                              "at this size, pasted centred (A1111's Seed resize from).")]
Hires = Annotated[bool | None, typer.Option("--hires", help="Hires fix: generate, upscale, then redraw at the "
                                           "larger size (img2img on the same seeds); any --hr-* option turns it on.")]
HrScale = Annotated[float | None, typer.Option("--hr-scale", help="Hires fix upscale factor 1-8. (default: 2)")]
HrUpscaler = Annotated[str | None, typer.Option("--hr-upscaler", help="Hires fix upscaler: a latent mode ('Latent', "
                                               "'Latent (bicubic)', ...) or a resampler ('Lanczos', ...). "
                                               "(default: Latent)")]
HrSteps = Annotated[int | None, typer.Option("--hr-steps", help="Hires fix second-pass steps (0: as --steps).")]
HrDenoise = Annotated[float | None, typer.Option("--hr-denoise", help="Hires fix second-pass denoising strength "
                                                "0-1 (A1111's Denoising strength). (default: 0.75)")]


def overrides(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def seed_resize(size: str | None) -> dict[str, int]:
    """--seed-resize-from WxH as request fields (none when not given)."""
    if size is None:
        return {}
    w, sep, h = size.lower().partition("x")
    if not (sep and w.strip().isdigit() and h.strip().isdigit()):
        fail(f"--seed-resize-from must be WIDTHxHEIGHT in pixels, e.g. 512x512, got {size!r}")
    return {"seed_resize_from_w": int(w), "seed_resize_from_h": int(h)}


def fields_from_image(path: Path) -> dict[str, Any]:
    try:
        fields = image_fields(read_metadata(path))
    except SdStudioError as e:
        fail(str(e))
    if not fields:
        fail(f"{path} has no generation parameters to re-run")
    return fields


def build_request(base: dict[str, Any], overrides: dict[str, Any]) -> GenerationRequest:
    fields = {**base, **overrides}
    if not fields.get("prompt") and "init_image" not in fields:
        fail("give a prompt (or --from-image IMAGE to re-run one)")
    try:
        return GenerationRequest.from_flat(**fields)
    except TypeError as e:
        fail(f"invalid parameters: {e}")


def run_request(options: GlobalOptions, request: GenerationRequest, out: Path | None,
                preset: str | None = None) -> None:
    """preset: a few-step preset the request's fields already follow; its LoRA for the model is added (presets.py)."""
    from sdstudio.engine.engine import Engine
    from sdstudio.engine.presets import with_companion

    settings = settings_from(options, out)
    quiet_libraries()
    engine = Engine(settings)
    token = CancelToken()
    try:
        lora = engine.preset_lora(preset, request.model)
    except SdStudioError as e:
        fail(str(e))
    if lora and with_companion(request.prompt, lora) != request.prompt:
        request = request.replace(prompt=with_companion(request.prompt, lora))
        typer.echo(f"--preset {preset}: added <lora:{lora}:1>, the model's few-step LoRA", err=True)

    def run(bar: StepProgress) -> GenerationResult:
        return engine.generate(engine.prepare(request), progress=bar.on_event, cancel=token)

    with interrupt_on_ctrl_c(token):
        result = with_progress(run)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    saved_images = save_result(result, settings.outputs_dir)
    for saved in saved_images:
        typer.echo(str(saved.path))
        if saved.capture_dir:
            typer.echo(str(saved.capture_dir))
    record_in_history(settings, result, saved_images)  # the web UI's History lists it
    err.print(f"[dim]{len(result.images)} image(s), seed {result.request.seed}, {result.seconds:.2f} s[/dim]")


@contextmanager
def interrupt_on_ctrl_c(token: CancelToken) -> Iterator[None]:
    """The first Ctrl+C interrupts as A1111's Interrupt does: the current image is finished from the model's
    estimate, no further batch is made, and what is finished is saved. A second Ctrl+C quits at once."""
    def handler(signum: int, frame: object) -> None:
        if token.interrupted:
            raise KeyboardInterrupt
        token.interrupt()
        err.print("\n[yellow]interrupting:[/yellow] finishing the current image and saving what is done "
                  "(Ctrl+C again quits without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def with_progress(call: Callable[[StepProgress], T]) -> T:
    """`call(bar)` under a progress bar; our errors and Ctrl+C end the command with one line, printed after
    the bar is cleared (never glued to it)."""
    with StepProgress() as bar:
        try:
            return call(bar)
        except SdStudioError as e:
            message, code = str(e), 2
        except KeyboardInterrupt:
            message, code = "interrupted", 130
    fail(message, code=code)


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
