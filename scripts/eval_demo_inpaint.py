"""Score inpainting on the demo models: repaint the shape's box with another shape and colour.

For 48 cases (seeded): draw a large shape, mask its box plus 4 px, prompt a different colour and
shape at the same place on the same background; read the result back with the shapes analyser.
Usage: python scripts/eval_demo_inpaint.py [MODEL ...]   (default: demo demo-inpaint)
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.train.analyse import analyse
from sdstudio.train.shapes import COLOURS, POSITIONS, SIZES, ShapeSpec, centre, draw

SHAPES = ("circle", "square", "triangle", "diamond")


def cases(count: int = 48, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        background, colour, new_colour = rng.sample(list(COLOURS), 3)
        shape, new_shape = rng.sample(SHAPES, 2)
        position = (rng.randrange(3), rng.randrange(3))
        yield ShapeSpec(shape, colour, background, "large", position), new_shape, new_colour


def main(models: list[str]) -> None:
    engine = Engine(Settings.from_env(device=torch.device("cpu"), dtype=torch.float32))
    for model in models:
        colour_ok = shape_ok = 0
        kept = []
        all_cases = list(cases())
        for k, (spec, new_shape, new_colour) in enumerate(all_cases):
            image = draw(spec, 64)
            x, y = centre(spec)
            half = SIZES["large"] * 32 + 4
            mask = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(mask).rectangle((x * 64 - half, y * 64 - half, x * 64 + half, y * 64 + half), fill=255)
            prompt = f"a large {new_colour} {new_shape} {POSITIONS[spec.position]} on a {spec.background} background"
            out = engine.generate(GenerationRequest(prompt=prompt, model=model, init_image=image, mask=mask,
                                                    strength=1.0, seed=k, steps=20)).images[0].image
            found = analyse(out)
            colour_ok += found.colour == new_colour
            shape_ok += found.shape == new_shape
            outside = np.asarray(mask) < 128
            kept.append(float((np.asarray(out)[outside] == np.asarray(image)[outside]).all()))
        n = len(all_cases)
        print(f"{model}: colour {colour_ok / n:.1%}, shape {shape_ok / n:.1%}, "
              f"outside unchanged {np.mean(kept):.0%} ({n} cases)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["demo", "demo-inpaint"])
