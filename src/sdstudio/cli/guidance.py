"""The guidance add-on options of txt2img, img2img and inpaint (engine/sd/guidance.py): FreeU, PAG, CFG-Zero*,
APG, as request fields; and the few-step presets (engine/presets.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sdstudio.cli.common import fail

FreeU = Annotated[str | None, typer.Option("--freeu", metavar="on|B1,B2,S1,S2", help="FreeU: 'on' for the model "
                                           "family's published values, or b1,b2,s1,s2 (e.g. 1.5,1.6,0.9,0.2).")]
Pag = Annotated[float | None, typer.Option("--pag", metavar="SCALE", help="Perturbed-attention guidance scale "
                                           "(Forge's default 3; 0: off).")]
PagLayers = Annotated[str | None, typer.Option("--pag-layers", help="UNet layers PAG perturbs: mid, down.N, up.N, "
                                               "space-separated. (default: mid)")]
Guidance = Annotated[str | None, typer.Option("--guidance", help="How the prompt's predictions combine: cfg, "
                                              "cfg-zero* or apg. (default: cfg)")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Few-step defaults a distilled model or LoRA is "
                                               "made for: lcm, turbo, lightning, hyper or tcd (sampler, schedule, "
                                               "steps, CFG; options given win).")]
Eta = Annotated[float | None, typer.Option("--eta", help="Noise re-added per step by DDIM (its eta) and TCD (its "
                                           "gamma), 0-1. (default: DDIM 0, TCD 0.3)")]
ApgEta = Annotated[float | None, typer.Option("--apg-eta", help="APG: weight of the guidance's part parallel to "
                                              "the prediction (0 keeps only the orthogonal part). (default: 1)")]
ApgThreshold = Annotated[float | None, typer.Option("--apg-norm-threshold", help="APG: clip the guidance's norm to "
                                                    "this (0: off). (default: 15)")]
ApgMomentum = Annotated[float | None, typer.Option("--apg-momentum", help="APG: running average of the guidance "
                                                   "over the steps, -1 to 1 (0: off). (default: 0)")]


def add_on_fields(freeu: str | None, pag: float | None, pag_layers: str | None, guidance: str | None,
                  apg_eta: float | None, apg_norm_threshold: float | None,
                  apg_momentum: float | None) -> dict[str, Any]:
    """The options given, as request fields (the engine checks their ranges)."""
    fields: dict[str, Any] = {"pag_scale": pag, "guidance": guidance, "apg_eta": apg_eta,
                              "apg_norm_threshold": apg_norm_threshold, "apg_momentum": apg_momentum}
    if pag_layers is not None:
        fields["pag_layers"] = tuple(pag_layers.replace(",", " ").split())
    if freeu is not None:
        fields["freeu"] = freeu_option(freeu)
    return {k: v for k, v in fields.items() if v is not None}


def freeu_option(text: str) -> bool | tuple[float, ...]:
    if text.lower() in ("on", "true", "yes"):
        return True
    if text.lower() in ("off", "false", "no"):
        return False
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"--freeu takes 'on' or four numbers b1,b2,s1,s2 (e.g. 1.5,1.6,0.9,0.2), got {text!r}")


def preset_base(name: str | None, base: dict[str, Any]) -> dict[str, Any]:
    """Fields read from an image (`base`) with a preset's on top; the command's own options go on top of these."""
    from sdstudio.engine.presets import with_preset
    from sdstudio.errors import RequestError

    try:
        return with_preset(name, base, {})
    except RequestError as e:
        fail(str(e))
