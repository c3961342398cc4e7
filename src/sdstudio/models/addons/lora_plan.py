"""Matching LoRA layers to a model's modules: the merge plan and the report of what matched and what not.

A layer's module name is looked up in an index of the model's modules keyed by the kohya spelling
(dots -> underscores), which covers both namings at once: `down_blocks.0.attentions.0.proj_in` and
`down_blocks_0_attentions_0_proj_in` both key `down_blocks_0_attentions_0_proj_in`. Text-encoder names are
indexed with and without `text_model_`, because transformers 5's CLIPTextModel has no `text_model`
level while CLIPTextModelWithProjection (SDXL's te2) and every LoRA file have one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sdstudio.errors import ModelError
from sdstudio.models.addons.lora_keys import COMPONENTS, Dropped, LoraFile, LoraLayer, sgm_to_diffusers

_MISMATCH_REASONS = ("module not found", "shape mismatch", "this model has no")  # the file is for another model
_LABELS = {"unet": "UNet", "te1": "text encoder 1", "te2": "text encoder 2 (SDXL's OpenCLIP-G)"}


@dataclass(frozen=True)
class FileReport:
    """What one LoRA file does to this model. Keys: matched_keys + len(dropped) == total_keys."""

    name: str
    short_hash: str
    weight: float
    total_keys: int
    matched_keys: int = 0
    matched_modules: tuple[str, ...] = ()   # "component:module", e.g. "unet:mid_block.attentions.0.proj_in"
    dropped: tuple[Dropped, ...] = ()
    components: tuple[str, ...] = ()        # touched, in COMPONENTS order
    skipped: bool = False                   # weight 0: the file was not applied at all
    family_hint: str = ""                   # which model family the file's keys suggest

    @property
    def partial(self) -> bool:
        return bool(self.dropped)

    def dropped_reasons(self) -> dict[str, int]:
        """Reason -> number of keys dropped for it."""
        return dict(Counter(d.reason for d in self.dropped))

    def summary(self) -> str:
        head = f"{self.name} x{self.weight:g}"
        if self.skipped:
            return f"{head}: skipped (weight 0)"
        text = (f"{head}: {self.matched_keys}/{self.total_keys} keys -> {len(self.matched_modules)} modules"
                f" in {', '.join(self.components) or 'nothing'}")
        if self.dropped:
            reasons = "; ".join(f"{n} x {reason}" for reason, n in self.dropped_reasons().items())
            text += f"; dropped {len(self.dropped)} keys ({reasons})"
            if any(d.reason.startswith(_MISMATCH_REASONS) for d in self.dropped):
                text += f"; the file looks like {self.family_hint}"
        return text


@dataclass(frozen=True)
class LoraReport:
    files: tuple[FileReport, ...]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(c in f.components for f in self.files))

    def summary(self) -> str:
        return "\n".join(f.summary() for f in self.files)

    def infotext_hashes(self) -> str:
        """A1111's "Lora hashes" value: `name: short hash, ...` (":" and "," removed from names)."""
        return ", ".join(f"{f.name.replace(':', '').replace(',', '')}: {f.short_hash}"
                         for f in self.files if not f.skipped and f.short_hash)


@dataclass(eq=False)
class ModulePlan:
    """The merged update of one module: ΔW = Σ coeff · up @ down over every file that touches it."""

    component: str
    name: str
    module: nn.Module
    terms: list[tuple[float, Tensor, Tensor]] = field(default_factory=list)  # (weight · scale, up, down)

    def delta(self, device: torch.device) -> Tensor:
        """ΔW in float32 on `device`, shaped like the weight (out, in[, kh, kw])."""
        shape = self.module.weight.shape
        total = torch.zeros(shape, dtype=torch.float32, device=device)
        for coeff, up, down in self.terms:
            up2 = up.to(device, torch.float32).flatten(1)        # (out, r)
            down2 = down.to(device, torch.float32).flatten(1)    # (r, in·kh·kw)
            total += coeff * (up2 @ down2).reshape(shape)
        return total


def plan_loras(models: Mapping[str, nn.Module | None],
               loras: Sequence[tuple[LoraFile, float]]) -> tuple[LoraReport, list[ModulePlan]]:
    """Resolve every file's layers against `models` ({"unet": ..., "te1": ..., "te2": ...})."""
    indexes = {c: _index(m, text_encoder=c != "unet") for c, m in models.items() if m is not None}
    plans: dict[tuple[str, str], ModulePlan] = {}
    files = []
    for lora, weight in loras:
        if weight == 0:
            files.append(FileReport(lora.name, lora.short_hash, weight, len(lora.state_dict), skipped=True))
            continue
        report = _plan_file(lora, float(weight), models, indexes, plans)
        if not report.matched_keys:
            raise ModelError(_nothing_matched(report, models))
        files.append(report)
    return LoraReport(tuple(files)), list(plans.values())


def _plan_file(lora: LoraFile, weight: float, models: Mapping[str, nn.Module | None],
               indexes: Mapping[str, dict[str, str]], plans: dict[tuple[str, str], ModulePlan]) -> FileReport:
    matched: list[str] = []
    dropped = list(lora.dropped)
    for layer in lora.layers:
        found = _resolve(layer, models, indexes)
        if isinstance(found, str):
            dropped.extend(Dropped(k, found) for k in layer.keys)
            continue
        name, module = found
        plan = plans.setdefault((layer.component, name), ModulePlan(layer.component, name, module))
        plan.terms.append((weight * layer.scale, layer.up, layer.down))
        matched.append(f"{layer.component}:{name}")
    touched = {m.split(":")[0] for m in matched}
    return FileReport(
        lora.name, lora.short_hash, weight, len(lora.state_dict),
        matched_keys=len(lora.state_dict) - len(dropped), matched_modules=tuple(matched), dropped=tuple(dropped),
        components=tuple(c for c in COMPONENTS if c in touched), family_hint=guess_family(lora))


def _index(model: nn.Module, *, text_encoder: bool) -> dict[str, str]:
    """kohya spelling -> module name; text encoders also with/without the `text_model_` level."""
    index = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        flat = name.replace(".", "_")
        index[flat] = name
        if text_encoder:
            other = flat.removeprefix("text_model_") if flat.startswith("text_model_") else f"text_model_{flat}"
            index.setdefault(other, name)
    return index


def _resolve(layer: LoraLayer, models: Mapping[str, nn.Module | None],
             indexes: Mapping[str, dict[str, str]]) -> tuple[str, nn.Module] | str:
    """The module a layer changes, or why it changes none."""
    model = models.get(layer.component)
    if model is None:
        return f"this model has no {_LABELS[layer.component]}"
    flat = layer.target.replace(".", "_")
    name = indexes[layer.component].get(flat)
    config = getattr(model, "config", None)
    if name is None and layer.component == "unet" and config is not None and (sgm := sgm_to_diffusers(flat, config)):
        name = indexes["unet"].get(sgm)
    if name is None:
        return f"module not found in this model's {_LABELS[layer.component]}"
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear | nn.Conv2d):
        return f"{name} is a {type(module).__name__}, not a Linear or Conv2d"
    out, fan_in = module.weight.shape[0], module.weight[0].numel()
    if layer.up.shape[0] != out or layer.down[0].numel() != fan_in:
        return (f"shape mismatch: LoRA makes {layer.up.shape[0]}x{layer.down[0].numel()}, "
                f"{name} is {out}x{fan_in}")
    return name, module


def _describe(models: Mapping[str, nn.Module | None]) -> str:
    parts = []
    unet = models.get("unet")
    if unet is not None and getattr(unet, "config", None) is not None:
        parts.append(f"UNet cross-attention width {unet.config.cross_attention_dim}")
    widths = [str(m.get_input_embeddings().embedding_dim) for c, m in models.items() if c != "unet" and m]
    if widths:
        parts.append(f"text encoder widths {' + '.join(widths)}")
    return ", ".join(parts) or "no UNet or text encoder given"


def _nothing_matched(report: FileReport, models: Mapping[str, nn.Module | None]) -> str:
    reasons = "; ".join(f"{n} x {r}" for r, n in report.dropped_reasons().items()) or "the file has no keys"
    return (f"LoRA {report.name!r} matches nothing in this model ({_describe(models)}): it looks like "
            f"{report.family_hint}. Dropped keys: {reasons}")


_WIDTH_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "the SDXL refiner"}
_METADATA_FAMILIES = (  # (modelspec.architecture part, ss_base_model_version start, family)
    ("stable-diffusion-xl", "sdxl", "SDXL"), ("flux", "flux", "Flux"), ("stable-diffusion-3", "sd3", "SD3"),
    ("stable-diffusion-v2", "sd_v2", "SD2.x"), ("stable-diffusion-v1", "sd_v1", "SD1.x"),
)


def guess_family(lora: LoraFile) -> str:
    """The model family a LoRA was trained for, from its metadata, key names and widths, with the evidence."""
    arch = str(lora.metadata.get("modelspec.architecture", "")).lower()
    base = str(lora.metadata.get("ss_base_model_version", "")).lower()
    for part, start, family in _METADATA_FAMILIES:
        if part in arch or (base and base.startswith(start)):
            return f"{family} (its metadata says {arch or base})"
    keys = list(lora.state_dict)
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        return "Flux (its keys name double/single transformer blocks)"
    if any(k.startswith(("transformer.", "lora_transformer_")) or "joint_blocks" in k for k in keys):
        return "a transformer model such as SD3 or Flux (its keys name transformer blocks)"
    if any(layer.component == "te2" for layer in lora.layers) or any("text_encoder_2" in k for k in keys):
        return "SDXL (its keys name a second text encoder: lora_te2_ / text_encoder_2)"
    for layer in lora.layers:
        if layer.component == "unet" and "attn2" in layer.target and layer.target.endswith(("to_k", "to_v")):
            width = int(layer.down[0].numel())
            return f"{_WIDTH_FAMILIES.get(width, 'an unknown family')} (its cross-attention input width is {width})"
    if any("input_blocks" in k or "output_blocks" in k for k in keys):
        return "SDXL (its keys use the original sgm block names)"
    return "an unknown family (its keys name no known model)"
