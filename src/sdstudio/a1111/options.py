"""AUTOMATIC1111 `/sdapi/v1` shapes that need no request body: the options we honour, the listing routes
(samplers, schedulers, sd-models) and A1111's error body. Pure functions of our data; no server here.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdstudio.a1111.option_table import CHOICES, DEFAULTS, RANGES, RESTRICTED
from sdstudio.errors import RequestError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.samplers import AUTOMATIC, SAMPLERS, SCHEDULE_TYPES
from sdstudio.samplers.catalog import SCHEDULE_NAMES

log = logging.getLogger(__name__)

VAE_AUTOMATIC = "Automatic"  # A1111's sd_vae: the checkpoint's own VAE (or one named like it)
VAE_NONE = "None"            # ... the checkpoint's own VAE, never a separate file
MODEL_HASH_DIGITS = 10       # A1111's short model hash
MAX_EXTRA_OPTIONS = 256      # options A1111 extensions add, which we keep without knowing them
MAX_OPTION_CHARS = 4096      # the JSON size of one such option's value, or of one text option
# options whose value sdstudio acts on; every other is kept and read back only
ACTED_ON = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "sd_noise_schedule", "sdxl_crop_top",
            "sdxl_crop_left", "sdxl_refiner_low_aesthetic_score", "sdxl_refiner_high_aesthetic_score", "emphasis",
            "eta_noise_seed_delta", "samples_format", "live_previews_enable", "show_progress_every_n_steps")


@dataclass(frozen=True)
class A1111Options:
    """A1111's options (GET/POST /sdapi/v1/options): `values` holds those set, every other key has A1111 1.10's
    default (option_table.py). A body's override_settings win for that request. Values are checked on the way
    in (type of the default, slider range, the choices of those we act on), so a stored set is always usable.
    """

    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def restored(cls, stored: Mapping[str, Any]) -> A1111Options:
        """Options from a stored set, dropping (and logging) any value that is no longer valid."""
        options = cls()
        for key, value in stored.items():
            try:
                options = options.updated({key: value})
            except RequestError as e:
                log.warning("dropping stored A1111 option %r: %s", key, e)
        return options

    def get(self, key: str) -> Any:
        return self.values[key] if key in self.values else DEFAULTS.get(key)

    def to_dict(self) -> dict[str, Any]:
        """Every option, as GET /sdapi/v1/options returns them."""
        return {**DEFAULTS, **self.values}

    def updated(self, settings: Mapping[str, Any]) -> A1111Options:
        """These options with A1111-keyed `settings` applied (POST /options, override_settings); a value of the
        wrong type or out of range is a RequestError naming the option. Unknown keys (options of A1111
        extensions) are kept as given, within size limits."""
        if not isinstance(settings, Mapping):
            raise RequestError("options must be a JSON object of option names to values", "options")
        values = dict(self.values)
        for key, value in settings.items():
            if key in RESTRICTED and value != self.get(key):
                raise RequestError(f"option {key!r} cannot be changed over the API (as in AUTOMATIC1111)", key)
            if key == "sd_model_checkpoint" and value is None:
                continue  # clients echo back a checkpoint they never set
            checked = check_option(key, value)
            if key in DEFAULTS and checked == DEFAULTS[key]:
                values.pop(key, None)  # A1111's default again: nothing to keep
            else:
                values[key] = checked
        extra = [k for k in values if k not in DEFAULTS]
        if len(extra) > MAX_EXTRA_OPTIONS:
            raise RequestError(f"too many unknown options ({len(extra)}, at most {MAX_EXTRA_OPTIONS})", "options")
        return A1111Options(values)

    @property
    def sd_model_checkpoint(self) -> str | None:
        return self.get("sd_model_checkpoint")

    @property
    def clip_skip(self) -> int:
        return int(self.get("CLIP_stop_at_last_layers"))

    @property
    def vae(self) -> str | None:
        """Our GenerationRequest.vae: None for the model's own ("Automatic"), "none", or a VAE's name."""
        sd_vae = str(self.get("sd_vae")).strip()
        if sd_vae.lower() in ("", VAE_AUTOMATIC.lower()):
            return None
        return "none" if sd_vae.lower() == VAE_NONE.lower() else sd_vae

    def request_fields(self) -> dict[str, Any]:
        """Our request fields these options set (A1111 reads them from opts while it generates)."""
        return dict(model=self.sd_model_checkpoint, vae=self.vae, clip_skip=self.clip_skip,
                    zero_terminal_snr=self.get("sd_noise_schedule") == "Zero Terminal SNR",
                    crop_left_top=(int(self.get("sdxl_crop_left")), int(self.get("sdxl_crop_top"))),
                    aesthetic_score=float(self.get("sdxl_refiner_high_aesthetic_score")),
                    negative_aesthetic_score=float(self.get("sdxl_refiner_low_aesthetic_score")),
                    prompt_syntax="plain" if self.get("emphasis") == "None" else "a1111",
                    eta_noise_seed_delta=int(self.get("eta_noise_seed_delta")))


def check_option(key: str, value: Any) -> Any:
    """`value` for option `key` as stored (whole floats for integer options become ints), or a RequestError
    saying what the option takes."""
    if key not in DEFAULTS:
        if len(json.dumps(value, default=str)) > MAX_OPTION_CHARS:
            raise RequestError(f"option {key!r} is larger than {MAX_OPTION_CHARS} characters of JSON", key)
        return value
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RequestError(f"option {key!r} takes true or false, got {value!r:.80}", key)
        return value
    if isinstance(default, int | float):
        return _number(key, value, integer=isinstance(default, int))
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 256:
            raise RequestError(f"option {key!r} takes a list of strings, got {value!r:.80}", key)
        return value
    if value is None and default is None:
        return value
    if not isinstance(value, str) or len(value) > MAX_OPTION_CHARS:
        raise RequestError(f"option {key!r} takes a string (at most {MAX_OPTION_CHARS} characters), "
                           f"got {value!r:.80}", key)
    if key in CHOICES and value not in CHOICES[key]:
        raise RequestError(f"option {key!r} takes one of {', '.join(CHOICES[key])}; got {value!r:.80}", key)
    return value


def _number(key: str, value: Any, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"option {key!r} takes a number, got {value!r:.80}", key)
    if integer and value != int(value):
        raise RequestError(f"option {key!r} takes a whole number, got {value!r}", key)
    low, high = RANGES.get(key, (-math.inf, math.inf))
    if not low <= value <= high:
        raise RequestError(f"option {key!r} must be between {low:g} and {high:g}, got {value!r:.80}", key)
    return int(value) if integer else float(value)


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
