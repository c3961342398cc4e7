"""LoRA files read into low-rank layers: kohya/A1111 and diffusers/PEFT key naming, SDXL sgm block names.

A LoRA layer changes one Linear or Conv2d weight W (out, in[, kh, kw]) by
    ΔW = scale · up @ down,   down (r, in[, kh, kw]), up (out, r[, 1, 1]),   scale = alpha / r
(alpha = r when the file has none, i.e. scale 1; PEFT's rsLoRA uses alpha / sqrt(r)). Conv weights are
flattened to (out, in·kh·kw) for the product (LoCon), so 1x1 and 3x3 convs need no special case.

Namings understood here (module names are resolved against the model later, in `lora.py`):
- kohya/A1111: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`; text encoders
  `lora_te_` / `lora_te1_` (CLIP-L) and `lora_te2_` (SDXL's OpenCLIP-G). SDXL UNets are named by the
  original sgm blocks (`lora_unet_input_blocks_4_1_...`), mapped by `sgm_to_diffusers`.
- diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `unet.<module>.lora.down.weight`,
  `text_encoder[_2].<module>.lora_linear_layer.down.weight`, attention-processor files
  `...attn1.processor.to_q_lora.down.weight` (with or without the `unet.` prefix).
Everything else (LoHa, LoKr, DoRA, full diffs, ...) is recorded as dropped with the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

COMPONENTS = ("unet", "te1", "te2")  # te1: CLIP-L (SD2: OpenCLIP-H), te2: SDXL's OpenCLIP-G

_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"))
# "transformer.": SD3's and Flux's denoiser, which takes the UNet's slot
_DIFFUSERS_PREFIXES = (("unet.", "unet"), ("transformer.", "unet"), ("text_encoder_2.", "te2"),
                       ("text_encoder.", "te1"))
_PROCESSOR_TARGETS = {  # attention-processor LoRA names -> module, per component kind
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "te": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_UNSUPPORTED = (  # (start of a key part after the module name, reason)
    ("hada_", "LoHa (hada_*) is not supported"),
    ("lokr_", "LoKr (lokr_*) is not supported"),
    ("dora_scale", "DoRA (dora_scale) is not supported"),
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector) is not supported"),
    ("lora_mid", "LoCon CP decomposition (lora_mid) is not supported"),
    ("oft_", "OFT is not supported"),
    ("w_norm", "LyCORIS norm layers are not supported"),
    ("b_norm", "LyCORIS norm layers are not supported"),
    ("on_input", "LyCORIS norm layers are not supported"),
)
_UNSUPPORTED_ROLE = "!"  # role "!<key part>", e.g. "!hada_w1_a": a key of an unsupported kind


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """ΔW = scale · up @ down for one module, as the file names it (the module is found later)."""

    component: str          # "unet" | "te1" | "te2"
    target: str             # module name without the component prefix, dotted or kohya-underscored
    down: Tensor            # (r, in) or (r, in, kh, kw)
    up: Tensor              # (out, r) or (out, r, 1, 1)
    scale: float            # alpha / r (1 when the file has no alpha)
    keys: tuple[str, ...]   # the file keys this layer is made of (down, up[, alpha])

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class Dropped:
    """A file key that will not be applied, and why."""

    key: str
    reason: str


@dataclass(frozen=True, eq=False)
class ParsedLora:
    format: str                       # "kohya" or "peft/diffusers"
    layers: tuple[LoraLayer, ...]
    dropped: tuple[Dropped, ...]


def parse_lora(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> ParsedLora:
    """Group a LoRA file's keys into layers; every key ends up in exactly one layer or in `dropped`."""
    kohya = any(k.startswith(tuple(p for p, _ in _KOHYA_PREFIXES)) for k in state_dict)
    groups: dict[tuple[str, str], dict[str, str]] = {}  # (component, target) -> role -> key
    dropped: list[Dropped] = []
    for key in state_dict:
        found = _kohya_role(key) if kohya else _diffusers_role(key)
        if isinstance(found, Dropped):
            dropped.append(found)
        else:
            component, target, role = found
            groups.setdefault((component, target), {})[role] = key
    alphas = _peft_alphas(metadata or {})
    layers: list[LoraLayer] = []
    for (component, target), roles in groups.items():
        layer = _layer(state_dict, component, target, roles, alphas)
        if isinstance(layer, LoraLayer):
            layers.append(layer)
        else:
            dropped.extend(layer)
    return ParsedLora("kohya" if kohya else "peft/diffusers", tuple(layers), tuple(dropped))


def _unsupported(part: str) -> str | None:
    """Why a key part such as "hada_w1_a" or "diff_b" cannot be applied; None for plain LoRA parts."""
    head = part.split(".")[0]
    if head in ("diff", "diff_b"):
        return "full-weight diffs (diff/diff_b) are not supported"
    return next((reason for start, reason in _UNSUPPORTED if head.startswith(start)), None)


def _kohya_role(key: str) -> tuple[str, str, str] | Dropped:
    """`lora_unet_x_y.lora_down.weight` -> ("unet", "x_y", "down")."""
    stem, _, rest = key.partition(".")
    prefix, component = next(((p, c) for p, c in _KOHYA_PREFIXES if stem.startswith(p)), ("", ""))
    if not component:
        return Dropped(key, "not a kohya LoRA key (no lora_unet_/lora_te_ prefix)")
    if _unsupported(rest):
        return component, stem.removeprefix(prefix), _UNSUPPORTED_ROLE + rest
    role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
    if role is None:
        return Dropped(key, f"unrecognised LoRA key part {rest!r}")
    return component, stem.removeprefix(prefix), role


_PEFT = re.compile(r"^(?P<t>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LEGACY = re.compile(r"^(?P<t>.+)\.lora(?:_linear_layer)?\.(?P<ud>down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?P<t>.+?)(?:\.processor)?\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")


def _diffusers_role(key: str) -> tuple[str, str, str] | Dropped:
    """`unet.a.b.lora_A.weight` -> ("unet", "a.b", "down"); keys without a prefix are the UNet's."""
    component, name = next(((c, key.removeprefix(p)) for p, c in _DIFFUSERS_PREFIXES if key.startswith(p)),
                           ("unet", key))
    parts = name.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if _unsupported(part):
            return component, ".".join(parts[:i]), _UNSUPPORTED_ROLE + ".".join(parts[i:])
    if m := _PEFT.match(name):
        return component, m["t"], "down" if m["ab"] == "A" else "up"
    if m := _PROCESSOR.match(name):
        projections = _PROCESSOR_TARGETS["unet" if component == "unet" else "te"]
        return component, f"{m['t']}.{projections[m['p']]}", m["ud"]
    if m := _LEGACY.match(name):
        return component, m["t"], m["ud"]
    if name.endswith(".alpha"):
        return component, name.removesuffix(".alpha"), "alpha"
    return Dropped(key, "unrecognised LoRA key")


def _layer(sd: Mapping[str, Tensor], component: str, target: str, roles: dict[str, str],
           alphas: dict[str, dict[str, Any]]) -> LoraLayer | list[Dropped]:
    """One module's keys -> its layer, or the reasons its keys are dropped."""
    reasons = {r: _unsupported(r.removeprefix(_UNSUPPORTED_ROLE)) for r in roles if r.startswith(_UNSUPPORTED_ROLE)}
    if reasons:  # e.g. a DoRA scale beside up/down: not a plain LoRA, so none of the module applies
        first = next(iter(reasons.values()))
        also = f"its module also has unsupported keys: {first}"
        return [Dropped(k, reasons.get(r) or also) for r, k in roles.items()]
    keys = tuple(roles[r] for r in ("down", "up", "alpha") if r in roles)
    if "down" not in roles or "up" not in roles:
        missing = "up" if "down" in roles else "down"
        return [Dropped(k, f"incomplete layer: no {missing} weight") for k in keys]
    down, up = sd[roles["down"]], sd[roles["up"]]
    rank = int(down.shape[0])
    if up.dim() < 2 or int(up.shape[1]) != rank:
        return [Dropped(k, f"down {tuple(down.shape)} and up {tuple(up.shape)} ranks differ") for k in keys]
    config = alphas.get(component)
    alpha = float(sd[roles["alpha"]]) if "alpha" in roles else _pattern_alpha(config, target)
    scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if config and config.get("use_rslora") else rank)
    return LoraLayer(component, target, down, up, scale, keys)


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": 8, ...}: a PEFT LoraConfig per prefix)."""
    try:
        flat = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    components = {p.rstrip("."): c for p, c in _DIFFUSERS_PREFIXES}
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        prefix, _, field = key.rpartition(".")
        if prefix in components:
            out.setdefault(components[prefix], {})[field] = value
    return out


def _pattern_alpha(config: dict[str, Any] | None, target: str) -> float | None:
    """PEFT's alpha for a module: the longest matching `alpha_pattern` entry, else `lora_alpha`."""
    if not config:
        return None
    patterns = config.get("alpha_pattern") or {}
    hits = [p for p in patterns if re.fullmatch(rf"(.*\.)?{p}", target)]
    if hits:
        return float(patterns[max(hits, key=len)])
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None


# --- SDXL (and any LDM-named) UNet blocks: input_blocks / middle_block / output_blocks -> diffusers ---

_LDM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_LDM_TOP = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
            "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
            "label_emb_0_2": "add_embedding_linear_2"}
_MIDDLE = ("mid_block_resnets_0", "mid_block_attentions_0", "mid_block_resnets_1")
_SGM = re.compile(r"^(?:(?P<io>input|output)_blocks_(?P<i>\d+)|middle_block)_(?P<j>\d+)_(?P<rest>.+)$")


def sgm_to_diffusers(name: str, config: Mapping[str, Any]) -> str | None:
    """`input_blocks_4_1_transformer_blocks_0_attn1_to_q` -> `down_blocks_1_attentions_0_transformer_...`.

    With L layers per block, input block i >= 1 is down block (i-1) // (L+1), layer (i-1) % (L+1); layer L
    is the downsampler. Output block i is up block i // (L+1), layer i % (L+1): its sub-module 0 is the
    resnet, 1 the attention (the upsampler in a block without attention), 2 the upsampler. The middle
    block is resnet, attention, resnet. Returns None when `name` is not an sgm block name.
    """
    for ldm, ours in _LDM_TOP.items():
        if name == ldm or name.startswith(ldm + "_"):
            return ours + name[len(ldm):]
    m = _SGM.match(name)
    if not m:
        return None
    j, rest = int(m["j"]), m["rest"]
    if m["io"] is None:
        return _join(_MIDDLE[j], rest) if j < len(_MIDDLE) else None
    per = config["layers_per_block"]
    per = int(per if isinstance(per, int) else per[0])
    if m["io"] == "input":
        block, layer = divmod(int(m["i"]) - 1, per + 1)
        if layer == per:
            return _join(f"down_blocks_{block}_downsamplers_0", "conv" if rest == "op" else rest)
        return _join(f"down_blocks_{block}_{('resnets', 'attentions')[j]}_{layer}", rest) if j < 2 else None
    block, layer = divmod(int(m["i"]), per + 1)
    up_types = list(config["up_block_types"])
    if block >= len(up_types) or j > 2:
        return None
    if j == 2 or (j == 1 and "CrossAttn" not in up_types[block]):
        return _join(f"up_blocks_{block}_upsamplers_0", rest)
    return _join(f"up_blocks_{block}_{('resnets', 'attentions')[j]}_{layer}", rest)


def _join(block: str, rest: str) -> str:
    return f"{block}_{_LDM_RESNET.get(rest, rest)}"


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA file, read and parsed once; reuse it across requests (it is never modified)."""

    name: str                          # file stem: the name in `<lora:name:weight>` and in "Lora hashes"
    path: Path | None
    sha256: str                        # A1111's LoRA hash (see the module docstring)
    format: str                        # "kohya" or "peft/diffusers"
    state_dict: Mapping[str, Tensor]   # as read, on the CPU
    metadata: Mapping[str, str]        # safetensors `__metadata__` ({} for other formats)
    layers: tuple[LoraLayer, ...]      # the keys grouped into low-rank layers
    dropped: tuple[Dropped, ...]       # keys no model can use (LoHa, LoKr, DoRA, diffs, unknown)

    @property
    def short_hash(self) -> str:
        """The 12 hex digits A1111 writes in "Lora hashes"."""
        return self.sha256[:12]
