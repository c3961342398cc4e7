"""X/Y/Z plot (A1111's script "X/Y/Z plot"): one request varied along up to three axes.

An axis is "name=v1,v2,...", e.g. "cfg=3,7,11". Values are comma-separated (CSV: quote a value holding a
comma); whole-number and decimal axes also take A1111's ranges, both ends included:
"1-5" -> 1,2,3,4,5; "1-10 (+3)" -> 1,4,7,10; "1-10 [4]" -> 4 values evenly spaced; "0-1 (+0.25)".
"prompt_sr=cat,dog,fox" is A1111's Prompt S/R: the first value is searched in the prompt and the negative
prompt, and each value in turn replaces it (the first cell keeps the prompt as it is).

The plan is every combination (Z outermost, then Y, then X); `run_xyz` generates them in that order and
draws one grid per Z value: X values label the columns, Y values the rows, the Z value is the title.
A random seed (-1) is fixed once for the whole plot, as A1111 does, so only the axes change between cells.
An axis holds at most MAX_AXIS_VALUES values (a range is counted before it is expanded), and a plot's images
(cells x batch_size x n_iter) count against the per-job image limit.
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sdstudio.a1111.extras import xyz_params
from sdstudio.a1111.infotext import format_value, quote
from sdstudio.engine.requests import GenerationRequest, GenerationResult
from sdstudio.engine.workflows.xyz_grid import draw_grid
from sdstudio.errors import RequestError
from sdstudio.storage.results import INFOTEXT_CHUNK, SavedImage, save_grid, save_result, to_json

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from sdstudio.engine.engine import Engine
    from sdstudio.engine.hooks import CancelToken, ProgressEvent
    from sdstudio.engine.prepared import PreparedJob

_NUMBER = r"([+-]?\d+(?:\.\d*)?)"
_RANGE = re.compile(rf"{_NUMBER}\s*-\s*{_NUMBER}\s*(?:\(\s*{_NUMBER}\s*\)|\[\s*(\d+)\s*\])?")  # a-b (+step) / [count]
_SIZE = re.compile(r"(\d+)\s*[xX]\s*(\d+)")
XYZ_RECORD_CHUNK = "sdstudio-xyz"     # a grid's machine-readable record (PNG text chunk)
XYZ_RECORD_FORMAT = "sdstudio-xyz/1"


@dataclass(frozen=True)
class AxisKind:
    """What an axis name sets: `field` of the request, values of `kind` (int, float, str, size, prompt_sr)."""

    name: str
    field: str
    kind: str
    help: str


_KINDS = (
    AxisKind("seed", "seed", "int", "seed (-1: a random one)"),
    AxisKind("subseed", "subseed", "int", "variation seed (A1111's Var. seed)"),
    AxisKind("subseed_strength", "subseed_strength", "float", "variation strength 0-1"),
    AxisKind("steps", "steps", "int", "sampling steps"),
    AxisKind("cfg", "cfg_scale", "float", "CFG scale"),
    AxisKind("sampler", "sampler", "str", "sampler name, e.g. Euler, DPM++ 2M"),
    AxisKind("schedule", "schedule", "str", "schedule type, e.g. Karras"),
    AxisKind("strength", "strength", "float", "denoising strength (img2img)"),
    AxisKind("clip_skip", "clip_skip", "int", "clip skip"),
    AxisKind("prompt_sr", "prompt", "prompt_sr", "prompt search/replace: first value is searched"),
    AxisKind("width", "width", "int", "width in pixels"),
    AxisKind("height", "height", "int", "height in pixels"),
    AxisKind("size", "width", "size", "WxH in pixels"),
    AxisKind("model", "model", "str", "model name or path"),
    AxisKind("vae", "vae", "str", "VAE name or path"),
    AxisKind("guidance_rescale", "guidance_rescale", "float", "CFG rescale phi"),
    AxisKind("guidance", "guidance", "str", "guidance rule: cfg, cfg-zero*, apg"),
    AxisKind("pag_scale", "pag_scale", "float", "perturbed-attention guidance scale"),
    AxisKind("eta", "eta", "float", "DDIM eta / TCD gamma"),
)
AXIS_KINDS: Mapping[str, AxisKind] = MappingProxyType({k.name: k for k in _KINDS})
ALIASES: Mapping[str, str] = MappingProxyType({
    "cfg_scale": "cfg", "denoising": "strength", "checkpoint": "model", "var_seed": "subseed",
    "var_strength": "subseed_strength", "schedule_type": "schedule", "prompt_s/r": "prompt_sr", "pag": "pag_scale",
})


def axis_help() -> str:
    return "; ".join(f"{k.name} ({k.help})" for k in _KINDS)


@dataclass(frozen=True)
class XYZAxis:
    kind: AxisKind
    values: tuple[Any, ...]   # parsed; prompt_sr: the texts, the first being the one searched for
    labels: tuple[str, ...]   # "cfg: 7", as drawn on the grid

    @property
    def name(self) -> str:
        return self.kind.name

    def apply(self, req: GenerationRequest, i: int) -> GenerationRequest:
        value = self.values[i]
        if self.kind.kind == "prompt_sr":
            search = self.values[0]
            return req.replace(prompt=req.prompt.replace(search, value),
                               negative_prompt=req.negative_prompt.replace(search, value))
        if self.kind.kind == "size":
            return req.replace(width=value[0], height=value[1])
        return req.replace(**{self.kind.field: value})


@dataclass(frozen=True)
class XYZCell:
    x: int
    y: int
    z: int
    request: GenerationRequest


@dataclass(frozen=True)
class XYZPlan:
    base: GenerationRequest
    axes: tuple[XYZAxis | None, XYZAxis | None, XYZAxis | None]   # x, y, z; y and z optional
    cells: tuple[XYZCell, ...]                                    # z-major, then y, then x

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a.values) if a else 1 for a in self.axes)  # type: ignore[return-value]

    def cell(self, x: int, y: int = 0, z: int = 0) -> XYZCell:
        nx, ny, _ = self.shape
        return self.cells[(z * ny + y) * nx + x]

    def labels(self, axis: int) -> tuple[str, ...]:
        """The label strings of axis 0 (x), 1 (y) or 2 (z); empty for an absent axis."""
        a = self.axes[axis]
        return a.labels if a else ()


def build_plan(base: GenerationRequest, x: str, y: str | None = None, z: str | None = None,
               max_images: int | None = None) -> XYZPlan:
    """Parse the axis specs and make every cell's request from `base`; a plot of more than `max_images` images
    is refused before any cell is made."""
    if base.seed == -1:
        base = base.replace(seed=random.randrange(2**32))
    if base.variation.seed == -1 and base.variation.strength > 0:
        base = base.replace(subseed=random.randrange(2**32))
    axes = (parse_axis(x, base), parse_axis(y, base) if y else None, parse_axis(z, base) if z else None)
    nx, ny, nz = (len(a.values) if a else 1 for a in axes)
    images = nx * ny * nz * base.total_images
    if max_images is not None and images > max_images:
        raise RequestError(f"the plot would make {images} images ({nx} x {ny} x {nz} cells x {base.total_images} "
                           f"per cell); the limit is {max_images}: use fewer values or a smaller batch", "x")
    cells = []
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                req = base
                for axis, index in zip(axes, (i, j, k), strict=True):
                    req = axis.apply(req, index) if axis else req
                cells.append(XYZCell(i, j, k, req))
    return XYZPlan(base, axes, tuple(cells))


def parse_axis(spec: str, base: GenerationRequest) -> XYZAxis:
    """'name=v1,v2,...' -> an axis; RequestError naming the valid axes or the value that is wrong."""
    name, sep, text = spec.partition("=")
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = ALIASES.get(key, key)
    if not sep or key not in AXIS_KINDS:
        raise RequestError(f"unknown X/Y/Z axis {name.strip()!r} in {spec!r}: write name=v1,v2,... with a name "
                           f"from: {', '.join(AXIS_KINDS)}", "axis")
    kind = AXIS_KINDS[key]
    texts = [t.strip() for row in csv.reader([text], skipinitialspace=True) for t in row if t.strip()]
    if not texts:
        raise RequestError(f"axis {kind.name} has no values: write {kind.name}=v1,v2,...", "axis")
    if len(texts) > MAX_AXIS_VALUES:
        raise RequestError(f"axis {kind.name} has {len(texts)} values; at most {MAX_AXIS_VALUES}", "axis")
    values = _PARSERS[kind.kind](kind.name, texts)
    if len(values) > MAX_AXIS_VALUES:
        raise RequestError(f"axis {kind.name} has {len(values)} values; at most {MAX_AXIS_VALUES}", "axis")
    if kind.name in ("seed", "subseed"):  # A1111 fixes random seeds before the plot
        values = [random.randrange(2**32) if v == -1 else v for v in values]
    if kind.kind == "prompt_sr":
        if values[0] not in base.prompt and values[0] not in base.negative_prompt:
            raise RequestError(f"prompt_sr: {values[0]!r} (the first value, which is searched for) is not in the "
                               "prompt or the negative prompt", "axis")
        labels = tuple(values)
    else:
        labels = tuple(f"{kind.name}: {_label(v)}" for v in values)
    return XYZAxis(kind, tuple(values), labels)


def _label(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return format_value(value)


def _numbers(convert: type) -> Callable[[str, list[str]], list[Any]]:
    what = "whole numbers" if convert is int else "numbers"

    def parse(name: str, texts: list[str]) -> list[Any]:
        out: list[Any] = []
        for text in texts:
            m = _RANGE.fullmatch(text)
            try:
                out.extend(_expand(convert, *m.groups(), room=MAX_AXIS_VALUES - len(out)) if m else [convert(text)])
            except ValueError:
                raise RequestError(f"axis {name} takes {what} or ranges like 1-5, 1-10 (+2), 1-10 [4]; "
                                   f"got {text!r}", "axis") from None
            except OverflowError:
                raise RequestError(f"axis {name}: {text!r} gives more than {MAX_AXIS_VALUES} values in all; "
                                   f"at most {MAX_AXIS_VALUES} per axis", "axis") from None
        return out

    return parse


def _expand(convert: type, start: str, end: str, step: str | None, count: str | None, room: int) -> list[Any]:
    """A1111's ranges, both ends included: (+step) or [count] evenly spaced values. OverflowError when there
    would be more than `room` values (counted before any is made)."""
    a, b = convert(start), convert(end)
    if count is not None:
        n = int(count)
        if n < 1:
            raise ValueError
        if n > room:
            raise OverflowError
        return [a] if n == 1 else [convert(a + (b - a) * i / (n - 1)) for i in range(n)]
    s = convert(step) if step is not None else convert(1 if b >= a else -1)
    if s == 0 or (b - a) * s < 0 or not math.isfinite((b - a) / s):
        raise ValueError
    n = int((b - a) / s + 1e-9) + 1
    if n > room:
        raise OverflowError
    return [a + s * i if convert is int else round(a + s * i, 10) for i in range(n)]


def _strings(name: str, texts: list[str]) -> list[str]:
    return texts


def _sizes(name: str, texts: list[str]) -> list[tuple[int, int]]:
    out = []
    for text in texts:
        m = _SIZE.fullmatch(text)
        if not m:
            raise RequestError(f"axis {name} takes sizes WIDTHxHEIGHT like 512x768, got {text!r}", "axis")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


MAX_AXIS_VALUES = 100

_PARSERS: Mapping[str, Callable[[str, list[str]], list[Any]]] = MappingProxyType({
    "int": _numbers(int), "float": _numbers(float), "str": _strings, "prompt_sr": _strings, "size": _sizes})


@dataclass(frozen=True)
class XYZProgress:
    cell: int             # 0-based index of the cell being generated
    cells: int
    event: ProgressEvent  # the cell's own step event

    @property
    def fraction(self) -> float:
        return (self.cell + self.event.fraction) / self.cells


@dataclass(frozen=True)
class XYZGrid:
    image: Image.Image   # RGB, infotext in image.info["parameters"]
    infotext: str
    z: int
    left: int            # width of the row-label margin, pixels
    top: int             # height of the title and column-label margin, pixels
    cell_size: tuple[int, int]


@dataclass(frozen=True)
class XYZResult:
    plan: XYZPlan
    results: list[GenerationResult]   # one per cell, in plan.cells order
    grids: list[XYZGrid]              # one per Z value


def run_xyz(engine: Engine, plan: XYZPlan, progress: Callable[[XYZProgress], None] | None = None,
            cancel: CancelToken | None = None) -> XYZResult:
    """Prepare every cell first (fail before the first image), then generate them and draw the grids."""
    jobs = prepare_plan(engine, plan)
    results = []
    for n, (cell, job) in enumerate(zip(plan.cells, jobs, strict=True)):
        hook = (lambda event, n=n: progress(XYZProgress(n, len(plan.cells), event))) if progress else None
        try:
            results.append(engine.generate(job, progress=hook, cancel=cancel))
        except RequestError as e:
            raise RequestError(f"X/Y/Z cell {_cell_name(plan, cell)}: {e}", e.field) from None
    return XYZResult(plan, results, [grid_for(plan, results, z) for z in range(plan.shape[2])])


def prepare_plan(engine: Engine, plan: XYZPlan) -> list[PreparedJob]:
    """Every cell prepared (Engine.prepare: nothing is loaded): RequestError naming the cell, ModelError for a
    model name that is not there."""
    jobs = []
    for cell in plan.cells:
        try:
            jobs.append(engine.prepare(cell.request))
        except RequestError as e:
            raise RequestError(f"X/Y/Z cell {_cell_name(plan, cell)}: {e}", e.field) from None
    return jobs


def _cell_name(plan: XYZPlan, cell: XYZCell) -> str:
    names = [axis.labels[i] for axis, i in zip(plan.axes, (cell.x, cell.y, cell.z), strict=True) if axis]
    return "(" + ", ".join(names) + ")"


def grid_for(plan: XYZPlan, results: Sequence[GenerationResult], z: int) -> XYZGrid:
    """The grid of Z value `z`: each cell's first image, labelled; the infotext is the first cell's plus
    the plot's axes (A1111 writes the first image's parameters and "Script: X/Y/Z plot")."""
    nx, ny, _ = plan.shape
    first = (z * ny) * nx
    rows = [[results[first + j * nx + i].images[0].image for i in range(nx)] for j in range(ny)]
    title = plan.labels(2)[z] if plan.axes[2] else None
    image, layout = draw_grid(rows, plan.labels(0), plan.labels(1), title)
    axes = [(axis.name, [_label(v) for v in axis.values]) if axis else None for axis in plan.axes]
    extra = ", ".join(f"{k}: {quote(v)}" for k, v in xyz_params(axes).items())
    text = f"{results[first].images[0].infotext}, {extra}"
    image.info["parameters"] = text
    return XYZGrid(image, text, z, layout.left, layout.top, layout.cell_size)


@dataclass(frozen=True)
class SavedXYZ:
    grids: list[Path]                # one per Z value, in order
    cells: list[list[SavedImage]]    # per cell (plan.cells order), its images


def save_xyz(result: XYZResult, root: Path) -> SavedXYZ:
    """Every cell's images as txt2img/img2img saves them, and each grid into <root>/<mode>-grids/<date>/ with
    its infotext and an `sdstudio-xyz` record (the axes' labels and the base request)."""
    plan = result.plan
    cells = [save_result(cell, root) for cell in result.results]
    mode = "txt2img" if plan.base.init_image is None else "img2img"
    grids = []
    for grid in result.grids:
        record = {"format": XYZ_RECORD_FORMAT, "z": grid.z, "axes": {a.name: list(a.labels) for a in plan.axes if a},
                  "base": plan.base.to_dict()}
        text = {INFOTEXT_CHUNK: grid.infotext, XYZ_RECORD_CHUNK: to_json(record)}
        grids.append(save_grid(grid.image, text, root, mode, "xyz-grid"))
    return SavedXYZ(grids, cells)
