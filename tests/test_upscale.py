"""Upscaling: resamplers, latent upscale modes, the SD x4 upscaler (tiny, against diffusers' own pipeline), the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

from sdstudio import Engine
from sdstudio.engine.hooks import CancelToken
from sdstudio.engine.pipelines.upscale import (
    POSTPROCESS_CHUNK,
    RESAMPLERS,
    UPSCALE_RECORD_CHUNK,
    UpscaleRequest,
    latent_mode,
    latent_upscale_modes,
    list_upscalers,
    save_upscale,
    upscale_image,
    upscale_latents,
)
from sdstudio.errors import Cancelled, RequestError
from sdstudio.storage.images import read_png_text
from sdstudio.testing.tiny_upscaler import build_tiny_x4

from .conftest import make_settings, shapes_image


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def x4_dir(tmp_path_factory) -> Path:
    return build_tiny_x4(tmp_path_factory.mktemp("upscalers") / "tiny-x4")


@pytest.fixture(scope="module")
def up_engine(tmp_path_factory, x4_dir) -> Engine:
    return Engine(make_settings(tmp_path_factory.mktemp("home-upscale"), x4_dir.parent))


def x4(image: Image.Image, **fields) -> UpscaleRequest:
    return UpscaleRequest(image, **{"upscaler": "tiny-x4", "steps": 3, "seed": 3, **fields})


# --- resamplers and latent modes --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RESAMPLERS))
def test_resamplers_give_the_right_sizes(name):
    image = noise_image(10, 7)
    assert upscale_image(image, 2, name).size == (20, 14)
    assert upscale_image(image, 1.5, name.lower()).size == (15, 11)  # rounded half up; names in any case
    assert upscale_image(image, (33, 21), name).size == (33, 21)


def test_lanczos_equals_pil_and_nearest_repeats_pixels():
    image = noise_image(12, 9)
    lanczos = image.resize((48, 36), Image.Resampling.LANCZOS)
    assert np.array_equal(pixels(upscale_image(image, 4, "Lanczos")), pixels(lanczos))
    assert np.array_equal(pixels(upscale_image(image, 4, "None")), pixels(lanczos))  # A1111: None resizes by Lanczos
    nearest = np.repeat(np.repeat(pixels(image), 2, axis=0), 2, axis=1)
    assert np.array_equal(pixels(upscale_image(image, 2, "Nearest")), nearest)


def test_unknown_resampler_lists_valid_names():
    with pytest.raises(RequestError, match="unknown upscaler 'Lanczoz': use one of None, Lanczos, Nearest, Bilinear, "
                                           "Bicubic") as e:
        upscale_image(noise_image(4, 4), 2, "Lanczoz")
    assert e.value.field == "upscaler"


@pytest.mark.parametrize("mode", latent_upscale_modes())
def test_latent_modes_give_the_right_shapes(mode):
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    out = upscale_latents(latents, (16, 12), mode)
    assert out.shape == (2, 4, 16, 12) and out.dtype == torch.float32
    assert upscale_latents(latents.half(), (12, 9), mode).dtype == torch.float16
    assert latent_mode(mode.upper()).name == mode


def test_latent_modes_are_a1111s_interpolations():
    latents = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(upscale_latents(latents, (10, 14), "Latent"),
                       F.interpolate(latents, size=(10, 14), mode="bilinear"))
    assert torch.equal(upscale_latents(latents, (10, 14), "Latent (bicubic antialiased)"),
                       F.interpolate(latents, size=(10, 14), mode="bicubic", antialias=True))
    doubled = latents.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(upscale_latents(latents, (10, 14), "Latent (nearest)"), doubled)
    with pytest.raises(RequestError, match=r"unknown latent upscale mode 'Latent \(linear\)': use one of Latent, "):
        upscale_latents(latents, (10, 14), "Latent (linear)")


def test_upscaler_list_has_a1111s_shape(up_engine, x4_dir):
    listed = [u.to_dict() for u in up_engine.upscalers.available()]
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in listed)
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "Bilinear", "Bicubic", "tiny-x4"]
    assert listed[-1] == {"name": "tiny-x4", "model_name": "tiny-x4", "model_path": str(x4_dir), "model_url": None,
                          "scale": 4.0}
    assert list_upscalers()[1].to_dict() == {"name": "Lanczos", "model_name": None, "model_path": None,
                                             "model_url": None, "scale": 4.0}


# --- the upscale job ----------------------------------------------------------------------------------------------

def test_resampler_job_describes_itself_as_a1111_extras(up_engine, tmp_path):
    source = shapes_image(32)
    source.info["parameters"] = "a red disc\nSteps: 5, Sampler: Euler, Seed: 1"
    events = []
    result = up_engine.upscale(UpscaleRequest(source, scale=2, upscaler="bicubic"), progress=events.append)
    assert result.image.size == (64, 64) and result.seed is None
    assert result.infotext == "Postprocess upscale by: 2, Postprocess upscaler: Bicubic"
    assert result.image.info["parameters"] == source.info["parameters"]  # the source's parameters are kept
    assert result.record["request"]["image"]["size"] == [32, 32]
    assert [(e.step, e.steps) for e in events] == [(1, 1)]

    path = save_upscale(result, tmp_path)
    assert path.name == "00000-bicubic.png" and path.parent.parent == tmp_path / "extras-images"
    chunks = read_png_text(path)
    assert chunks[POSTPROCESS_CHUNK] == result.infotext and chunks["parameters"] == source.info["parameters"]
    assert json.loads(chunks[UPSCALE_RECORD_CHUNK])["upscaler"] == {"name": "Bicubic", "kind": "resampler"}


def test_x4_output_is_4x_and_deterministic(up_engine, tmp_path):
    image = shapes_image(32)
    first = up_engine.upscale(x4(image, prompt="a red disc"))
    again = up_engine.upscale(x4(image, prompt="a red disc"))
    other = up_engine.upscale(x4(image, prompt="a red disc", seed=4))
    assert first.image.size == (128, 128) and first.seed == 3
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert not np.array_equal(pixels(first.image), pixels(other.image))
    assert first.infotext.startswith("a red disc\nPostprocess upscale by: 4, Postprocess upscaler: tiny-x4, Steps: 3, "
                                     "CFG scale: 9, Seed: 3, Noise level: 20, Size: 128x128, Model hash: ")
    assert first.record["upscaler"]["kind"] == "x4" and first.record["output"]["seed"] == 3
    path = save_upscale(first, tmp_path)
    assert path.name == "00000-3.png"
    assert json.loads(read_png_text(path)[UPSCALE_RECORD_CHUNK])["request"]["noise_level"] == 20


def test_x4_matches_diffusers_pipeline(up_engine, x4_dir):
    image = noise_image(24, 16, seed=5)
    fields = {"prompt": "a cat", "negative_prompt": "blurry", "cfg_scale": 6.5, "noise_level": 50, "seed": 11}
    ours = up_engine.upscale(x4(image, **fields)).image
    pipe = StableDiffusionUpscalePipeline.from_pretrained(x4_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a cat", negative_prompt="blurry", image=image, num_inference_steps=3, guidance_scale=6.5,
                  noise_level=50, generator=torch.Generator("cpu").manual_seed(11)).images[0]
    assert ours.size == theirs.size == (96, 64)
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_x4_pads_odd_sizes_and_scales_below_4(up_engine):
    assert up_engine.upscale(x4(noise_image(30, 22))).image.size == (120, 88)
    image = shapes_image(32)
    four, two = up_engine.upscale(x4(image)), up_engine.upscale(x4(image, scale=2))
    assert two.image.size == (64, 64)
    assert np.array_equal(pixels(two.image), pixels(four.image.resize((64, 64), Image.Resampling.LANCZOS)))
    assert "Postprocess upscale by: 2, " in two.infotext and "Size: 64x64" in two.infotext


def test_x4_progress_events_arrive(up_engine):
    events = []
    up_engine.upscale(x4(noise_image(24, 16), steps=4), progress=events.append)
    assert [(e.step, e.steps, e.iteration, e.n_iter) for e in events] == [(s, 4, 0, 1) for s in range(1, 5)]
    assert events[-1].fraction == 1.0
    assert events[1].preview().size == (24, 16)  # latents live on the input's pixel grid


def test_x4_cancel_stops_the_job(up_engine):
    token, events = CancelToken(), []

    def on_event(event):
        events.append(event.step)
        if event.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        up_engine.upscale(x4(noise_image(16, 16), steps=5), progress=on_event, cancel=token)
    assert events == [1, 2]
    with pytest.raises(Cancelled):  # cancelled before it starts
        up_engine.upscale(x4(noise_image(16, 16)), cancel=token)


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"upscaler": "nope"}, "upscaler",
     "unknown upscaler 'nope': use one of None, Lanczos, Nearest, Bilinear, Bicubic, tiny-x4, or the folder"),
    ({"upscaler": "Latent (bicubic)"}, "upscaler", "is a latent upscale mode (hires fix only)"),
    ({"scale": 0.5}, "scale", "scale must be a number from 1 to 8, got 0.5"),
    ({"scale": 8, "image": noise_image(600, 10)}, "scale", "would be 4800x80 pixels, over the limit of 4096"),
    ({"upscaler": "tiny-x4", "scale": 8}, "scale", "the x4 upscaler model scales by at most 4"),
    ({"upscaler": "tiny-x4", "noise_level": 400}, "noise_level", "noise_level must be between 0 and 350"),
    ({"upscaler": "tiny-x4", "image": noise_image(6, 20)}, "image", "at least 8x8 pixels, got 6x20"),
    ({"prompt": "a cat"}, "prompt", "a prompt needs an x4 upscaler model; Lanczos is a plain resampler"),
    ({"upscaler": "tiny-x4", "steps": 0}, "steps", "steps must be between 1 and 150, got 0"),
])
def test_bad_requests_say_what_to_fix(up_engine, fields, field, message):
    request = UpscaleRequest(**{"image": noise_image(16, 16), **fields})
    with pytest.raises(RequestError) as e:
        up_engine.upscale(request)
    assert message in str(e.value) and e.value.field == field


def test_a_folder_that_is_not_an_x4_model_is_refused(up_engine, tiny_model):
    with pytest.raises(RequestError, match="is not an x4 upscaler model"):
        up_engine.upscale(UpscaleRequest(noise_image(16, 16), upscaler=str(tiny_model)))


def test_x4_model_by_path(up_engine, x4_dir):
    result = up_engine.upscale(x4(noise_image(16, 16), upscaler=str(x4_dir), steps=1))
    assert result.image.size == (64, 64) and result.request.upscaler == "tiny-x4"


# --- the CLI ------------------------------------------------------------------------------------------------------

def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SDSTUDIO_HOME": str(cwd / "home"), "SDSTUDIO_DEVICE": "cpu", "COLUMNS": "200"}
    env.pop("SDSTUDIO_MODEL", None)
    return subprocess.run([sys.executable, "-m", "sdstudio", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_upscales_with_a_resampler_and_the_x4_model(tmp_path, x4_dir):
    shutil.copytree(x4_dir, tmp_path / "home" / "models" / "tiny-x4")
    shapes_image(32).save(tmp_path / "in.png")

    plain = run_cli(["upscale", "in.png", "--scale", "2", "-o", "out"], tmp_path)
    assert plain.returncode == 0, plain.stderr
    path = tmp_path / plain.stdout.strip()
    assert path.name == "00000-lanczos.png" and path.parent.parent == tmp_path / "out" / "extras-images"
    assert Image.open(path).size == (64, 64)
    assert read_png_text(path)[POSTPROCESS_CHUNK] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"

    model = run_cli(["upscale", "in.png", "-u", "tiny-x4", "--steps", "2", "--seed", "3", "--prompt", "a disc",
                     "--noise-level", "30", "-o", "out"], tmp_path)
    assert model.returncode == 0, model.stderr
    path = tmp_path / model.stdout.strip()
    assert path.name == "00001-3.png" and Image.open(path).size == (128, 128)
    assert "Noise level: 30" in read_png_text(path)[POSTPROCESS_CHUNK]


@pytest.mark.parametrize(("args", "message"), [
    (["-u", "nope"], "error: unknown upscaler 'nope': use one of None, Lanczos, Nearest, Bilinear, Bicubic, or"),
    (["--steps", "3"], "error: --steps applies only to an x4 upscaler model; Lanczos is a plain resampler"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    shapes_image(16).save(tmp_path / "in.png")
    proc = run_cli(["upscale", "in.png", *args], tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message) and "Traceback" not in proc.stderr, proc.stderr
