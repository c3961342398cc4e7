"""Checkpoint merging as AUTOMATIC1111's Checkpoint Merger does it, and merge recipes.

Methods, per tensor, with M = alpha (A1111's "multiplier"), computed in float32:

    weighted-sum     out = A·(1 − M) + B·M          (M = 0 gives A, M = 1 gives B)
    add-difference   out = A + (B − C)·M            (adds what B learned on top of C to A)

Which keys (A1111 modules/extras.py, run_modelmerger):
- The output has A's keys in A's order. Keys only in B or C are dropped.
- A key is merged when its name contains "model", B has it, and it is not the CLIP
  `position_ids` buffer; otherwise A's tensor is copied. In add-difference a key that C lacks adds
  B − C = 0, so A's tensor is kept.
- Inpainting / instruct-pix2pix: where A's tensor has 9 (or 8) input channels and B's has 4 (dim 1;
  the other dims equal: `model.diffusion_model.input_blocks.0.0.weight`, (320, 9, 3, 3) vs
  (320, 4, 3, 3)), only channels 0..3 (the noisy latents) are merged; channels 4.. (mask and
  masked-image latents) keep A's values. The special model must be A.
- Baked VAE: each VAE key k (written with or without the `first_stage_model.` prefix; `loss*` keys
  and the EMA counters dropped) replaces `first_stage_model.k` where the merged model has that key.
- Discard: keys matching the regular expression (`re.search`) are left out of the output.
- Output dtype: floating tensors are cast at the end ("float16", "float32", "bfloat16", or None to
  keep each key's dtype from A); integer tensors are kept as they are.

Where we differ from A1111 on purpose: arithmetic is float32 even for fp16 inputs (A1111 computes in
the stored dtype); the dtype applies to every floating key (A1111 halves only the merged keys);
integer tensors are never averaged; a shape mismatch is an error naming the key (A1111 may silently
broadcast). Inputs are read by checkpoint_io (`.ckpt` only through its weights-only loader).

Recipe file `<name>.merge.json` (JSON object; `dtype`, `vae` and `discard` are optional):

    {"method": "add-difference", "models": ["a.safetensors", "b.safetensors", "c.safetensors"],
     "alpha": 0.3, "dtype": "float16", "vae": "vae-ft-mse.safetensors", "discard": "^model_ema\\."}

`models` lists A, B (and C for add-difference). Each model (and the VAE) is a path, relative paths
resolved against the recipe's folder, or a file name with or without its extension in that folder or
in the model folders. A recipe listed in the catalog is merged when it is loaded (`compute_recipe`).

Memory: the peak is the output (one model in the output dtype) plus the current key's A, B, C tensors
and their float32 temporaries (the largest SD1.x key, the 49408×768 token embedding, is 150 MB in
float32): safetensors inputs are read one tensor at a time and zip-format `.ckpt` inputs memory-mapped;
a legacy-format `.ckpt` is loaded whole, adding its size to the peak.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from sdstudio.errors import ModelError
from sdstudio.models.find.catalog import RECIPE_SUFFIX
from sdstudio.models.find.hashing import HashCache, legacy_hash
from sdstudio.models.load.checkpoint_io import open_state_dict, read_metadata

log = logging.getLogger(__name__)

MergeMethod = Literal["weighted-sum", "add-difference"]
OutputDtype = Literal["float16", "float32", "bfloat16"]
Progress = Callable[[int, int], None]

METHOD_MODELS: dict[str, int] = {"weighted-sum": 2, "add-difference": 3}
A1111_METHOD_NAMES = {"weighted-sum": "Weighted sum", "add-difference": "Add difference"}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
RECIPE_FIELDS = ("method", "models", "alpha", "dtype", "vae", "discard")
EXAMPLE = '{"method": "weighted-sum", "models": ["a.safetensors", "b.safetensors"], "alpha": 0.5}'

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
SKIP_ON_MERGE = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
VAE_PREFIX = "first_stage_model."
VAE_IGNORE = frozenset({"model_ema.decay", "model_ema.num_updates"})


@dataclass(frozen=True)
class MergeRecipe:
    """A merge: `models` = (A, B) or (A, B, C) as the user wrote them; `base_dir` anchors relative paths."""

    method: MergeMethod
    models: tuple[str, ...]
    alpha: float
    dtype: OutputDtype | None = None
    vae: str | None = None
    discard: str | None = None
    base_dir: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHOD_MODELS:
            raise ModelError(f"method must be 'weighted-sum' or 'add-difference', got {self.method!r}")
        models = self.models
        if isinstance(models, str | bytes) or not isinstance(models, Sequence):
            raise ModelError(f"models must be a list of model files, got {models!r}")
        want = METHOD_MODELS[self.method]
        if len(models) != want:
            raise ModelError(f"{self.method} takes {want} models (A, B{', C' if want == 3 else ''}), "
                             f"got {len(models)}: {list(models)}")
        if not all(isinstance(m, str) and m.strip() for m in models):
            raise ModelError(f"each model must be a non-empty file name or path, got {list(models)}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise ModelError(f"alpha must be a number such as 0.3, got {alpha!r}")
        if self.dtype is not None and self.dtype not in TORCH_DTYPES:
            raise ModelError(f"dtype must be one of {', '.join(TORCH_DTYPES)} (or left out), got {self.dtype!r}")
        if self.vae is not None and not (isinstance(self.vae, str) and self.vae.strip()):
            raise ModelError(f"vae must be a file name or path, got {self.vae!r}")
        if self.discard is not None:
            _compile_discard(self.discard)
        object.__setattr__(self, "models", tuple(models))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "discard", self.discard or None)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return TORCH_DTYPES[self.dtype] if self.dtype else None

    def to_json(self) -> dict[str, Any]:
        data = {"method": self.method, "models": list(self.models), "alpha": self.alpha,
                "dtype": self.dtype, "vae": self.vae, "discard": self.discard}
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_json(cls, data: Any, base_dir: Path | None = None) -> MergeRecipe:
        if not isinstance(data, dict):
            raise ModelError(f"a merge recipe is a JSON object such as {EXAMPLE}")
        unknown = sorted(set(data) - set(RECIPE_FIELDS))
        if unknown:
            raise ModelError(f"unknown recipe field(s) {', '.join(unknown)}; known: {', '.join(RECIPE_FIELDS)}")
        missing = [k for k in ("method", "models", "alpha") if k not in data]
        if missing:
            raise ModelError(f"the recipe needs {', '.join(missing)}, e.g. {EXAMPLE}")
        return cls(base_dir=base_dir, **data)

    @classmethod
    def read(cls, path: Path) -> MergeRecipe:
        """Read `<name>.merge.json`; relative model paths are resolved against its folder."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"merge recipe not found: {path}") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelError(f"cannot read merge recipe {path.name}: {e}") from None
        try:
            return cls.from_json(data, base_dir=path.parent)
        except ModelError as e:
            raise ModelError(f"{path.name}: {e}") from None

    def write(self, path: Path) -> Path:
        if not path.name.endswith(RECIPE_SUFFIX) or path.name == RECIPE_SUFFIX:
            raise ModelError(f"a merge recipe file is named <name>{RECIPE_SUFFIX}, got {path.name!r}")
        _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n"))
        return path

    def model_paths(self, models_dirs: Sequence[Path] = ()) -> list[Path]:
        labels = ("A", "B", "C")
        return [_find_file(m, f"model {labels[i]}", self.base_dir, models_dirs) for i, m in enumerate(self.models)]

    def vae_path(self, models_dirs: Sequence[Path] = ()) -> Path | None:
        return _find_file(self.vae, "VAE", self.base_dir, models_dirs) if self.vae else None


def is_recipe_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(RECIPE_SUFFIX) and path.name != RECIPE_SUFFIX


def recipe_name(path: Path) -> str:
    """The catalog name of `<name>.merge.json`: `<name>`."""
    return path.name.removesuffix(RECIPE_SUFFIX)


def _compile_discard(pattern: Any) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ModelError(f"discard must be a regular expression string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ModelError(f"discard is not a valid regular expression ({e}): {pattern!r}") from None


def _find_file(entry: str, what: str, base_dir: Path | None, models_dirs: Sequence[Path]) -> Path:
    """A path (relative to `base_dir`), else a file name with or without extension in the folders."""
    base = base_dir or Path()
    path = Path(entry).expanduser()
    path = path if path.is_absolute() else base / path
    if path.is_file():
        return path
    if path.is_dir():
        raise ModelError(f"{what} {entry!r} is a folder; merging needs single-file checkpoints "
                         f"({', '.join(WEIGHT_SUFFIXES)})")
    folders = [base, *models_dirs]
    for folder in folders:
        for suffix in ("", *WEIGHT_SUFFIXES):
            if (candidate := folder / f"{entry}{suffix}").is_file():
                return candidate
    raise ModelError(f"{what} {entry!r} not found: no such file, and no model of that name in "
                     f"{', '.join(str(f) for f in folders)}")


# -- the arithmetic --------------------------------------------------------------------------------


@dataclass
class MergeReport:
    """What one merge did, for logs and metadata."""

    merged: int = 0
    copied: int = 0
    discarded: int = 0
    special: str | None = None  # "inpainting" or "instruct-pix2pix" when A had extra input channels


def _combine(method: str, a: Tensor, b: Tensor, c: Tensor | None, alpha: float) -> Tensor:
    """float32 in, float32 out."""
    if method == "weighted-sum":
        return a * (1 - alpha) + b * alpha
    assert c is not None
    return a + (b - c) * alpha


def _channel_case(key: str, a: Tensor, b: Tensor) -> str | None:
    """None when shapes match; "inpainting"/"instruct-pix2pix" when A has 9/8 input channels to B's 4."""
    if a.shape == b.shape:
        return None
    same_rest = a.dim() == b.dim() >= 2 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]
    if same_rest and b.shape[1] == 4 and a.shape[1] in (8, 9):
        return "inpainting" if a.shape[1] == 9 else "instruct-pix2pix"
    if same_rest and a.shape[1] == 4 and b.shape[1] in (8, 9):
        kind = "an inpainting" if b.shape[1] == 9 else "an instruct-pix2pix"
        raise ModelError(f"{key}: model B has {b.shape[1]} input channels and A has 4. When merging {kind} "
                         "model with an ordinary one, it must be model A: list it first.")
    raise ModelError(f"cannot merge {key}: shape {tuple(a.shape)} in A but {tuple(b.shape)} in B; "
                     "are the models the same architecture (SD1.x with SD1.x, SD2.x with SD2.x)?")


def _owned(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy in `dtype` that shares no storage with the input (safetensors requires it)."""
    return t.to(dtype=dtype, copy=True).contiguous()


def _merge_key(key: str, recipe: MergeRecipe, a_sd: Mapping[str, Tensor], b_sd: Mapping[str, Tensor],
               c_sd: Mapping[str, Tensor] | None, report: MergeReport) -> Tensor:
    a = a_sd[key]
    out_dtype = (recipe.torch_dtype or a.dtype) if a.is_floating_point() else a.dtype
    mergeable = ("model" in key and key not in SKIP_ON_MERGE and key in b_sd
                 and (c_sd is None or key in c_sd) and a.is_floating_point())
    if not mergeable:
        report.copied += 1
        return _owned(a, out_dtype)
    b = b_sd[key].to(torch.float32)
    c = None if c_sd is None else c_sd[key].to(torch.float32)
    if c is not None and c.shape != b.shape:
        raise ModelError(f"cannot merge {key}: shape {tuple(b.shape)} in B but {tuple(c.shape)} in C")
    kind = _channel_case(key, a, b)
    a32 = a.to(torch.float32)
    if kind is None:
        merged = _combine(recipe.method, a32, b, c, recipe.alpha)
    else:  # (O, 9, kh, kw): channels 0-3 noisy latents (merged), 4 mask, 5-8 masked-image latents (A's)
        merged = a32.clone()
        merged[:, :4] = _combine(recipe.method, a32[:, :4], b, c, recipe.alpha)
        report.special = kind
    report.merged += 1
    return merged.to(out_dtype).contiguous()


def _merge(recipe: MergeRecipe, state_dicts: Sequence[Mapping[str, Tensor]],
           progress: Progress | None) -> tuple[dict[str, Tensor], MergeReport]:
    if len(state_dicts) != len(recipe.models):
        raise ModelError(f"{recipe.method} needs {len(recipe.models)} state dicts, got {len(state_dicts)}")
    a_sd, b_sd = state_dicts[0], state_dicts[1]
    c_sd = state_dicts[2] if len(state_dicts) > 2 else None
    discard = _compile_discard(recipe.discard) if recipe.discard else None
    out: dict[str, Tensor] = {}
    report = MergeReport()
    keys = list(a_sd.keys())
    for done, key in enumerate(keys, 1):
        if discard is not None and discard.search(key):
            report.discarded += 1
        else:
            out[key] = _merge_key(key, recipe, a_sd, b_sd, c_sd, report)
        if progress is not None:
            progress(done, len(keys))
    return out, report


def merge_state_dicts(recipe: MergeRecipe, state_dicts: Sequence[Mapping[str, Tensor]],
                      progress: Progress | None = None) -> dict[str, Tensor]:
    """Merge A, B (, C) key by key as the recipe says; see the module docstring for the rules."""
    return _merge(recipe, state_dicts, progress)[0]


def bake_vae(merged: dict[str, Tensor], vae_sd: Mapping[str, Tensor], dtype: torch.dtype | None) -> int:
    """Replace `first_stage_model.*` tensors in place with the VAE's; returns how many were replaced."""
    replaced = 0
    for key in vae_sd:
        name = key.removeprefix(VAE_PREFIX)
        target = VAE_PREFIX + name
        if name.startswith("loss") or name in VAE_IGNORE or target not in merged:
            continue
        tensor, old = vae_sd[key], merged[target]
        if tensor.shape != old.shape:
            raise ModelError(f"VAE key {key} has shape {tuple(tensor.shape)}, the model's {target} "
                             f"{tuple(old.shape)}: this VAE does not fit this model")
        merged[target] = _owned(tensor, dtype or old.dtype)
        replaced += 1
    if replaced == 0:
        raise ModelError("none of the VAE's keys match a first_stage_model.* key of the merged model; "
                         "is it an original-layout (not diffusers-layout) VAE, and not removed by discard?")
    return replaced


# -- files -----------------------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_field(metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except ValueError:
        return None


def merge_metadata(recipe: MergeRecipe, paths: Sequence[Path], vae: Path | None, report: MergeReport,
                   out: Path, hashes: HashCache) -> dict[str, str]:
    """A1111's merge metadata: inputs' fields copied (A, then B, then C), `sd_merge_recipe`,
    `sd_merge_models` (by sha256, with each input's own merge history), plus our recipe."""
    inputs = [read_metadata(p) for p in paths]
    metadata: dict[str, str] = {}
    for fields in inputs:
        metadata.update(fields)
    digests = [hashes.file_sha256(p) for p in paths]
    a1111_recipe = {
        "type": "sdstudio", "primary_model_hash": digests[0], "secondary_model_hash": digests[1],
        "tertiary_model_hash": digests[2] if len(digests) > 2 else None,
        "interp_method": A1111_METHOD_NAMES[recipe.method], "multiplier": recipe.alpha,
        "save_as_half": recipe.dtype == "float16", "custom_name": out.stem, "config_source": 0,
        "bake_in_vae": vae.name if vae else "None", "discard_weights": recipe.discard or "",
        "is_inpainting": report.special == "inpainting", "is_instruct_pix2pix": report.special == "instruct-pix2pix",
    }
    models: dict[str, Any] = {}
    for path, digest, fields in zip(paths, digests, inputs, strict=True):
        models[digest] = {"name": path.name, "legacy_hash": legacy_hash(path),
                          "sd_merge_recipe": _json_field(fields, "sd_merge_recipe")}
        models.update(_json_field(fields, "sd_merge_models") or {})
    ours = dict(recipe.to_json(), models=[p.name for p in paths], vae=vae.name if vae else None)
    metadata.update(format="pt", sd_merge_recipe=json.dumps(a1111_recipe), sd_merge_models=json.dumps(models),
                    sdstudio_merge_recipe=json.dumps({k: v for k, v in ours.items() if v is not None}))
    return metadata


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    if out.suffix.lower() != ".safetensors":
        raise ModelError(f"merged models are written as .safetensors; got {out.name!r}")
    for path in inputs:
        if out.resolve() == path.resolve() or (out.exists() and out.samefile(path)):
            raise ModelError(f"refusing to write over {path.name}, an input of this merge; choose another name")


def merge_files(recipe: MergeRecipe, out: Path | None, progress: Progress | None = None, *,
                models_dirs: Sequence[Path] = (), hashes: HashCache | None = None) -> dict[str, Tensor]:
    """Merge the recipe's files, bake its VAE, and write `out` (.safetensors, atomically) if given."""
    paths = recipe.model_paths(models_dirs)
    vae = recipe.vae_path(models_dirs)
    if out is not None:
        _check_output(out, [*paths, *([vae] if vae else [])])
    log.info("merging %s (%s, alpha %g)", " + ".join(p.name for p in paths), recipe.method, recipe.alpha)
    merged, report = _merge(recipe, [open_state_dict(p) for p in paths], progress)
    if vae is not None:
        count = bake_vae(merged, open_state_dict(vae), recipe.torch_dtype)
        log.info("baked %d VAE tensors from %s", count, vae.name)
    log.info("merged %d keys, copied %d, discarded %d%s", report.merged, report.copied, report.discarded,
             f" ({report.special} model)" if report.special else "")
    if out is not None:
        metadata = merge_metadata(recipe, paths, vae, report, out, hashes or HashCache(None))
        _write_atomic(out, lambda tmp: save_file(merged, str(tmp), metadata=metadata))
        log.info("wrote %s", out)
    return merged


def compute_recipe(path: Path, models_dirs: Sequence[Path] = (),
                   progress: Progress | None = None) -> dict[str, Tensor]:
    """The state dict a `<name>.merge.json` describes, merged in memory (for the catalog's loader)."""
    return merge_files(MergeRecipe.read(path), None, progress, models_dirs=models_dirs)
