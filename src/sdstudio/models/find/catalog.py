"""Finding models: our folders, an existing A1111 or ComfyUI install, and the Hugging Face cache.

A model is a diffusers folder (with model_index.json), a single checkpoint file (.safetensors,
.ckpt), or a merge recipe (<name>.merge.json, computed when loaded). Users choose one by path, by name
(with or without extension), by A1111 title ("name [hash]") or by short hash.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdstudio.errors import ModelError
from sdstudio.models.find.names import check_inside, leaf
from sdstudio.settings import PACKAGED_LORAS, Settings

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
RECIPE_SUFFIX = ".merge.json"
_TITLE = re.compile(r"^(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives. `name` is what users type and what infotext records."""

    name: str
    path: Path
    source: str = "path"  # which configured folder it was found in

    @property
    def kind(self) -> str:
        if self.path.is_dir():
            return "diffusers"
        return "recipe" if self.path.name.endswith(RECIPE_SUFFIX) else "file"


@dataclass(frozen=True)
class ModelFolders:
    """Where each kind of file is looked for, in order (see `model_folders`)."""

    checkpoints: tuple[tuple[str, Path], ...]   # (source label, folder)
    vae: tuple[Path, ...] = ()
    lora: tuple[Path, ...] = ()
    embeddings: tuple[Path, ...] = ()
    hf_cache: Path | None = None
    controlnet: tuple[Path, ...] = ()
    vae_approx: tuple[Path, ...] = ()  # TAESD's original files (models/load/tiny_vae.py)
    ip_adapter: tuple[Path, ...] = ()  # IP-Adapter files (also found by name in the ControlNet folders)
    clip_vision: tuple[Path, ...] = ()  # CLIP image encoders for IP-Adapters
    text_encoders: tuple[Path, ...] = ()  # CLIP-L/G and T5 files beside SD3/Flux single files


def model_folders(settings: Settings) -> ModelFolders:
    """Our folders first, then an A1111 install (models/Stable-diffusion, models/VAE, models/VAE-approx,
    models/Lora, embeddings/, the ControlNet extension's folders, which also hold its IP-Adapters and image
    encoders; Forge's models/text_encoder) and a ComfyUI install (models/checkpoints, models/unet and
    models/diffusion_models (transformer-only SD3/Flux files), models/vae, models/vae_approx, models/loras,
    models/embeddings, models/controlnet, models/ipadapter, models/clip_vision, models/text_encoders, models/clip).
    """
    a1111, comfy, home = settings.a1111_dir, settings.comfyui_dir, settings.home
    checkpoints = [("sdstudio", p) for p in settings.models_dirs]
    vae, lora, embeddings = [home / "vae"], [home / "lora"], [home / "embeddings"]
    controlnet = [home / "controlnet", *(d / "controlnet" for d in settings.models_dirs)]
    approx = [home / "vae-approx"]
    ip_adapter, clip_vision = [home / "ipadapter"], [home / "clip_vision"]
    text_encoders = [home / "text_encoders"]
    if a1111:
        controlnet += [a1111 / "models" / "ControlNet", a1111 / "extensions" / "sd-webui-controlnet" / "models"]
        checkpoints.append(("a1111", a1111 / "models" / "Stable-diffusion"))
        text_encoders.append(a1111 / "models" / "text_encoder")  # Forge's folder for CLIP/T5 files
        vae.append(a1111 / "models" / "VAE")
        approx.append(a1111 / "models" / "VAE-approx")
        ip_adapter.append(a1111 / "models" / "ipadapter")
        clip_vision += [a1111 / "models" / "clip_vision",
                        a1111 / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "clip_vision"]
        lora += [a1111 / "models" / "Lora", a1111 / "models" / "LyCORIS"]
        embeddings.append(a1111 / "embeddings")
    if comfy:
        checkpoints += [("comfyui", comfy / "models" / name) for name in ("checkpoints", "diffusers", "unet",
                                                                           "diffusion_models")]
        text_encoders += [comfy / "models" / "text_encoders", comfy / "models" / "clip"]
        vae.append(comfy / "models" / "vae")
        approx.append(comfy / "models" / "vae_approx")
        lora.append(comfy / "models" / "loras")
        embeddings.append(comfy / "models" / "embeddings")
        controlnet.append(comfy / "models" / "controlnet")
        ip_adapter.append(comfy / "models" / "ipadapter")
        clip_vision.append(comfy / "models" / "clip_vision")
    lora.append(PACKAGED_LORAS)
    return ModelFolders(tuple(checkpoints), tuple(vae), tuple(lora), tuple(embeddings), settings.hf_cache,
                        tuple(controlnet), tuple(approx), tuple(ip_adapter), tuple(clip_vision), tuple(text_encoders))


def model_name(path: Path) -> str:
    if path.name.endswith(RECIPE_SUFFIX):
        return path.name[: -len(RECIPE_SUFFIX)]
    return path.stem if path.is_file() else path.name


def is_model(path: Path) -> bool:
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return path.is_file() and (path.suffix in CHECKPOINT_SUFFIXES or path.name.endswith(RECIPE_SUFFIX))


def scan(folders: ModelFolders | Sequence[Path]) -> list[ModelRef]:
    """Every model in the configured folders (checkpoint folders searched one level deep, like A1111)."""
    if not isinstance(folders, ModelFolders):
        folders = ModelFolders(tuple(("models", Path(p)) for p in folders))
    found = [ModelRef(model_name(p), p, source) for source, root in folders.checkpoints for p in _walk(root)]
    found += list(_hf_cache_models(folders.hf_cache))
    return found


def _walk(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if is_model(entry):
            yield entry
        elif entry.is_dir() and not entry.name.startswith("."):
            yield from (p for p in sorted(entry.iterdir()) if is_model(p))


def _hf_cache_models(cache: Path | None) -> Iterator[ModelRef]:
    """Hugging Face hub cache: models--<org>--<name>/snapshots/<revision>/model_index.json."""
    if cache is None or not cache.is_dir():
        return
    for repo in sorted(cache.glob("models--*")):
        snapshots = sorted((repo / "snapshots").glob("*/model_index.json"), key=lambda p: p.stat().st_mtime)
        if snapshots:
            yield ModelRef(repo.name.removeprefix("models--").replace("--", "/"), snapshots[-1].parent, "hf-cache")


def resolve(name_or_path: str, folders: ModelFolders | Sequence[Path],
            hash_of: dict[str, str] | None = None, names_only: bool = False) -> ModelRef:
    """A path, a name, an A1111 title "name [hash]", or a short hash (matched in `hash_of`: path -> hash).
    names_only (the server): never a path; a name by its last component, found inside the folders (names.py)."""
    if not names_only:
        path = Path(name_or_path).expanduser()
        if path.exists():
            return _check(ModelRef(model_name(path), path))
    text = name_or_path.strip()
    title = _TITLE.match(text)
    known = scan(folders)
    wanted = (title["name"] if title else text).lower()
    wanted = leaf(wanted) if names_only else wanted
    found = next((ref for ref in known if wanted in (ref.name.lower(), ref.path.name.lower())), None)
    digest = (title["hash"] if title else text).lower()
    if found is None and hash_of and re.fullmatch(r"[0-9a-f]{8,64}", digest):
        found = next((ref for ref in known if hash_of.get(str(ref.path.resolve()), "").startswith(digest)), None)
    if found is None:
        raise ModelError(unknown_message(name_or_path, known))
    if names_only:
        check_inside(found.path, _roots(folders))
    return _check(found)


def _roots(folders: ModelFolders | Sequence[Path]) -> list[Path]:
    if isinstance(folders, ModelFolders):
        return [p for _, p in folders.checkpoints] + ([folders.hf_cache] if folders.hf_cache else [])
    return list(folders)


def unknown_message(name: str, known: list[ModelRef]) -> str:
    names = [r.name for r in known]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    listing = ", ".join(names) if names else "none found"
    return f"unknown model {name!r}: not a path, a known name or a hash.{hint} Available: {listing}"


def _check(ref: ModelRef) -> ModelRef:
    if ref.path.is_dir() and not (ref.path / "model_index.json").is_file():
        raise ModelError(f"{ref.path} is not a model folder: it has no model_index.json")
    if ref.path.is_file() and not is_model(ref.path):
        raise ModelError(f"{ref.path} is not a model: expected a diffusers folder, a .safetensors/.ckpt "
                         f"checkpoint or a {RECIPE_SUFFIX} merge recipe")
    return ref
