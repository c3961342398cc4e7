"""Score a shapes ControlNet: does the shape appear where the control image's edges put it?

For N seeded cases: the canny edges of a white shape (random kind, size and place) on black are the
control image; the prompt names a colour, the same shape and a background, but no place or size. The
analyser reads the place back. The same request without the ControlNet is the baseline.
Usage: python scripts/eval_demo_controlnet.py [CONTROLNET] [N]   (default: demo-canny 48)
"""

from __future__ import annotations

import random
import sys

import torch

from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.engine.requests import ControlUnit
from sdstudio.engine.sd.preprocess import canny
from sdstudio.train.analyse import analyse
from sdstudio.train.shapes import COLOURS, ShapeSpec, draw

SHAPES = ("circle", "square", "triangle", "diamond")


def main(net: str, count: int) -> None:
    engine = Engine(Settings.from_env(device=torch.device("cpu"), dtype=torch.float32))
    rng = random.Random(0)
    hits = {"position": 0, "shape": 0, "colour": 0, "baseline position": 0}
    for k in range(count):
        shape, (colour, background) = rng.choice(SHAPES), rng.sample(list(COLOURS), 2)
        position, size = (rng.randrange(3), rng.randrange(3)), rng.choice(["small", "large"])
        edges = canny(draw(ShapeSpec(shape, "white", "black", size, position), 64))
        req = GenerationRequest(prompt=f"a {colour} {shape} on a {background} background", seed=k, steps=20,
                                controlnets=(ControlUnit(net, edges),))
        found = analyse(engine.generate(req).images[0].image)
        plain = analyse(engine.generate(req.replace(controlnets=())).images[0].image)
        hits["position"] += found.position == position
        hits["shape"] += found.shape == shape
        hits["colour"] += found.colour == colour
        hits["baseline position"] += plain.position == position
    print(f"{net} ({count} cases): " + ", ".join(f"{k} {v / count:.1%}" for k, v in hits.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-canny", int(sys.argv[2]) if len(sys.argv) > 2 else 48)
