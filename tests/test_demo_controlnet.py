"""The bundled demo ControlNet: the shape appears where the control image's edges put it."""

from __future__ import annotations

import pytest
import torch

from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.engine.requests import ControlUnit
from sdstudio.engine.sd.preprocess import canny
from sdstudio.train.analyse import analyse
from sdstudio.train.shapes import ShapeSpec, draw


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Engine:
    home = tmp_path_factory.mktemp("demo-controlnet-home")
    return Engine(Settings.from_env(home=home, outputs_dir=home / "outputs", device=torch.device("cpu"),
                                    dtype=torch.float32, default_model="demo"))


@pytest.mark.parametrize(("shape", "position"), [("circle", (0, 0)), ("square", (2, 2)), ("triangle", (0, 2))])
def test_the_shape_appears_where_the_edges_are(demo, shape, position):
    edges = canny(draw(ShapeSpec(shape, "white", "black", "large", position), 64))
    prompt = f"a red {shape} on a blue background"  # the prompt says nothing about where
    req = GenerationRequest(prompt=prompt, seed=1, steps=20,
                            controlnets=(ControlUnit("demo-canny", edges, preprocessor="none"),))
    found = analyse(demo.generate(req).images[0].image)
    assert (found.colour, found.background, found.position) == ("red", "blue", position)
    assert 'Model: demo-canny [' in demo.generate(req.replace(steps=2)).images[0].infotext


def test_canny_preprocessor_on_a_picture(demo):
    picture = draw(ShapeSpec("diamond", "yellow", "black", "large", (2, 0)), 64)
    req = GenerationRequest(prompt="a green diamond on a white background", seed=2, steps=20,
                            controlnets=(ControlUnit("demo-canny", picture, preprocessor="canny"),))
    found = analyse(demo.generate(req).images[0].image)
    assert (found.colour, found.background, found.position) == ("green", "white", (2, 0))
