"""Infotext keys of the guidance add-ons, written and read back: FreeU and PAG as Forge's built-in scripts
write them ("FreeU Integrated": freeu_enabled, freeu_b1 ... freeu_s2; "Perturbed Attention Guidance
Integrated": PerturbedAttentionGuidance_enabled, PerturbedAttentionGuidance_scale); the rest, which A1111 and
Forge lack, under keys of ours (Guidance, APG eta, APG norm threshold, APG momentum, PAG layers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FREEU_KEYS = ("freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2")
GUIDANCE_LABELS = {"cfg-zero*": "CFG-Zero*", "apg": "APG"}
APG_KEYS = {"APG eta": "apg_eta", "APG norm threshold": "apg_norm_threshold", "APG momentum": "apg_momentum"}
DEFAULT_PAG_LAYERS = ("mid",)


def guidance_params(r: Mapping[str, Any]) -> dict[str, Any]:
    """The keys for a request record (its `freeu` already the values used, not `true`)."""
    out: dict[str, Any] = {}
    freeu = r.get("freeu", False)
    if isinstance(freeu, list | tuple):
        out["freeu_enabled"] = True
        out.update(zip(FREEU_KEYS, freeu, strict=True))
    if r.get("pag_scale", 0) > 0:
        out["PerturbedAttentionGuidance_enabled"] = True
        out["PerturbedAttentionGuidance_scale"] = r["pag_scale"]
        layers = tuple(r.get("pag_layers", DEFAULT_PAG_LAYERS))
        out["PAG layers"] = " ".join(layers) if layers != DEFAULT_PAG_LAYERS else None
    kind = r.get("guidance", "cfg")
    out["Guidance"] = GUIDANCE_LABELS.get(kind)
    if kind == "apg":
        out.update({key: r[name] for key, name in APG_KEYS.items()})
    return out


def guidance_fields(params: Mapping[str, str]) -> dict[str, Any]:
    """Request fields from parsed infotext params (only those stated)."""
    fields: dict[str, Any] = {}
    try:
        if params.get("freeu_enabled") == "True":
            values = [params.get(key) for key in FREEU_KEYS]
            fields["freeu"] = tuple(float(v) for v in values) if all(values) else True
        if params.get("PerturbedAttentionGuidance_enabled") == "True":
            fields["pag_scale"] = float(params.get("PerturbedAttentionGuidance_scale", 3.0))
            fields["pag_layers"] = tuple(params.get("PAG layers", "mid").split())
        kinds = {label: kind for kind, label in GUIDANCE_LABELS.items()}
        if params.get("Guidance") in kinds:
            fields["guidance"] = kinds[params["Guidance"]]
        fields.update({name: float(params[key]) for key, name in APG_KEYS.items() if key in params})
    except ValueError:
        pass  # a damaged value: what was read so far
    return fields
