"""IP-Adapter files and their CLIP image encoders, found and read offline.

An IP-Adapter (Ye et al. 2023) adds a second attention over image tokens to every cross-attention layer,
    out = Attn(q, K_text, V_text) + scale * Attn(q, K_img, V_img),   K_img = to_k_ip(tokens), V_img = to_v_ip(tokens)
where the image tokens are a projection (`image_proj`) of a CLIP image encoding. The published files
(h94/IP-Adapter `.bin` and `.safetensors`) hold `image_proj.*` and `ip_adapter.<n>.to_k_ip.weight`, ... for
the n-th cross-attention layer. What the projection reads decides the kind:
    plain      ImageProjection, `proj.weight`: CLIP `image_embeds` (n, D_proj) -> 4 tokens per image
    plus       Resampler, `latents`/`proj_in`: penultimate hidden states (n, 257, D_vit) -> 16 tokens per image
               (also the plus-face files)
    full-face  an MLP, `proj.3.weight`: penultimate hidden states, one token per patch
FaceID files need InsightFace face-recognition embeddings, which are not computed here: refused.
`.bin` files are read weights-only (a pickle never runs code).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from sdstudio.errors import RequestError
from sdstudio.models.find.catalog import ModelRef, unknown_message
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.find.names import check_inside, leaf
from sdstudio.models.load.checkpoint_io import header_shapes, read_pickle, read_state_dict

SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
ADAPTER_NAME = re.compile(r"ip[-_ ]?adapter", re.IGNORECASE)  # in folders shared with ControlNets
VISION_PREFIX = "vision_model."
_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}  # ViT-B, ViT-L, ViT-H, ViT-bigG: not readable from shapes


@dataclass(frozen=True)
class AdapterFile:
    """One IP-Adapter as diffusers' `_load_ip_adapter_weights` takes it, and what its projection reads."""

    name: str
    hash: str                      # 8 hex digits of the file's sha256, as A1111's ControlNet extension shows
    state: dict[str, dict[str, Tensor]]  # {"image_proj": {...}, "ip_adapter": {...}}
    kind: str                      # "plain" | "plus" | "full-face"
    width: int                     # D_proj (plain) or D_vit (plus, full-face) the projection takes

    @property
    def hidden_states(self) -> bool:
        """True: fed the encoder's penultimate hidden states; False: its projected image_embeds."""
        return self.kind != "plain"


def adapter_kind(image_proj: Mapping[str, Tensor]) -> tuple[str, int]:
    """(kind, input width) from the projection's keys, in diffusers' order of checks."""
    if "proj.weight" in image_proj:
        return "plain", int(image_proj["proj.weight"].shape[1])
    if "proj.3.weight" in image_proj:
        return "full-face", int(image_proj["proj.0.weight"].shape[1])
    if "perceiver_resampler.proj_in.weight" in image_proj or "norm.weight" in image_proj:
        raise RequestError("this is an IP-Adapter FaceID file: it takes InsightFace face-recognition embeddings, "
                           "which sdstudio does not compute; use a plain, plus or plus-face IP-Adapter", "ip_adapters")
    if "proj_in.weight" in image_proj:
        return "plus", int(image_proj["proj_in.weight"].shape[1])
    raise RequestError("not an IP-Adapter: its image_proj has none of the known projection layers", "ip_adapters")


def read_adapter(path: Path, hashes: HashCache) -> AdapterFile:
    """A published file: flat keys `image_proj.x` (.safetensors) or nested {"image_proj": {x: ...}} (.bin)."""
    loaded = read_state_dict(path) if path.suffix == ".safetensors" else read_pickle(path)
    if not isinstance(loaded, Mapping):
        raise RequestError(f"{path.name} is not an IP-Adapter (it holds a {type(loaded).__name__})", "ip_adapters")
    parts: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in loaded.items():
        head, _, rest = str(key).partition(".")
        if head in parts and isinstance(value, Tensor):
            parts[head][rest] = value
        elif key in parts and isinstance(value, Mapping):
            parts[key].update({k: v for k, v in value.items() if isinstance(v, Tensor)})
    if not parts["image_proj"] or not parts["ip_adapter"]:
        raise RequestError(f"{path.name} is not an IP-Adapter (no image_proj / ip_adapter weights)", "ip_adapters")
    kind, width = adapter_kind(parts["image_proj"])
    return AdapterFile(path.stem, hashes.model_sha256(path)[:8], parts, kind, width)


def available_adapters(folders: Sequence[Path], shared: Sequence[Path] = ()) -> list[Path]:
    """Adapter files in `folders`, and those named like one ("ip-adapter_...") in `shared` (ControlNet folders)."""
    found = []
    for folder in (*folders, *shared):
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in SUFFIXES
                      and (folder in folders or ADAPTER_NAME.search(p.name))]
    return found


def available_encoders(folders: Sequence[Path]) -> list[Path]:
    """CLIP image encoders: diffusers/transformers folders (config.json) and single files."""
    found = []
    for folder in folders:
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir()) if (p.is_dir() and (p / "config.json").is_file())
                      or (p.is_file() and p.suffix in SUFFIXES)]
    return found


def find_named(wanted: str, candidates: Sequence[Path], roots: Sequence[Path], what: str, names_only: bool) -> Path:
    """A file or folder by path, or by name (with or without suffix, or A1111's "name [hash]")."""
    path = Path(wanted).expanduser()
    if not names_only and path.exists():
        return path
    key = leaf(wanted.split(" [")[0].strip().lower())
    for p in candidates:
        if key in (p.name.lower(), p.stem.lower()):
            return check_inside(p, roots, what) if names_only else p
    refs = [ModelRef(p.stem if p.is_file() else p.name, p) for p in candidates]
    raise RequestError(unknown_message(wanted, refs).replace("unknown model", f"unknown {what}"), "ip_adapters")


def encoder_config(path: Path) -> CLIPVisionConfig:
    """The encoder's architecture: its config.json, or read from a single file's tensor shapes."""
    if path.is_dir():
        return CLIPVisionConfig.from_pretrained(path, local_files_only=True)
    found = header_shapes(path) if path.suffix == ".safetensors" else read_state_dict(path)
    shapes = {k.removeprefix("clip_vision_model."): tuple(v.shape) for k, v in found.items()}
    patch = shapes.get(f"{VISION_PREFIX}embeddings.patch_embedding.weight")
    if patch is None or "visual_projection.weight" not in shapes:
        raise RequestError(f"{path.name} is not a CLIP image encoder in the transformers layout "
                           "(vision_model.*, visual_projection.weight)", "ip_adapters")
    hidden, size = int(patch[0]), int(patch[2])
    positions = int(shapes[f"{VISION_PREFIX}embeddings.position_embedding.weight"][0])
    layers = {int(m.group(1)) for k in shapes if (m := re.match(rf"{VISION_PREFIX}encoder\.layers\.(\d+)\.", k))}
    return CLIPVisionConfig(
        hidden_size=hidden, patch_size=size, image_size=size * round((positions - 1) ** 0.5),
        num_hidden_layers=len(layers), num_attention_heads=_HEADS.get(hidden, max(1, hidden // 64)),
        intermediate_size=int(shapes[f"{VISION_PREFIX}encoder.layers.0.mlp.fc1.weight"][0]),
        projection_dim=int(shapes["visual_projection.weight"][0]),
        hidden_act="quick_gelu" if hidden in (768, 1024) else "gelu",  # OpenAI's ViTs; OpenCLIP's use gelu
        layer_norm_eps=1e-5)


def encoder_fits(config: CLIPVisionConfig, adapter: AdapterFile) -> bool:
    return (config.hidden_size if adapter.hidden_states else config.projection_dim) == adapter.width


def load_encoder(path: Path) -> CLIPVisionModelWithProjection:
    """On the CPU in float32; the caller places it."""
    if path.is_dir():
        return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    config = encoder_config(path)
    state = {k.removeprefix("clip_vision_model."): v for k, v in read_state_dict(path).items()}
    state = {k: v for k, v in state.items() if k.startswith(VISION_PREFIX) or k == "visual_projection.weight"}
    model = CLIPVisionModelWithProjection(config)
    missing, _ = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith("position_ids")]:
        raise RequestError(f"{path.name} lacks {len(missing)} image-encoder weights, e.g. {missing[0]}", "ip_adapters")
    return model.float()


class AdapterCache:
    """Adapter files and image encoders read for recent jobs, a few of each, keyed by file and mtime."""

    def __init__(self, hashes: HashCache, keep: int = 4):
        self.hashes, self.keep = hashes, keep
        self._items: OrderedDict[tuple, Any] = OrderedDict()

    def adapter(self, path: Path) -> AdapterFile:
        return self._get(("adapter", path), lambda: read_adapter(path, self.hashes))

    def encoder(self, path: Path, device: torch.device, dtype: torch.dtype) -> CLIPVisionModelWithProjection:
        return self._get(("encoder", path, str(device), str(dtype)),
                         lambda: load_encoder(path).to(device=device, dtype=dtype).eval().requires_grad_(False))

    def config(self, path: Path) -> CLIPVisionConfig:
        return self._get(("config", path), lambda: encoder_config(path))

    def _get(self, key: tuple, make: Any) -> Any:
        path: Path = key[1]
        full = (*key, str(path.resolve()), path.stat().st_mtime_ns)
        if full not in self._items:
            self._items[full] = make()
            while len(self._items) > self.keep * 3:
                self._items.popitem(last=False)
        self._items.move_to_end(full)
        return self._items[full]
