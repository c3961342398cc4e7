"""Inpainting and outpainting on the bundled demo models: what a user sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.a1111.names import MASKED_CONTENT
from sdstudio.engine.workflows.outpaint import Extension, outpaint_request
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.train.shapes import ShapeSpec, draw

MODELS = [name for name in ("demo", "demo-inpaint") if (PACKAGED_MODELS / name).is_dir()]
YELLOW, GREEN = np.array([240, 220, 40]), np.array([40, 170, 60])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Engine:
    home = tmp_path_factory.mktemp("demo-inpaint-home")
    return Engine(Settings.from_env(home=home, outputs_dir=home / "outputs", device=torch.device("cpu"),
                                    dtype=torch.float32, default_model="demo"))


def red_circle() -> Image.Image:
    return draw(ShapeSpec("circle", "red", "blue", "large", (1, 1)), 64)


def centre_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((12, 12, 51, 51), fill=255)
    return mask


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def distance(colour: np.ndarray, target: np.ndarray) -> float:
    return float(np.abs(colour - target).mean())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("content", MASKED_CONTENT)
def test_masked_area_follows_the_prompt_and_the_rest_is_kept(demo, model, content):
    init, mask = red_circle(), centre_mask()
    req = GenerationRequest(prompt="a large yellow circle in the center on a blue background", model=model,
                            init_image=init, mask=mask, seed=5, strength=1.0, masked_content=content)
    kept = demo.generate(req).images[0].image
    inside = rgb(kept)[26:38, 26:38].reshape(-1, 3).mean(0)
    assert distance(inside, YELLOW) < 40, inside
    outside = np.asarray(mask) < 128
    assert (rgb(kept)[outside] == rgb(init)[outside]).all()
    loose = rgb(demo.generate(req.replace(keep_unmasked=False)).images[0].image)
    diff = np.abs(loose - rgb(init))[outside]
    assert 0 < diff.max() <= 48 and diff.mean() < 2  # without paste-back: the VAE round trip, nothing more


@pytest.mark.parametrize("model", MODELS)
def test_only_masked_repaints_the_box_at_full_resolution(demo, model):
    init = Image.new("RGB", (128, 128), (40, 80, 220))
    init.paste(red_circle(), (64, 0))
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).ellipse((82, 18, 109, 45), fill=255)  # the circle, in the top-right quarter
    result = demo.generate(GenerationRequest(prompt="a large yellow circle in the center on a blue background",
                                             model=model, init_image=init, mask=mask, seed=2, strength=1.0,
                                             only_masked=True, only_masked_padding=16))
    out = rgb(result.images[0].image)
    assert out.shape == (128, 128, 3) and result.request.width == 64
    changed = np.argwhere((out != rgb(init)).any(-1))
    assert changed.min(0).tolist() >= [0, 64] and changed.max(0).tolist() <= [63, 127]  # inside the padded box
    assert distance(out[26:38, 90:102].reshape(-1, 3).mean(0), YELLOW) < 40


@pytest.mark.parametrize("model", MODELS)
def test_outpainting_extends_the_canvas_and_follows_the_prompt(demo, model):
    init = red_circle()
    req = GenerationRequest(prompt="a red circle on a green background", model=model, seed=3, strength=0.9)
    result = demo.generate(outpaint_request(req, init, Extension(right=32)))
    out = rgb(result.images[0].image)
    assert out.shape == (64, 96, 3)
    assert (out[:, :56] == rgb(init)[:, :56]).all()  # left of the 8 px overlap: the user's pixels
    assert distance(out[:, 72:].reshape(-1, 3).mean(0), GREEN) < 40
