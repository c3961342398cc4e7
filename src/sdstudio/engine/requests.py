"""Typed requests and results: what every door hands the engine and gets back."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdstudio.errors import RequestError
from sdstudio.storage.results import SavedImage, save_image, save_result

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT_SAMPLER = "DPM++ 2M"
IMAGES = ("init_image", "mask")  # request fields that hold pictures: recorded by size and pixel hash
DEFAULT_SCHEDULE = "Automatic"
TENSORS = ("init_latents",)  # request fields that hold tensors: recorded by shape only
DOOR_FIELDS = ("sampler_fallback",)  # how a door wants the request read, not what made the picture: not recorded
# The native JSON (and the record) keeps the hires fix flat, under the names clients send: key -> HiresFix field
HIRES_KEYS = {"hr_scale": "scale", "hr_resize_x": "resize_x", "hr_resize_y": "resize_y", "hr_upscaler": "upscaler",
              "hr_second_pass_steps": "steps", "hr_sampler_name": "sampler", "hr_scheduler": "schedule",
              "hr_prompt": "prompt", "hr_negative_prompt": "negative_prompt"}
INPAINT_FIELDS = ("mask_blur", "invert_mask", "masked_content", "inpaint_method", "only_masked",
                  "only_masked_padding", "keep_unmasked", "soft_inpainting")  # meaningful only with a mask


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit (A1111's ControlNet extension calls them units).

    image None: the init image is used (img2img, inpaint). resize_mode: "just resize" (stretch),
    "crop" (cover, centre-crop) or "fill" (fit, pad). guess_mode: A1111's "ControlNet is more important".
    """

    model: str                      # a ControlNet folder or file, by name or path
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    preprocessor: str = "none"      # none, canny, scribble, lineart, tile, shuffle, invert, inpaint, openpose, depth
    weight: float = 1.0
    start: float = 0.0              # fraction of the steps where the unit starts acting
    end: float = 1.0                # ... and stops
    guess_mode: bool = False
    resize_mode: str = "just resize"
    low_threshold: int = 100        # canny thresholds
    high_threshold: int = 200

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "image"}
        if self.image is not None:
            out["image"] = {"size": list(self.image.size), "sha256": image_sha256(self.image)}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlUnit:
        names = {f.name for f in dataclasses.fields(cls)} - {"image"}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class IpAdapterUnit:
    """One IP-Adapter (image prompt; engine/sd/ip_adapter.py): its images steer the picture with `weight`
    between the fractions `start` and `end` of the steps. encoder: the CLIP image encoder by name; empty: the
    first installed one whose widths fit the adapter."""

    model: str                      # an IP-Adapter file, by name (or path)
    images: tuple[Image.Image, ...] = field(default=(), compare=False, repr=False)
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    encoder: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "images"}
        out["images"] = [{"size": list(im.size), "sha256": image_sha256(im)} for im in self.images]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IpAdapterUnit:
        names = {f.name for f in dataclasses.fields(cls)} - {"images"}
        return cls(**{k: v for k, v in data.items() if k in names})


# fields that are tuples in the request and lists in JSON
TUPLE_FIELDS = ("original_size", "crop_left_top", "pag_layers", "freeu")

# ... and the variation seeds flat too: key -> Variation field
VARIATION_KEYS = {"subseed": "seed", "subseed_strength": "strength", "seed_resize_from_w": "resize_from_w",
                  "seed_resize_from_h": "resize_from_h"}


@dataclass(frozen=True)
class Variation:
    """Variation seeds as A1111 defines them (engine/sd/variation.py): with strength s > 0, image k starts from
    slerp(s, noise(the request's seed), noise(seed + k)), every image keeping the request's seed. resize_from:
    the request seed's noise is drawn at that size and pasted centred (0 x 0: off)."""

    seed: int = -1          # -1: random, fixed once per job
    strength: float = 0.0
    resize_from_w: int = 0
    resize_from_h: int = 0


@dataclass(frozen=True)
class HiresFix:
    """Hires fix (A1111's, txt2img only; engine/sd/hires.py): the first pass at width x height is upscaled to
    resize_x x resize_y (either 0: keep the aspect) or by `scale`, then redrawn by an img2img second pass of
    `steps` (0: the request's) at the request's `strength` on the same seeds. Empty sampler, schedule, prompt,
    negative_prompt: the first pass's."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"  # a latent mode ("Latent", "Latent (bicubic)", ...) or a resampler ("Lanczos", ...)
    steps: int = 0
    sampler: str = ""
    schedule: str = ""
    prompt: str = ""
    negative_prompt: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img or img2img job. img2img when `init_image` (or `init_latents`) is given.

    width/height None: the model's native size (txt2img) or the init image's size rounded down to
    the latent factor (img2img). seed -1: random; the result records the seed actually used.
    Image k of the job (k < batch_size * n_iter) uses seed + k (with a variation: seed, and variation.seed + k,
    as A1111). The JSON keeps `hires` and `variation` flat, under the keys clients send (HIRES_KEYS,
    VARIATION_KEYS): from_flat, replace and flat_fields translate.
    """

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    schedule: str = DEFAULT_SCHEDULE
    seed: int = -1
    variation: Variation = Variation()  # variation seeds and seed resize (off by default)
    batch_size: int = 1
    n_iter: int = 1
    model: str | None = None
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)
    strength: float = 0.75
    mask: Image.Image | None = field(default=None, compare=False, repr=False)  # inpainting: white = repaint
    mask_blur: int = 4           # Gaussian blur radius of the mask in pixels (A1111's "Mask blur")
    invert_mask: bool = False    # repaint the black part instead
    masked_content: str = "original"  # the masked area starts from: fill | original | latent noise | latent nothing
    inpaint_method: str = "auto"  # auto (the checkpoint's) | condition (9-channel UNet input) | blend (any model)
    only_masked: bool = False     # A1111's "Inpaint area: Only masked": generate the mask's box at width x height
    only_masked_padding: int = 32  # pixels of context around the mask's box ("Masked area padding")
    keep_unmasked: bool = True    # paste the result back so pixels outside the mask stay exactly as given
    soft_inpainting: bool = False  # grey mask values are per-pixel strengths instead of a 0/1 mask
    capture_every: int = 0  # keep latents and predicted x0 every N steps (0: off)
    prompt_syntax: str = "a1111"  # a1111 (weights, BREAK, [a:b:0.5], [a|b], AND) | compel | plain
    clip_skip: int = 1      # A1111's "Clip skip": 1 uses the text encoder's last layer, 2 the one before...
    vae: str | None = None  # None/"auto": the model's own VAE; "none" likewise; or a VAE file's name or path
    guidance_rescale: float = 0.0    # rescale-CFG phi (Lin et al. 2023, sec. 3.4); 0 is plain CFG
    zero_terminal_snr: bool = False  # rescale the noise schedule to zero terminal SNR (ibid. sec. 3.1)
    eta_noise_seed_delta: int = 0    # A1111's ENSD: step noise of stochastic samplers from seed + this (0: seed's)
    eta: float | None = None         # DDIM's eta, TCD's gamma: noise re-added per step (None: DDIM 0, TCD 0.3)
    # Guidance add-ons (engine/sd/guidance.py): how the predictions combine, PAG, FreeU
    guidance: str = "cfg"            # cfg | cfg-zero* (Fan et al. 2025) | apg (Sadat et al. 2024)
    apg_eta: float = 1.0             # APG: weight of the guidance's part parallel to the prediction
    apg_norm_threshold: float = 15.0  # APG: the guidance's norm is clipped to this (0: no clipping)
    apg_momentum: float = 0.0        # APG: running average of the guidance over the steps (0: off)
    pag_scale: float = 0.0           # perturbed-attention guidance (Ahn et al. 2024); 0: off, Forge's default 3
    pag_layers: tuple[str, ...] = ("mid",)  # self-attention layers PAG perturbs: mid, down.N, up.N
    freeu: bool | tuple[float, float, float, float] = False  # FreeU: true = the family's preset, or (b1, b2, s1, s2)
    # SDXL micro-conditioning (ignored by SD1/SD2): original size (None: the output size) and crop, as
    # (width, height) and (left, top); the refiner's aesthetic scores for the positive/negative branch.
    original_size: tuple[int, int] | None = None
    crop_left_top: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # Flow models (SD3, Flux; engine/flow/): Flux-dev's distilled guidance (Forge's "Distilled CFG Scale"), the
    # sigma shift (0: the model's own; Flux-dev's depends on the resolution), and what a sampler the family
    # cannot run does: refuse (false), or run the family's own with a warning (true: the A1111 door, as Forge)
    distilled_cfg_scale: float = 3.5
    shift: float = 0.0
    sampler_fallback: bool = False
    controlnets: tuple[ControlUnit, ...] = ()  # ControlNet units, applied together
    ip_adapters: tuple[IpAdapterUnit, ...] = ()  # image prompts, applied together
    hires: HiresFix | None = None  # a second, larger pass after the first (txt2img only)
    # Latent handoff (diffusers' SDXL base -> refiner; engine/sd/handoff.py): denoising_end stops the loop at that
    # fraction of the schedule and returns its latents; denoising_start resumes from `init_latents` there,
    # adding no noise. init_latents alone: img2img from latents (B, C, h, w) instead of an image.
    denoising_end: float | None = None
    denoising_start: float | None = None
    init_latents: Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None or self.init_latents is not None else "txt2img"

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def enable_hr(self) -> bool:
        """The JSON's name for "hires is set"."""
        return self.hires is not None

    def replace(self, **changes: Any) -> GenerationRequest:
        """A copy with fields changed; the JSON's flat hires keys (enable_hr, hr_scale, ...) are understood."""
        return dataclasses.replace(self, **_grouped(changes, self.hires, self.variation))

    @classmethod
    def from_flat(cls, **fields: Any) -> GenerationRequest:
        """A request from the JSON's flat fields (enable_hr, hr_scale, ... beside the rest), pictures included."""
        return cls(**_grouped(fields, None, Variation()))

    def flat_fields(self) -> dict[str, Any]:
        """Every field as the JSON has it: the hires fix flat (its defaults when off), pictures as they are."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "hires":
                out["enable_hr"] = self.hires is not None
                hires = self.hires or HiresFix()
                out.update({key: getattr(hires, name) for key, name in HIRES_KEYS.items()})
            elif f.name == "variation":
                out.update({key: getattr(self.variation, name) for key, name in VARIATION_KEYS.items()})
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; the init image is recorded by size and pixel hash, not embedded."""
        out = {k: v for k, v in self.flat_fields().items() if k not in IMAGES + TENSORS + DOOR_FIELDS}
        out["mode"] = self.mode
        for name in IMAGES:
            image = getattr(self, name)
            if image is not None:
                out[name] = {"size": list(image.size), "sha256": image_sha256(image)}
        if self.init_latents is not None:
            out["init_latents"] = {"shape": list(self.init_latents.shape)}
        if self.mode == "txt2img" and not self.enable_hr:
            out.pop("strength")
        if not self.enable_hr:
            for name in HIRES_KEYS:
                out.pop(name)
        if self.mask is None:
            for name in INPAINT_FIELDS:
                out.pop(name)
        out["controlnets"] = [unit.to_dict() for unit in self.controlnets]
        out["ip_adapters"] = [unit.to_dict() for unit in self.ip_adapters]
        return out

    @classmethod
    def field_names(cls) -> set[str]:
        """The JSON's field names (pictures and tensors excepted)."""
        names = {f.name for f in dataclasses.fields(cls)} - set(IMAGES) - set(TENSORS) - {"hires", "variation"}
        return names | {"enable_hr", *HIRES_KEYS, *VARIATION_KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """The inverse of to_dict for every field except the init image and latents (supply them separately)."""
        fields = {k: v for k, v in data.items() if k in cls.field_names()}
        for name in TUPLE_FIELDS:  # JSON has no tuples
            if isinstance(fields.get(name), list):
                fields[name] = tuple(fields[name])
        fields["controlnets"] = tuple(ControlUnit.from_dict(u) if isinstance(u, dict) else u
                                      for u in fields.get("controlnets", ()))
        fields["ip_adapters"] = tuple(IpAdapterUnit.from_dict(u) if isinstance(u, dict) else u
                                      for u in fields.get("ip_adapters", ()))
        return cls.from_flat(**fields)


def _grouped(fields: dict[str, Any], hires: HiresFix | None, variation: Variation) -> dict[str, Any]:
    """Flat JSON fields with the hires keys gathered into `hires` (a HiresFix when enable_hr, else None) and
    the variation keys into `variation`; `hires` and `variation`: the current ones, which flat keys change."""
    out = {k: v for k, v in fields.items() if k not in HIRES_KEYS and k not in VARIATION_KEYS and k != "enable_hr"}
    changed = {VARIATION_KEYS[k]: v for k, v in fields.items() if k in VARIATION_KEYS}
    if changed:
        out["variation"] = dataclasses.replace(out.get("variation", variation), **changed)
    flat = {HIRES_KEYS[k]: v for k, v in fields.items() if k in HIRES_KEYS}
    if flat or "enable_hr" in fields:
        enable = fields.get("enable_hr", hires is not None)
        if not isinstance(enable, bool):
            raise RequestError(f"enable_hr must be true or false, got {enable!r}", "enable_hr")
        out["hires"] = dataclasses.replace(hires or HiresFix(), **flat) if enable else None
    return out


def image_sha256(image: Image.Image) -> str:
    """sha256 of the RGB pixels (independent of file format and metadata)."""
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


@dataclass(frozen=True)
class Capture:
    """The denoising process of one image, every N steps (seeds 003/004 show it by hand).

    steps: 1-based step numbers; decoded: the VAE decode of the latents x_t at each step;
    denoised: the VAE decode of the predicted x0; latents: the latent channels as pictures.
    """

    steps: list[int]
    decoded: list[Image.Image]
    denoised: list[Image.Image]
    latents: list[Image.Image]


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image        # RGB, carries the infotext in image.info["parameters"]
    index: int                # position in the job: 0 .. batch_size * n_iter - 1
    seed: int
    infotext: str             # A1111 "parameters" text
    record: dict[str, Any]    # machine-readable metadata ("sdstudio" PNG chunk)
    capture: Capture | None = None

    def save(self, path: str | Path) -> Path:
        """This image as a PNG at `path`, with the A1111 infotext and our record, as every door saves it."""
        return save_image(self, Path(path))


@dataclass(frozen=True)
class GenerationResult:
    request: GenerationRequest   # as run: seed, size and model resolved
    images: list[GeneratedImage]
    latents: Tensor              # (N, C, h, w) final latents on the CPU, before VAE decoding; with denoising_end
                                 # the partly denoised ones to hand on (init_latents of the next request)
    seconds: float
    warnings: tuple[str, ...] = ()  # what the engine changed or doubted about the request, for the user

    @property
    def seeds(self) -> list[int]:
        return [im.seed for im in self.images]

    @property
    def mode(self) -> str:
        return self.request.mode

    def save(self, folder: str | Path) -> list[SavedImage]:
        """Every image as A1111 lays them out: <folder>/<txt2img|img2img>-images/<date>/NNNNN-<seed>.png, with
        infotext and record (and the denoising capture beside it); never over an existing file."""
        return save_result(self, Path(folder))
