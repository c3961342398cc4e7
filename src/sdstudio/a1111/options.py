"""AUTOMATIC1111 `/sdapi/v1` shapes that need no request body: the options we honour, the listing routes
(samplers, schedulers, sd-models) and A1111's error body. Pure functions of our data; no server here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sdstudio.errors import RequestError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.samplers import AUTOMATIC, SAMPLERS, SCHEDULE_TYPES
from sdstudio.samplers.catalog import SCHEDULE_NAMES

VAE_AUTOMATIC = "Automatic"  # A1111's sd_vae: the checkpoint's own VAE (or one named like it)
VAE_NONE = "None"            # ... the checkpoint's own VAE, never a separate file
MODEL_HASH_DIGITS = 10       # A1111's short model hash
OPTION_KEYS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers")


@dataclass(frozen=True)
class A1111Options:
    """The A1111 options sdstudio honours (GET/POST /sdapi/v1/options); a body's override_settings win.

    sd_model_checkpoint None: the engine's default model. clip_skip is A1111's CLIP_stop_at_last_layers.
    """

    sd_model_checkpoint: str | None = None
    sd_vae: str = VAE_AUTOMATIC
    clip_skip: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A1111's keys and values, as GET /sdapi/v1/options returns them."""
        return {"sd_model_checkpoint": self.sd_model_checkpoint, "sd_vae": self.sd_vae,
                "CLIP_stop_at_last_layers": self.clip_skip}

    def updated(self, settings: Mapping[str, Any]) -> A1111Options:
        """These options with A1111-keyed `settings` applied (POST /options, override_settings).
        Keys sdstudio does not use are ignored, as A1111 ignores options no script reads."""
        changes: dict[str, Any] = {}
        if settings.get("sd_model_checkpoint") is not None:
            changes["sd_model_checkpoint"] = _text(settings["sd_model_checkpoint"], "sd_model_checkpoint")
        if settings.get("sd_vae") is not None:
            changes["sd_vae"] = _text(settings["sd_vae"], "sd_vae")
        if settings.get("CLIP_stop_at_last_layers") is not None:
            value = settings["CLIP_stop_at_last_layers"]
            if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
                raise RequestError(f"CLIP_stop_at_last_layers must be a whole number >= 1, got {value!r}",
                                   "CLIP_stop_at_last_layers")
            changes["clip_skip"] = int(value)
        return replace(self, **changes)

    @property
    def vae(self) -> str | None:
        """Our GenerationRequest.vae: None for the model's own ("Automatic"), "none", or a VAE's name."""
        if self.sd_vae.strip().lower() in ("", VAE_AUTOMATIC.lower()):
            return None
        return "none" if self.sd_vae.strip().lower() == VAE_NONE.lower() else self.sd_vae


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}", name)
    return value


def schedule_key(label: str) -> str:
    """A1111's API name of a schedule type: "SGM Uniform" -> "sgm_uniform"."""
    return SCHEDULE_NAMES[label][0]


def samplers() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: [{name, aliases, options}], options as A1111's strings."""
    out = []
    for spec in SAMPLERS:
        options: dict[str, str] = {}
        if spec.default_schedule != AUTOMATIC:
            options["scheduler"] = schedule_key(spec.default_schedule)
        if spec.stochastic:
            options["uses_ensd"] = "True"
        if spec.discard_penultimate:
            options["discard_next_to_last_sigma"] = "True"
        out.append({"name": spec.name, "aliases": list(spec.aliases), "options": options})
    return out


# A1111's sd_schedulers: default_rho (Karras' rho; -1 none) and whether the sigmas need the model's own table.
_SCHEDULER_TRAITS: Mapping[str, tuple[float, bool, list[str] | None]] = {
    "Automatic": (-1.0, False, None),
    "Uniform": (-1.0, True, None),
    "Karras": (7.0, False, None),
    "Exponential": (-1.0, False, None),
    "Polyexponential": (1.0, False, None),
    "SGM Uniform": (-1.0, True, ["SGMUniform"]),
    "KL Optimal": (-1.0, False, None),
    "Align Your Steps": (-1.0, False, None),
    "Simple": (-1.0, True, None),
    "Normal": (-1.0, True, None),
    "DDIM": (-1.0, True, None),
    "Beta": (-1.0, True, None),
}


def schedulers() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers: [{name, label, aliases, default_rho, need_inner_model}]."""
    out = []
    for label in SCHEDULE_TYPES:
        rho, inner, aliases = _SCHEDULER_TRAITS.get(label, (-1.0, False, None))
        out.append({"name": schedule_key(label), "label": label, "aliases": aliases, "default_rho": rho,
                    "need_inner_model": inner})
    return out


def model_title(ref: ModelRef, short_hash: str | None = None) -> str:
    """A1111's checkpoint title, "file.safetensors [hash10]" (a folder: its name); the catalog resolves it back."""
    name = ref.path.name if ref.kind == "file" else ref.name
    return f"{name} [{short_hash}]" if short_hash else name


def sd_models(refs: Iterable[ModelRef],
              sha256_of: Callable[[ModelRef], str | None] | None = None) -> list[dict[str, Any]]:
    """GET /sdapi/v1/sd-models: [{title, model_name, hash, sha256, filename, config}].

    sha256_of: the full sha256 of a model when it is known (A1111 lists hashes only once computed; None: none)."""
    out = []
    for ref in refs:
        sha256 = sha256_of(ref) if sha256_of else None
        short = sha256[:MODEL_HASH_DIGITS] if sha256 else None
        out.append({"title": model_title(ref, short), "model_name": ref.name, "hash": short, "sha256": sha256,
                    "filename": str(ref.path), "config": None})
    return out


def error_body(status: int, message: str, field: str | None = None, error: str | None = None) -> dict[str, Any]:
    """A1111's error JSON: {error: the exception's class name, detail, body, errors}.

    A1111 names the exception ("HTTPException" for 4xx it raises itself); ours say RequestError for bad
    input (422). `field`, when known, prefixes `errors` so a client can tell which field to fix."""
    name = error or ("RequestError" if status == 422 else "HTTPException")
    errors = f"{field}: {message}" if field else message
    return {"error": name, "detail": message, "body": "", "errors": errors}
