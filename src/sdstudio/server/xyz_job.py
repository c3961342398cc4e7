"""X/Y/Z plots as queued jobs (kind "xyz"): planned at submit time, so a bad axis is a 422 before anything is
queued, and planned again from the stored payload when the worker runs it (a random seed is fixed then).

The payload is {"request": GenerationRequest fields as POST /api/v1/jobs takes them, "x", "y", "z": axis
specs ("cfg=3,7"; y and z may be null)}. Images are saved as the CLI saves them (engine/xyz.save_xyz); the
history record lists the grids first, then every cell's images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sdstudio.engine.engine import Engine
from sdstudio.engine.hooks import CancelToken, ProgressEvent
from sdstudio.engine.validate import check_types
from sdstudio.engine.workflows.xyz import (
    SavedXYZ,
    XYZPlan,
    XYZProgress,
    XYZResult,
    build_plan,
    parse_axis,
    prepare_plan,
    run_xyz,
    save_xyz,
)
from sdstudio.errors import RequestError
from sdstudio.server.payload import decode_request
from sdstudio.settings import Limits
from sdstudio.storage.results import saved_entries

XYZ_KIND = "xyz"
AXES = ("x", "y", "z")


def xyz_payload(request: dict[str, Any], x: str, y: str | None = None, z: str | None = None) -> dict[str, Any]:
    """What the queue stores for a plot (and GET /api/v1/jobs/{id}/request gives back)."""
    return {"request": request, "x": x, "y": y, "z": z}


def plan_xyz(payload: Mapping[str, Any], limits: Limits) -> XYZPlan:
    """The plan of an xyz payload; a bad axis is a RequestError whose field is "x", "y" or "z"; a plot of more
    than `limits.max_images` images is refused before any cell is made, and pictures and units over the limits
    before they are decoded."""
    base = decode_request(payload.get("request"), limits.max_upload_pixels,  # type: ignore[arg-type]
                          limits.max_controlnet_units)
    check_types(base)  # the fields are read before Engine.prepare sees them
    specs: dict[str, str | None] = {}
    for name in AXES:
        spec = payload.get(name)
        if spec is not None and not isinstance(spec, str):
            raise RequestError(f"{name} must be an axis like 'cfg=3,7', got {type(spec).__name__}", name)
        specs[name] = spec.strip() if spec and spec.strip() else None
    if specs["x"] is None:
        raise RequestError("an X/Y/Z plot needs an x axis: name=v1,v2,..., e.g. cfg=3,7", "x")
    for name, spec in specs.items():
        if spec is not None:
            try:
                parse_axis(spec, base)
            except RequestError as e:
                raise RequestError(f"{name}: {e}", name) from None
    return build_plan(base, specs["x"], specs["y"], specs["z"], limits.max_images)  # type: ignore[arg-type]


def check_xyz(engine: Engine, plan: XYZPlan) -> None:
    """What needs no model loaded, as POST /api/v1/jobs checks: the base request, then every cell."""
    engine.prepare(plan.base)
    prepare_plan(engine, plan)


def plot_event(p: XYZProgress) -> ProgressEvent:
    """A cell's step event as one of the whole plot: batch k of cell c is batch c * n_iter + k of
    cells * n_iter, so its `fraction` is the plot's (XYZProgress.fraction)."""
    e = p.event
    return dataclasses.replace(e, iteration=p.cell * e.n_iter + e.iteration, n_iter=p.cells * e.n_iter)


def run_xyz_job(engine: Engine, payload: Mapping[str, Any], images_dir: Path,
                on_event: Callable[[ProgressEvent], None] | None = None,
                cancel: CancelToken | None = None) -> dict[str, Any]:
    """Plan, generate every cell, save grids and images under `images_dir`; the history record."""
    return save_xyz_job(make_xyz(engine, payload, on_event, cancel), images_dir)


def make_xyz(engine: Engine, payload: Mapping[str, Any], on_event: Callable[[ProgressEvent], None] | None = None,
             cancel: CancelToken | None = None) -> XYZResult:
    """Plan and generate every cell (a cluster worker does this; the server saves)."""
    plan = plan_xyz(payload, engine.settings.limits)
    progress = (lambda p: on_event(plot_event(p))) if on_event else None
    return run_xyz(engine, plan, progress=progress, cancel=cancel)


def save_xyz_job(result: XYZResult, images_dir: Path) -> dict[str, Any]:
    """Save grids and images under `images_dir`; the history record."""
    return xyz_record(result, save_xyz(result, images_dir), images_dir)


def xyz_record(result: XYZResult, saved: SavedXYZ, images_dir: Path) -> dict[str, Any]:
    """images/seeds/infotexts/captures/capture_steps: the grids first (each with its grid infotext and its
    first cell's seed), then every cell's images in plan order; grids, shape [nx, ny, nz] and axis labels."""
    plan = result.plan
    nx, ny, _ = plan.shape
    cells = [saved_entries(r.images, s, images_dir) for r, s in zip(result.results, saved.cells, strict=True)]
    grids = {"images": [str(path.relative_to(images_dir)) for path in saved.grids],
             "seeds": [result.results[g.z * nx * ny].images[0].seed for g in result.grids],
             "infotexts": [g.infotext for g in result.grids],
             "captures": [None] * len(saved.grids),
             "capture_steps": [[] for _ in saved.grids]}
    entries = {key: [*first, *(value for cell in cells for value in cell[key])] for key, first in grids.items()}
    warnings = dict.fromkeys(w for r in result.results for w in r.warnings)
    return {**entries, "grids": len(saved.grids), "shape": list(plan.shape),
            "labels": {name: list(plan.labels(i)) for i, name in enumerate(AXES)},
            "request": plan.base.to_dict(), "warnings": list(warnings),
            "seconds": sum(r.seconds for r in result.results)}
