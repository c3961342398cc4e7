"""Kandinsky 2.2 models on disk: which folders hold one, where its prior is, and loading both offline.

Kandinsky 2.2 is two diffusers pipelines: a *prior* (kandinsky-community/kandinsky-2-2-prior:
`KandinskyV22PriorPipeline`, prompt -> CLIP image embedding) and a *decoder* (kandinsky-2-2-decoder:
`KandinskyV22Pipeline`, or kandinsky-2-2-decoder-inpaint: `KandinskyV22InpaintPipeline`, image embedding ->
picture). The model a user picks is the decoder folder (it has the model_index.json the catalog lists);
its prior is found, in this order:

1. inside it: `<decoder>/prior/` (the layout sdstudio recommends: one folder per model)

       models/kandinsky-2-2/            KandinskyV22Pipeline: model_index.json, unet/, movq/, scheduler/
       models/kandinsky-2-2/prior/      KandinskyV22PriorPipeline: model_index.json, prior/, text_encoder/,
                                        tokenizer/, image_encoder/, image_processor/, scheduler/

2. beside it, named as the hub names them: `kandinsky-2-2-decoder` and `kandinsky-2-2-decoder-inpaint` find
   `kandinsky-2-2-prior` (the part before "decoder" + "prior"; also NAME-prior). In the Hugging Face cache
   this is the sibling repository `models--<org>--kandinsky-2-2-prior`, newest snapshot.
3. or the folder is a combined pipeline (`KandinskyV22CombinedPipeline` and its img2img/inpaint variants,
   what `AutoPipelineForText2Image....save_pretrained` writes): prior and decoder in one folder.

Everything loads with `local_files_only=True`: nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdstudio.errors import ModelError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.hashing import HashCache, short_hash
from sdstudio.models.load.memory import place

if TYPE_CHECKING:  # importing the pipelines costs time and logs a torchvision notice: only when loading
    from diffusers import KandinskyV22PriorPipeline

log = logging.getLogger(__name__)

DECODERS = ("KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline", "KandinskyV22InpaintPipeline")
PRIORS = ("KandinskyV22PriorPipeline", "KandinskyV22PriorEmb2EmbPipeline")
COMBINED = ("KandinskyV22CombinedPipeline", "KandinskyV22Img2ImgCombinedPipeline",
            "KandinskyV22InpaintCombinedPipeline")
SAMPLER_NAMES = {"DDPMScheduler": "DDPM", "DDIMScheduler": "DDIM", "UnCLIPScheduler": "UnCLIP"}


def pipeline_class(path: Path) -> str | None:
    """The `_class_name` in a diffusers folder's model_index.json (None: not a readable diffusers folder)."""
    try:
        return str(json.loads((Path(path) / "model_index.json").read_text()).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def is_kandinsky_folder(path: Path) -> bool:
    """Whether `path` is a Kandinsky diffusers folder (decoder, prior or combined; any version: those that
    are not Kandinsky 2.2 are refused by `find_layout` with a message that says so)."""
    return Path(path).is_dir() and (pipeline_class(path) or "").startswith("Kandinsky")


def sampler_name(scheduler_class: str) -> str:
    return SAMPLER_NAMES.get(scheduler_class, scheduler_class.removesuffix("Scheduler"))


def decoder_sampler(folder: Path) -> str:
    """The decoder's sampler name from model_index.json (a decoder or combined folder), loading nothing."""
    try:
        cls = json.loads((Path(folder) / "model_index.json").read_text())["scheduler"][1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        cls = "DDPMScheduler"
    return sampler_name(str(cls))


def kandinsky_family(folder: Path) -> str:
    """kandinsky2.2 | kandinsky2.2-inpaint | kandinsky2.2-prior, from the configs alone (for listings)."""
    cls = pipeline_class(folder)
    if cls in PRIORS:
        return "kandinsky2.2-prior"
    if cls not in DECODERS + COMBINED:
        raise ModelError(f"{folder.name} is a {cls} folder, not Kandinsky 2.2")
    try:
        unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {folder.name}'s UNet config: {e}") from None
    return "kandinsky2.2-inpaint" if unet.get("in_channels", 4) > 4 else "kandinsky2.2"  # 4 + 4 + 1 channels


@dataclass(frozen=True)
class KandinskyLayout:
    decoder: Path          # the decoder folder, or the combined pipeline's folder
    prior: Path | None     # None for a combined folder

    @property
    def combined(self) -> bool:
        return self.prior is None


def find_layout(folder: Path) -> KandinskyLayout:
    """Where the decoder and the prior of the Kandinsky model in `folder` are (module docstring)."""
    folder = Path(folder)
    cls = pipeline_class(folder) or "?"
    if cls in COMBINED:
        return KandinskyLayout(folder, None)
    if cls in PRIORS:
        raise ModelError(f"{folder.name} is a Kandinsky 2.2 prior ({cls}): choose its decoder instead (such as "
                         "kandinsky-2-2-decoder), with this prior inside it as prior/ or beside it")
    if cls not in DECODERS:
        raise ModelError(f"{folder.name} is a {cls} folder: sdstudio runs Kandinsky 2.2 (text-to-image and "
                         "inpainting decoders with their prior); other Kandinsky versions and the ControlNet "
                         "decoder are not supported")
    for candidate in prior_candidates(folder):
        if pipeline_class(candidate) in PRIORS:
            return KandinskyLayout(folder, candidate)
    looked = ", ".join(str(p) for p in prior_candidates(folder))
    raise ModelError(f"{folder.name} is a Kandinsky 2.2 decoder but its prior was not found (looked in: {looked}). "
                     f"Put the kandinsky-2-2-prior folder inside it as {folder / 'prior'}")


def prior_candidates(decoder: Path) -> Iterator[Path]:
    """`<decoder>/prior`, then siblings named after the decoder (module docstring), in the HF cache too."""
    yield decoder / "prior"
    in_cache = decoder.parent.name == "snapshots"
    repo = decoder.parent.parent if in_cache else decoder
    for name in _prior_names(repo.name):
        sibling = repo.parent / name
        if in_cache:
            snapshots = sorted((sibling / "snapshots").glob("*/model_index.json"), key=lambda p: p.stat().st_mtime)
            if snapshots:
                yield snapshots[-1].parent
        elif sibling != decoder:
            yield sibling


def _prior_names(name: str) -> list[str]:
    names = []
    if "decoder" in name:
        names += [name[: name.rfind("decoder")] + "prior", name.replace("decoder", "prior")]
    names += [f"{name}-prior", f"{name}_prior"]
    return list(dict.fromkeys(names))


@dataclass(eq=False)
class KandinskyModel:
    """A loaded Kandinsky 2.2: the prior pipeline and the decoder's parts, on one device in one dtype."""

    ref: ModelRef
    layout: KandinskyLayout
    prior: KandinskyV22PriorPipeline
    decoder: dict[str, Any]   # unet, scheduler, movq: shared by the txt2img, img2img and inpaint pipelines
    sha256: str               # of the decoder folder (with the prior when it is inside)
    prior_sha256: str
    device: torch.device
    dtype: torch.dtype
    offload: str = "none"
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def short_hash(self) -> str:
        return short_hash(self.sha256)

    @property
    def unet(self) -> Any:
        return self.decoder["unet"]

    @property
    def movq(self) -> Any:
        return self.decoder["movq"]

    @property
    def latent_channels(self) -> int:
        return int(self.movq.config.latent_channels)

    @property
    def inpaint(self) -> bool:
        """An inpainting decoder: UNet input = latents + masked-image latents + mask (4 + 4 + 1 channels)."""
        return int(self.unet.config.in_channels) > self.latent_channels

    @property
    def family(self) -> str:
        return "kandinsky2.2-inpaint" if self.inpaint else "kandinsky2.2"

    @property
    def factor(self) -> int:
        """Pixels per MoVQ latent cell: 2^(number of downsamplings), 8 for Kandinsky 2.2."""
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The UNet's sample size in pixels (512 when the config does not say, the pipelines' default)."""
        sample = self.unet.config.sample_size
        return int(sample) * self.factor if isinstance(sample, int) else 512

    @property
    def sampler_name(self) -> str:
        """The decoder's sampler, as infotext names it ("DDPM" for kandinsky-2-2-decoder)."""
        return sampler_name(type(self.decoder["scheduler"]).__name__)

    def pipeline(self, mode: str) -> Any:
        """The decoder pipeline of `mode` (txt2img | img2img | inpaint) over the shared components."""
        key = f"pipeline/{mode}"
        if key not in self.memo:
            from diffusers import KandinskyV22Img2ImgPipeline, KandinskyV22InpaintPipeline, KandinskyV22Pipeline

            cls = {"txt2img": KandinskyV22Pipeline, "img2img": KandinskyV22Img2ImgPipeline,
                   "inpaint": KandinskyV22InpaintPipeline}[mode]
            pipe = cls(**self.decoder)
            pipe.set_progress_bar_config(disable=True)
            self.memo[key] = pipe
        return self.memo[key]


def load_kandinsky(ref: ModelRef, device: torch.device, dtype: torch.dtype, offload: str,
                   hashes: HashCache) -> KandinskyModel:
    """Load the prior and the decoder of the Kandinsky 2.2 model `ref` (a decoder or combined folder)."""
    from diffusers import DiffusionPipeline, KandinskyV22PriorPipeline

    layout = find_layout(ref.path)
    kw = {"local_files_only": True, "torch_dtype": dtype}
    try:
        if layout.combined:
            combined = DiffusionPipeline.from_pretrained(layout.decoder, **kw)
            prior_parts, decoder_parts = combined.prior_pipe.components, combined.decoder_pipe.components
        else:
            prior_parts = DiffusionPipeline.from_pretrained(layout.prior, **kw).components
            decoder_parts = DiffusionPipeline.from_pretrained(layout.decoder, **kw).components
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"cannot load the Kandinsky 2.2 model {ref.path}: {e}") from e
    prior = KandinskyV22PriorPipeline(**{k: prior_parts[k] for k in (
        "prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")})
    prior.set_progress_bar_config(disable=True)
    decoder = {k: decoder_parts[k] for k in ("unet", "scheduler", "movq")}
    # execution order: text encoder, image encoder (the empty-prompt embedding), decoder UNet, MoVQ. The
    # prior stays on the device, as in diffusers (`_exclude_from_cpu_offload`): the pipeline reads its
    # clip_mean/clip_std outside forward, where offload hooks do not reach.
    modules = (prior.text_encoder, prior.image_encoder, decoder["unet"], decoder["movq"])
    for module in (*modules, prior.prior):
        module.eval().requires_grad_(False)
    prior.prior.to(device)
    used = place(modules, device, offload)
    sha256 = hashes.model_sha256(layout.decoder)
    prior_sha256 = hashes.model_sha256(layout.prior) if layout.prior else sha256
    log.info("loaded %s (Kandinsky 2.2, prior %s)", ref.name, layout.prior or "combined")
    return KandinskyModel(ref, layout, prior, decoder, sha256, prior_sha256, device, dtype, used)


class KandinskyModels:
    """Loaded Kandinsky models, least recently used first, at most `capacity` of them."""

    def __init__(self, device: torch.device, dtype: torch.dtype, offload: str, hashes: HashCache,
                 capacity: int = 1):
        self.device, self.dtype, self.offload, self.hashes, self.capacity = device, dtype, offload, hashes, capacity
        self._loaded: dict[tuple[Path, int], KandinskyModel] = {}

    @property
    def loaded(self) -> list[KandinskyModel]:
        return list(self._loaded.values())

    def get(self, ref: ModelRef) -> KandinskyModel:
        key = (ref.path.resolve(), (ref.path / "model_index.json").stat().st_mtime_ns)
        if key in self._loaded:
            self._loaded[key] = self._loaded.pop(key)
            return self._loaded[key]
        while len(self._loaded) >= self.capacity:
            old = self._loaded.pop(next(iter(self._loaded)))
            log.info("unloading %s", old.name)
        model = load_kandinsky(ref, self.device, self.dtype, self.offload, self.hashes)
        self._loaded[key] = model
        return model
