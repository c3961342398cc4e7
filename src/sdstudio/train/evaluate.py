"""Evaluating a shapes model: generate from held-out caption combinations, score with the analyser.

Each (shape, colour, background) triple held out of training is asked for with a random size and
position, full caption, at the default sampler; the analyser reads back background colour, shape
colour, position and shape type. Accuracy = fraction of images where the attribute matches.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from sdstudio.engine.engine import Engine
from sdstudio.engine.presets import with_companion, with_preset
from sdstudio.engine.requests import GenerationRequest
from sdstudio.train.analyse import analyse
from sdstudio.train.shapes import POSITIONS, SIZES, ShapeSpec, held_out

ATTRIBUTES = ("background", "colour", "position", "shape")
TARGETS = {"background": 0.9, "colour": 0.9, "position": 0.8, "shape": 0.7}


@dataclass(frozen=True)
class EvalReport:
    count: int
    correct: dict[str, int]
    images: list[Image.Image] = field(repr=False)
    captions: list[str] = field(repr=False)
    steps: int = 20

    def accuracy(self, attribute: str) -> float:
        return self.correct[attribute] / self.count


def eval_specs(per_triple: int, seed: int) -> list[ShapeSpec]:
    rng = random.Random(seed)
    return [ShapeSpec(shape, colour, background, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))
            for shape, colour, background in sorted(held_out()) for _ in range(per_triple)]


def evaluate(engine: Engine, model: str | None = None, per_triple: int = 4, steps: int | None = 20, seed: int = 0,
             on_image: Callable[[int, int], None] | None = None, preset: str | None = None) -> EvalReport:
    """preset: sample as a few-step preset says (its steps, unless `steps` is given), with the model's LoRA for it."""
    specs = eval_specs(per_triple, seed)
    fields = with_preset(preset, {}, {"steps": steps} if steps else {})
    lora = engine.preset_lora(preset, model)
    correct = dict.fromkeys(ATTRIBUTES, 0)
    images, captions = [], []
    for i, spec in enumerate(specs):
        caption = spec.caption()
        request = GenerationRequest(**{"steps": 20, **fields}, prompt=with_companion(caption, lora), seed=seed + i,
                                    model=model)
        result = engine.generate(request)
        image = result.images[0].image
        found = analyse(image)
        correct["background"] += found.background == spec.background
        correct["colour"] += found.colour == spec.colour
        correct["position"] += found.position == spec.position
        correct["shape"] += found.shape == spec.shape
        images.append(image)
        captions.append(caption)
        if on_image:
            on_image(i + 1, len(specs))
    return EvalReport(len(specs), correct, images, captions, request.steps if specs else 0)


def contact_sheet(images: list[Image.Image], columns: int = 12) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (128, 128, 128))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet
