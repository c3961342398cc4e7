"""ControlNet preprocessors: turn a user's picture into the control image a ControlNet was trained on.

Built in (no files needed): canny, scribble, lineart, tile (blur), shuffle, and the inpaint control
(made from the init image and mask in engine/sd/control.py). Pose and depth need `controlnet_aux` and
its annotator weights on disk; without them the error says which file is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from sdstudio.errors import RequestError

ANNOTATORS = {"openpose": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
              "depth": ("dpt_hybrid-midas-501f0c75.pt",)}


def canny_edges(pixels: Tensor, low: float = 100.0, high: float = 200.0) -> Tensor:
    """Canny (1986) edges of (B, 3, H, W) images in [0, 255] -> (B, 1, H, W) 0/1, as OpenCV computes them:
    3x3 Sobel per channel, L1 magnitude |gx| + |gy| of the strongest channel, non-maximum suppression
    along the gradient direction quantised to 0/45/90/135 degrees, then hysteresis: pixels >= high are
    edges, pixels >= low are edges when connected to one."""
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]                         # (2, 1, 3, 3)
    b, c, h, w = pixels.shape
    grads = F.conv2d(F.pad(pixels.reshape(b * c, 1, h, w).float(), (1, 1, 1, 1), mode="replicate"), kernels)
    grads = grads.reshape(b, c, 2, h, w)
    magnitude = grads.abs().sum(2)                                                 # (B, C, H, W)
    best = magnitude.argmax(1, keepdim=True)                                       # strongest channel
    mag = magnitude.gather(1, best)                                                # (B, 1, H, W)
    gx = grads[:, :, 0].gather(1, best)
    gy = grads[:, :, 1].gather(1, best)
    angle = torch.remainder(torch.rad2deg(torch.atan2(gy, gx)), 180.0)
    sector = (((angle + 22.5) // 45) % 4).long()                                  # 0: -, 1: /, 2: |, 3: \
    padded = F.pad(mag, (1, 1, 1, 1))
    offsets = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]  # (dy, dx) pairs
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for k, ((y1, x1), (y2, x2)) in enumerate(offsets):
        n1 = padded[..., 1 + y1:1 + y1 + h, 1 + x1:1 + x1 + w]
        n2 = padded[..., 1 + y2:1 + y2 + h, 1 + x2:1 + x2 + w]
        keep |= (sector == k) & (mag > n1) & (mag >= n2)
    thin = mag * keep
    weak, strong = thin >= low, thin >= high
    while True:  # grow strong edges into connected weak pixels (8-neighbourhood)
        grown = weak & (F.max_pool2d(strong.float(), 3, 1, 1) > 0)
        if torch.equal(grown, strong):
            return strong.float()
        strong = grown | strong


def _to_tensor(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), np.float32)).permute(2, 0, 1)[None]


def _from_mask(mask: Tensor) -> Image.Image:
    grey = (mask[0, 0].numpy() * 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """White edges on black, as lllyasviel's canny ControlNets expect."""
    return _from_mask(canny_edges(_to_tensor(image), low, high))


def scribble(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """Scribble from edges: canny edges thickened to a hand-drawn stroke width (about 1/128 of the side)."""
    edges = canny_edges(_to_tensor(image), low, high)
    width = max(3, round(max(image.size) / 128) * 2 + 1)
    return _from_mask(F.max_pool2d(edges, width, 1, width // 2))


def lineart(image: Image.Image) -> Image.Image:
    """Simple line art: the Sobel gradient magnitude of the strongest channel, normalised, as soft white
    lines on black (lineart ControlNets take white on black)."""
    pixels = _to_tensor(image)
    _, c, h, w = pixels.shape
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    grads = F.conv2d(F.pad(pixels.reshape(c, 1, h, w), (1, 1, 1, 1), mode="replicate"),
                     torch.stack([sobel_x, sobel_x.T])[:, None])                    # (C, 2, H, W)
    mag = grads.abs().sum(1).amax(0)                                               # (H, W)
    lines = (mag / mag.max().clamp(min=1.0)).sqrt()
    return _from_mask(lines[None, None])


def tile(image: Image.Image, down: float = 4.0) -> Image.Image:
    """Tile/blur: the picture at 1/down resolution, scaled back (the tile ControlNet adds the detail)."""
    small = image.convert("RGB").resize((max(1, round(image.width / down)), max(1, round(image.height / down))),
                                        Image.Resampling.BICUBIC)
    return small.resize(image.size, Image.Resampling.BICUBIC)


def shuffle(image: Image.Image, seed: int = 0) -> Image.Image:
    """Content shuffle: pixels displaced by a smooth random flow field (as the shuffle ControlNet was
    trained), so colours and textures stay and the layout goes."""
    w, h = image.size
    g = torch.Generator("cpu").manual_seed(seed)
    flow = torch.rand(1, 2, 4, 4, generator=g) * 2 - 1                         # coarse offsets in [-1, 1]
    flow = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    moved = F.grid_sample(_to_tensor(image), flow.clamp(-1, 1), padding_mode="border", align_corners=False)
    return Image.fromarray(moved[0].permute(1, 2, 0).round().byte().numpy())


def invert_if_white_background(image: Image.Image) -> Image.Image:
    """User drawings are usually black on white; ControlNets take white on black."""
    grey = np.asarray(image.convert("L"))
    return ImageOps.invert(image.convert("RGB")) if grey.mean() > 127 else image.convert("RGB")


def annotator(name: str, folder: Path | None) -> Callable[[Image.Image], Image.Image]:
    """Pose/depth through controlnet_aux with annotator weights from `folder` (never downloaded)."""
    files = ANNOTATORS[name]
    if folder is None or not all((folder / f).is_file() for f in files):
        where = folder or "the annotators folder (SDSTUDIO_HOME/annotators)"
        raise RequestError(f"the {name} preprocessor needs {', '.join(files)} in {where}; copy it there from "
                           "lllyasviel/Annotators, or give a ready-made control image with preprocessor 'none'",
                           "preprocessor")
    try:
        import controlnet_aux
    except ImportError as e:
        raise RequestError(f"the {name} preprocessor needs the controlnet_aux package: pip install controlnet_aux",
                           "preprocessor") from e
    detector = (controlnet_aux.OpenposeDetector if name == "openpose" else controlnet_aux.MidasDetector)
    try:
        model = detector.from_pretrained(str(folder))
    except (OSError, RuntimeError, ValueError) as e:
        raise RequestError(f"the {name} annotator in {folder} could not be loaded: {e}", "preprocessor") from e
    return lambda image: model(image).convert("RGB").resize(image.size)


PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda image: image.convert("RGB"),
    "canny": canny,
    "scribble": scribble,
    "lineart": lineart,
    "tile": tile,
    "blur": tile,
    "shuffle": shuffle,
    "invert": invert_if_white_background,
}
NEEDS_FILES = tuple(ANNOTATORS)
ALL_PREPROCESSORS = (*PREPROCESSORS, "inpaint", *NEEDS_FILES)


def preprocess(name: str, image: Image.Image, annotators: Path | None = None) -> Image.Image:
    if name in PREPROCESSORS:
        return PREPROCESSORS[name](image)
    if name in ANNOTATORS:
        return annotator(name, annotators)(image)
    raise RequestError(f"unknown preprocessor {name!r}; choose one of {', '.join(ALL_PREPROCESSORS)}",
                       "preprocessor")
