"""`sdstudio train ...`: the dataset generator and the two trainers (VAE, then UNet + text encoder)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdstudio.cli.common import fail, quiet_libraries

if TYPE_CHECKING:
    from sdstudio.train.state import TrainProgress

app = typer.Typer(no_args_is_help=True, help="Train your own model: dataset, VAE, UNet + text encoder.")
err = Console(stderr=True)

Data = Annotated[str, typer.Argument(help="A folder of images with same-named .txt captions, or 'shapes' "
                                          "to stream the procedural shapes dataset.")]
Out = Annotated[Path, typer.Argument(help="Output folder (a diffusers folder; resumable state inside).")]
Resolution = Annotated[int, typer.Option(help="Training resolution in pixels.")]
Steps = Annotated[int, typer.Option(help="Total optimisation steps.")]
Seed = Annotated[int, typer.Option(help="Seed: the same seed gives the same weights.")]
SaveEvery = Annotated[int, typer.Option(help="Save (export + resumable state) every N steps.")]
SaveDtype = Annotated[str, typer.Option(help="dtype of the exported weights: float32, float16, bfloat16.")]
Resume = Annotated[bool, typer.Option(help="Continue the run saved in OUT.")]


@app.command("shapes-dataset")
def shapes_dataset(out: Annotated[Path, typer.Argument(help="Folder to write NNNNNN.png + NNNNNN.txt into.")],
                   count: Annotated[int, typer.Option(help="Number of images.")] = 1000,
                   seed: Seed = 0, resolution: Resolution = 64) -> None:
    """Write the procedural shapes dataset (held-out evaluation combinations excluded)."""
    from sdstudio.train.shapes import write_dataset

    if count < 1:
        fail(f"--count must be at least 1, got {count}")
    write_dataset(out, count, seed, resolution)
    typer.echo(str(out))


@app.command("vae")
def vae(data: Data, out: Out, arch: Annotated[str, typer.Option(help="demo or tiny.")] = "demo",
        base: Annotated[str | None, typer.Option(help="Fine-tune this VAE folder.")] = None,
        resolution: Resolution = 64, batch_size: Annotated[int, typer.Option()] = 16, steps: Steps = 4000,
        lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-3,
        kl_weight: Annotated[float, typer.Option()] = 1e-4,
        edge_weight: Annotated[float, typer.Option(help="Weight of the edge (image gradient) loss.")] = 1.0,
        rgb_weight: Annotated[float, typer.Option(help="Weight tying latent channels 0-2 to colour.")] = 1.0,
        seed: Seed = 0, save_every: SaveEvery = 500,
        save_dtype: SaveDtype = "float32", resume: Resume = False) -> None:
    """Train a small AutoencoderKL (SD layout, 4 latent channels); its scaling factor is measured on the data."""
    from sdstudio.train.vae import VAE_ARCHS, VaeTrainConfig, train_vae

    _check_choice("arch", arch, VAE_ARCHS)
    cfg = VaeTrainConfig(data=data, out=out, arch=arch, base=base, resolution=resolution, batch_size=batch_size,
                         steps=steps, lr=lr, kl_weight=kl_weight, edge_weight=edge_weight, rgb_weight=rgb_weight,
                         seed=seed, save_every=save_every,
                         save_dtype=save_dtype)
    _train(lambda p: train_vae(cfg, p, resume), steps)


@app.command("tiny-vae")
def tiny_vae(teacher: Annotated[str, typer.Argument(help="The VAE to distil: a model name or folder (its vae/ is "
                                                         "used) or a VAE folder.")],
             out: Out, data: Annotated[str, typer.Option(help="Images to learn on: a caption folder, or 'shapes'.")]
             = "shapes", channels: Annotated[int, typer.Option(help="Width of every block (TAESD's: 64).")] = 32,
             resolution: Resolution = 64, batch_size: Annotated[int, typer.Option()] = 32, steps: Steps = 3000,
             lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 2e-3,
             seed: Seed = 0, save_every: SaveEvery = 500, save_dtype: SaveDtype = "float16",
             resume: Resume = False) -> None:
    """Distil a VAE into a tiny one (TAESD's architecture) for live previews and fast decoding."""
    from sdstudio.train.tiny_vae import TinyVaeTrainConfig, train_tiny_vae

    folder = Path(_model(teacher) or teacher)
    cfg = TinyVaeTrainConfig(teacher=str(folder / "vae" if (folder / "vae").is_dir() else folder), out=out,
                             data=data, channels=channels, resolution=resolution, batch_size=batch_size,
                             steps=steps, lr=lr, seed=seed, save_every=save_every, save_dtype=save_dtype)
    _train(lambda p: train_tiny_vae(cfg, p, resume), steps)


@app.command("lcm-lora")
def lcm_lora(base: Annotated[str, typer.Argument(help="The model to distil: a name or a diffusers folder.")],
             out: Annotated[Path, typer.Argument(help="Output folder: the LoRA is OUT/<folder name>.safetensors; "
                                                      "resumable state inside.")],
             data: Annotated[str, typer.Option(help="Images to learn on: a caption folder, or 'shapes'.")] = "shapes",
             rank: Annotated[int, typer.Option(help="LoRA rank (alpha = rank).")] = 16,
             resolution: Resolution = 64, batch_size: Annotated[int, typer.Option()] = 32, steps: Steps = 2000,
             lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-3,
             seed: Seed = 0, save_every: SaveEvery = 250, resume: Resume = False) -> None:
    """Distil a model into an LCM-LoRA: with it, the model samples in 4 steps (--preset lcm)."""
    from sdstudio.train.lcm_lora import LcmTrainConfig, train_lcm_lora

    cfg = LcmTrainConfig(base=_model(base) or base, out=out, data=data, rank=rank, resolution=resolution,
                         batch_size=batch_size, steps=steps, lr=lr, seed=seed, save_every=save_every)
    _train(lambda p: train_lcm_lora(cfg, p, resume), steps)


@app.command("model")
def model(data: Data, out: Out,
          vae: Annotated[str | None, typer.Option(help="A VAE or a model (name or folder) whose VAE to use; "
                                                       "default: --base's.")] = None,
          base: Annotated[str | None, typer.Option(help="Fine-tune this model (name or folder).")] = None,
          arch: Annotated[str, typer.Option(help="Architecture when training from scratch: demo, tiny.")] = "demo",
          resolution: Resolution = 64, batch_size: Annotated[int, typer.Option()] = 64, steps: Steps = 20000,
          lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-3,
          ema: Annotated[float, typer.Option(help="EMA decay of the exported weights; 0 turns EMA off.")] = 0.999,
          prediction: Annotated[str, typer.Option(help="epsilon or v_prediction.")] = "epsilon",
          seed: Seed = 0, save_every: SaveEvery = 1000, save_dtype: SaveDtype = "float32",
          inpaint: Annotated[bool, typer.Option(help="Make a 9-channel inpainting variant of --base (random masks).")]
          = False, resume: Resume = False) -> None:
    """Train or fine-tune an SD1.x-layout model (UNet + CLIP text encoder) on captioned images."""
    from sdstudio.train.sd import TEXT_ARCHS, SdTrainConfig, train_sd

    _check_choice("arch", arch, TEXT_ARCHS)
    _check_choice("prediction", prediction, ("epsilon", "v_prediction"))
    if inpaint and not base:
        fail("--inpaint widens a trained model: give it --base MODEL")
    if not (vae or base):
        fail("training from scratch needs a VAE: give --vae (a VAE or a model, e.g. --vae demo)")
    cfg = SdTrainConfig(data=data, out=out, vae=_model(vae), base=_model(base), arch=arch, resolution=resolution,
                        batch_size=batch_size, steps=steps, lr=lr, ema_decay=ema, prediction_type=prediction,
                        seed=seed, save_every=save_every, save_dtype=save_dtype, inpaint=inpaint)
    _train(lambda p: train_sd(cfg, p, resume), steps)


@app.command("controlnet")
def controlnet(data: Data, out: Out,
               base: Annotated[str, typer.Option(help="The model it controls (name or folder).")],
               control: Annotated[str, typer.Option(help="Control image made from each training image: canny.")]
               = "canny", resolution: Resolution = 64, batch_size: Annotated[int, typer.Option()] = 64,
               steps: Steps = 3000, lr: Annotated[float, typer.Option(help="Peak learning rate (cosine).")] = 3e-4,
               ema: Annotated[float, typer.Option(help="EMA decay of the exported weights; 0: off.")] = 0.999,
               seed: Seed = 0, save_every: SaveEvery = 500, save_dtype: SaveDtype = "float32",
               resume: Resume = False) -> None:
    """Train a ControlNet for a model (frozen) from images and their edge maps."""
    from sdstudio.train.controlnet import CONTROLS, ControlNetTrainConfig, train_controlnet

    _check_choice("control", control, CONTROLS)
    cfg = ControlNetTrainConfig(data=data, out=out, base=_model(base), control=control, resolution=resolution,
                                batch_size=batch_size, steps=steps, lr=lr, ema_decay=ema, seed=seed,
                                save_every=save_every, save_dtype=save_dtype)
    _train(lambda p: train_controlnet(cfg, p, resume), steps)


def _train(run, steps: int) -> None:
    from sdstudio.errors import SdStudioError

    if steps < 1:
        fail(f"--steps must be at least 1, got {steps}")
    quiet_libraries()
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task("training", total=steps, loss="-", rate="")

        def on_progress(p: TrainProgress) -> None:
            speed = bar.tasks[0].speed
            bar.update(task, completed=p.step, loss=f"{p.loss:.4f}", rate=f"{speed:.2f} it/s" if speed else "")
            if p.saved:
                bar.console.print(f"step {p.step}: loss {p.loss:.4f}, saved {p.saved}")

        try:
            out = run(on_progress)
        except SdStudioError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted (resume with --resume)", code=130)
    typer.echo(str(out))


def _model(name: str | None) -> str | None:
    """A model folder from a name the catalog knows (demo, ...) or a path; None stays None."""
    if name is None:
        return None
    from sdstudio.cli.common import model_path
    from sdstudio.settings import Settings

    path = model_path(name, Settings.from_env())
    if not path.is_dir():
        fail(f"{name} is a single file; training needs a diffusers folder (sdstudio models convert makes one)")
    return str(path)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        fail(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
