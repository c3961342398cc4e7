"""X/Y/Z plot: axis parsing, the plan, the labelled grid, the CLI door."""

from __future__ import annotations

import shutil
from datetime import date

import numpy as np
import pytest
from PIL import Image

from sdstudio.engine.requests import GenerationRequest
from sdstudio.engine.workflows.xyz import AXIS_KINDS, build_plan, parse_axis, run_xyz
from sdstudio.errors import RequestError
from sdstudio.storage.results import read_metadata

from .test_cli import run

BASE = GenerationRequest(prompt="a red circle", negative_prompt="blurry", steps=2, sampler="Euler", seed=3)


@pytest.mark.parametrize(("spec", "values"), [
    ("cfg=3,7,11", (3.0, 7.0, 11.0)),
    ("steps=1-5", (1, 2, 3, 4, 5)),
    ("steps=1-10 (+3)", (1, 4, 7, 10)),
    ("steps = 10-1 (-3)", (10, 7, 4, 1)),
    ("steps=1-10 [4], 20", (1, 4, 7, 10, 20)),
    ("cfg=0-1 (+0.25)", (0.0, 0.25, 0.5, 0.75, 1.0)),
    ("subseed_strength=0-1 [3]", (0.0, 0.5, 1.0)),
    ('sampler=Euler, "DPM++ 2M"', ("Euler", "DPM++ 2M")),
    ("size=64x96,128x64", ((64, 96), (128, 64))),
    ("Denoising=0.5,1", (0.5, 1.0)),
    ("pag=0-4 (+2)", (0.0, 2.0, 4.0)),                 # the guidance add-ons
    ("guidance=cfg,apg,cfg-zero*", ("cfg", "apg", "cfg-zero*")),
    ("eta=0,0.3", (0.0, 0.3)),
])
def test_axis_values(spec, values):
    assert parse_axis(spec, BASE).values == values


def test_axis_labels_and_prompt_sr():
    assert parse_axis("cfg=3,7.5", BASE).labels == ("cfg: 3", "cfg: 7.5")
    assert parse_axis("size=64x96", BASE).labels == ("size: 64x96",)
    axis = parse_axis('prompt_sr=red,blue,"green, bright"', BASE)
    assert axis.labels == ("red", "blue", "green, bright")
    assert axis.apply(BASE, 2).prompt == "a green, bright circle"
    assert axis.apply(BASE, 0) == BASE
    sr_negative = parse_axis("prompt_sr=blurry,sharp", BASE).apply(BASE, 1)
    assert (sr_negative.prompt, sr_negative.negative_prompt) == ("a red circle", "sharp")


@pytest.mark.parametrize(("spec", "message"), [
    ("colour=1,2", "unknown X/Y/Z axis 'colour' in 'colour=1,2': write name=v1,v2,... with a name from: seed, "),
    ("cfg 3,7", "unknown X/Y/Z axis 'cfg 3,7'"),
    ("steps=ten", "axis steps takes whole numbers or ranges like 1-5, 1-10 (+2), 1-10 [4]; got 'ten'"),
    ("steps=7.5", "got '7.5'"),
    ("steps=1-5 (-1)", "got '1-5 (-1)'"),
    ("cfg=", "axis cfg has no values"),
    ("size=64", "axis size takes sizes WIDTHxHEIGHT"),
    ("prompt_sr=square,circle", "prompt_sr: 'square' (the first value, which is searched for) is not in the prompt"),
])
def test_bad_axes_say_what_to_fix(spec, message):
    with pytest.raises(RequestError) as caught:
        parse_axis(spec, BASE)
    assert message in str(caught.value)
    if "unknown" in message:
        assert all(name in str(caught.value) for name in AXIS_KINDS)


def test_plan_is_every_combination_z_outermost():
    plan = build_plan(BASE, "cfg=3,7,11", "steps=2,3", "sampler=Euler,DDIM")
    assert plan.shape == (3, 2, 2) and len(plan.cells) == 12
    cell = plan.cell(2, 1, 1)
    assert (cell.x, cell.y, cell.z) == (2, 1, 1)
    assert (cell.request.cfg_scale, cell.request.steps, cell.request.sampler) == (11.0, 3, "DDIM")
    assert plan.labels(0) == ("cfg: 3", "cfg: 7", "cfg: 11") and plan.labels(2) == ("sampler: Euler", "sampler: DDIM")
    assert {c.request.seed for c in plan.cells} == {3}


def test_a_random_seed_is_fixed_once_for_the_whole_plot():
    plan = build_plan(BASE.replace(seed=-1), "cfg=3,7")
    assert len({c.request.seed for c in plan.cells}) == 1 and plan.base.seed >= 0
    seeds = build_plan(BASE, "seed=-1,5").axes[0].values
    assert seeds[0] >= 0 and seeds[1] == 5


def _dark(region: Image.Image) -> int:
    return int((np.asarray(region.convert("L")) < 128).sum())


def test_grid_size_labels_and_images(engine):
    plan = build_plan(BASE, "cfg=3,7,11", "steps=2,3")
    events = []
    result = run_xyz(engine, plan, progress=events.append)
    assert len(result.results) == 6 and len(result.grids) == 1
    assert [r.request.cfg_scale for r in result.results] == [3.0, 7.0, 11.0] * 2
    grid = result.grids[0]
    assert grid.cell_size == (64, 64) and grid.left > 0 and grid.top > 0
    assert grid.image.size == (grid.left + 3 * 64, grid.top + 2 * 64)
    assert _dark(grid.image.crop((grid.left, 0, grid.image.width, grid.top))) > 20   # column labels
    assert _dark(grid.image.crop((0, grid.top, grid.left, grid.image.height))) > 20  # row labels
    for n, cell in enumerate(plan.cells):
        x0, y0 = grid.left + cell.x * 64, grid.top + cell.y * 64
        pasted = grid.image.crop((x0, y0, x0 + 64, y0 + 64))
        assert pasted.tobytes() == result.results[n].images[0].image.tobytes()
    assert grid.infotext.startswith(result.results[0].images[0].infotext + ", Script: X/Y/Z plot, X Type: cfg, ")
    assert 'X Values: "3, 7, 11", Y Type: steps, Y Values: "2, 3"' in grid.infotext
    assert grid.image.info["parameters"] == grid.infotext
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {e.cell for e in events} == set(range(6))


def test_one_grid_per_z_value_with_a_title(engine):
    plan = build_plan(BASE, "cfg=3,7", z="sampler=Euler,DPM++ 2M")
    result = run_xyz(engine, plan)
    assert len(result.results) == 4 and len(result.grids) == 2
    for grid in result.grids:
        assert grid.left == 0 and grid.image.size == (2 * 64, grid.top + 64)
    assert "Z Type: sampler" in result.grids[1].infotext
    assert result.results[2].request.sampler == "DPM++ 2M"


def test_bad_cells_fail_before_anything_runs(engine):
    plan = build_plan(BASE, "cfg=3,7", "sampler=Euler,Nonsense")
    calls = []
    with pytest.raises(RequestError, match=r"X/Y/Z cell \(cfg: 3, sampler: Nonsense\): .*Nonsense"):
        run_xyz(engine, plan, progress=calls.append)
    assert calls == []


def test_cli_xyz_writes_images_and_grid(tmp_path, tiny_model):
    (tmp_path / "home" / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, tmp_path / "home" / "models" / "tiny")
    proc = run(["xyz", "--x", "cfg=3,7", "--y", "steps=2,3", "a red circle", "-m", "tiny", "--seed", "4",
                "--sampler", "Euler"], tmp_path, tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    paths = [tmp_path / p for p in proc.stdout.split()]
    assert len(paths) == 5 and all(p.exists() for p in paths)
    assert all(p.parent.parent.name == "txt2img-images" for p in paths[:4])
    grid = paths[4]
    assert grid.parent == tmp_path / "outputs" / "txt2img-grids" / date.today().isoformat()
    assert grid.name == "00000-xyz-grid.png"
    meta = read_metadata(grid)
    assert "Script: X/Y/Z plot, X Type: cfg" in meta.infotext
    with Image.open(grid) as im:
        assert im.width > 2 * 64 and im.height > 2 * 64
    last = read_metadata(paths[3]).infotext
    assert "Steps: 3, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 4" in last

    bad = run(["xyz", "--x", "colour=1,2", "a red circle", "-m", "tiny"], tmp_path, tmp_path / "home")
    assert bad.returncode == 2 and "unknown X/Y/Z axis 'colour'" in bad.stderr and "guidance_rescale" in bad.stderr


def test_grid_of_different_sizes_centres_each_image(engine):
    result = run_xyz(engine, build_plan(BASE, "size=64x64,96x64"))
    grid = result.grids[0]
    assert grid.cell_size == (96, 64) and grid.image.size == (2 * 96, grid.top + 64)
    first = grid.image.crop((16, grid.top, 16 + 64, grid.top + 64))
    assert first.tobytes() == result.results[0].images[0].image.tobytes()



def test_cli_help_names_every_axis():
    from sdstudio.cli.xyz import AXES

    assert all(name in AXES for name in AXIS_KINDS)
