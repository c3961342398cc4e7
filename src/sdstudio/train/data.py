"""Training data: a folder of images with same-named .txt captions, or the streamed shapes dataset.

Batches are a pure function of (seed, step): sample p = step * batch + j of the run is item
perm_e[p mod n] of epoch e = p // n, with perm_e a seeded permutation. So a resumed run sees exactly
the batches an uninterrupted one would have.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sdstudio.errors import SdStudioError
from sdstudio.train.shapes import ShapesDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TrainDataError(SdStudioError):
    """The training data is unusable; the message names the file."""


class CaptionedImages(Protocol):
    """Index -> (RGB image, caption). `size` is None for an endless stream."""

    @property
    def size(self) -> int | None: ...

    def item(self, index: int) -> tuple[Image.Image, str]: ...


@dataclass(frozen=True)
class CaptionFolder:
    """Images with a same-named .txt caption beside each (the kohya / A1111 convention)."""

    images: tuple[Path, ...]

    @classmethod
    def open(cls, folder: Path) -> CaptionFolder:
        if not folder.is_dir():
            raise TrainDataError(f"training data folder not found: {folder}")
        images = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            raise TrainDataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        for path in images:
            if not path.with_suffix(".txt").is_file():
                raise TrainDataError(f"missing caption for {path}: expected {path.with_suffix('.txt').name}")
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for broken files
                raise TrainDataError(f"cannot read image {path}: {e}") from None
        return cls(images)

    @property
    def size(self) -> int | None:
        return len(self.images)

    def item(self, index: int) -> tuple[Image.Image, str]:
        path = self.images[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:
            raise TrainDataError(f"cannot read image {path}: {e}") from None
        return image, path.with_suffix(".txt").read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class ShapesStream:
    """The procedural shapes dataset, drawn on demand: nothing is written to disk."""

    dataset: ShapesDataset

    @property
    def size(self) -> int | None:
        return None

    def item(self, index: int) -> tuple[Image.Image, str]:
        return self.dataset[index]


def open_data(source: str, seed: int, resolution: int) -> CaptionedImages:
    """'shapes' streams the procedural dataset; anything else is a caption folder."""
    if source == "shapes":
        return ShapesStream(ShapesDataset(seed=seed, size=resolution))
    return CaptionFolder.open(Path(source))


def batch_indices(seed: int, step: int, batch: int, size: int | None) -> list[int]:
    positions = range(step * batch, (step + 1) * batch)
    if size is None:
        return list(positions)
    perms: dict[int, list[int]] = {}
    out = []
    for p in positions:
        epoch, k = divmod(p, size)
        if epoch not in perms:
            perms[epoch] = list(range(size))
            random.Random(f"{seed}:epoch:{epoch}").shuffle(perms[epoch])
        out.append(perms[epoch][k])
    return out


def to_tensor(image: Image.Image, resolution: int) -> Tensor:
    """(3, R, R) in [-1, 1]: resize the short side to R (Lanczos), centre crop."""
    image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def load_batch(data: CaptionedImages, indices: Sequence[int], resolution: int) -> tuple[Tensor, list[str]]:
    items = [data.item(i) for i in indices]
    return torch.stack([to_tensor(im, resolution) for im, _ in items]), [c for _, c in items]
