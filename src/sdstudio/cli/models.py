"""`sdstudio models ...`: list the catalog, convert between layouts, merge checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sdstudio.cli.common import GlobalOptions, err, fail, model_path, quiet_libraries, settings_from
from sdstudio.errors import SdStudioError

app = typer.Typer(no_args_is_help=True, help="Models: list what is installed, convert, merge.")


@app.command("list")
def list_models(ctx: typer.Context,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
                hashes: Annotated[bool, typer.Option(help="Compute A1111 short hashes (cached after the first "
                                                          "time; slow for big new files).")] = True) -> None:
    """Models in our folders, an A1111/ComfyUI install (SDSTUDIO_A1111, SDSTUDIO_COMFYUI) and the HF cache."""
    from sdstudio.models.find.catalog import model_folders, scan
    from sdstudio.models.find.hashing import HashCache
    from sdstudio.models.find.inventory import describe, family_label

    settings = settings_from(ctx.obj or GlobalOptions("cpu", "float32"))
    cache = HashCache(settings.cache_dir / "hashes.json") if hashes else None
    infos = [describe(ref, cache) for ref in scan(model_folders(settings))]
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    table = Table("name", "family", "hash", "size", "source", "path")
    for i in infos:
        table.add_row(i.name, family_label(i.family), i.hash or "-", f"{i.size / 2**20:,.1f} MB", i.source,
                      str(i.path))
    from rich.console import Console

    Console().print(table)


@app.command()
def convert(ctx: typer.Context,
            source: Annotated[str, typer.Argument(help="A model by name (demo, ...), a diffusers folder, or a single "
                                                       ".safetensors/.ckpt file.")],
            out: Annotated[Path, typer.Argument(help="A .safetensors file (from a folder) or a folder (from a file).")],
            half: Annotated[bool, typer.Option(help="Write float16 weights.")] = False,
            config: Annotated[Path | None, typer.Option(help="A diffusers folder to take configs and tokenizers "
                                                             "from (file -> folder only).")] = None) -> None:
    """Diffusers folder -> original (LDM) single file, or single file -> diffusers folder."""
    import torch

    from sdstudio.models.load.single_file import single_file_to_folder
    from sdstudio.models.tools import convert as conv

    settings = settings_from(ctx.obj or GlobalOptions("cpu", "float32"))
    quiet_libraries()
    source = model_path(source, settings)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        fail(f"{out} already exists; choose a new output path (nothing was overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if source.is_dir():
            if out.suffix != ".safetensors":
                fail(f"converting a folder writes one .safetensors file; got {out}")
            conv.write_single_file(source, out, dtype=torch.float16 if half else None)
        elif source.is_file():
            single_file_to_folder(source, out, settings.prediction, config=config, half=half)
        else:
            fail(f"{source} does not exist")
    except SdStudioError as e:
        fail(str(e))
    typer.echo(str(out))


@app.command()
def merge(models: Annotated[list[Path], typer.Argument(help="A B for weighted-sum; A B C for add-difference.")],
          out: Annotated[Path, typer.Option("--out", "-o", help="The merged .safetensors, or with --recipe a "
                                                                "NAME.merge.json recipe computed when loaded.")],
          method: Annotated[str, typer.Option(help="weighted-sum: A*(1-alpha) + B*alpha; add-difference: "
                                                   "A + (B - C)*alpha.")] = "weighted-sum",
          alpha: Annotated[float, typer.Option(help="The multiplier M.")] = 0.3,
          dtype: Annotated[str, typer.Option(help="float16, float32 or bfloat16.")] = "float16",
          vae: Annotated[Path | None, typer.Option(help="Bake this VAE into the result.")] = None,
          recipe: Annotated[bool, typer.Option(help="Write a recipe instead of the merged weights.")] = False) -> None:
    """Merge checkpoints as A1111's Checkpoint Merger does."""
    from sdstudio.models.tools.merge import MergeRecipe, merge_files

    try:
        spec = MergeRecipe(method=method, models=tuple(str(m.resolve()) for m in models), alpha=alpha, dtype=dtype,
                           vae=str(vae.resolve()) if vae else None)  # absolute: a recipe may live anywhere
        if recipe:
            spec.write(out)
        else:
            with _Bar("merging") as bar:
                merge_files(spec, out, progress=bar.update)
    except SdStudioError as e:
        fail(str(e))
    typer.echo(str(out))


class _Bar:
    def __init__(self, what: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=err, transient=True, disable=not err.is_terminal)
        self.task = self.progress.add_task(what, total=None)

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def update(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

