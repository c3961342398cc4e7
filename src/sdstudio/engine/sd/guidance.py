"""Guidance add-ons the one loop takes as data: how the unconditional and conditional predictions combine
(CFG-Zero*, APG), perturbed-attention guidance (PAG), and FreeU on the UNet for the job.

All in noise-prediction space, per image (no statistic crosses the batch), with eps_u the unconditional
prediction and d = sum_j w_j (eps_j - eps_u) the (AND-weighted) conditional difference, eps_c = eps_u + d:

  CFG        eps = eps_u + s d                                       (the loop's default, no add-on)
  CFG-Zero*  a = <eps_c, eps_u> / ||eps_u||^2 per image; eps = a eps_u + s (eps_c - a eps_u)  (Fan et al.
             2025, eq. 9; its zero-init of the first steps is for flow-matching models and is not applied)
  APG        d' = momentum-averaged d, clipped to norm r, split along eps_c into parallel and orthogonal
             parts: eps = eps_u + s (d'_orth + eta d'_par)                         (Sadat et al. 2024)
  PAG        eps += p (eps_c - eps_ptb), eps_ptb: the conditional prediction with self-attention replaced
             by identity (softmax(QK^T) -> I, so attention(x) = W_o W_v x) in chosen layers (Ahn et al. 2024)

The CFG-Zero* scale and the APG projection are diffusers' (`diffusers.guiders`); the loop calls them through
a `Guide` built per batch (APG's momentum is state of one batch's denoising). `make_guide` builds it from a
request: None when no add-on is on, so plain CFG runs exactly as without this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from sdstudio.engine.requests import GenerationRequest
from sdstudio.errors import RequestError
from sdstudio.samplers.catalog import CFG_PP_DIVISOR

GUIDANCE_KINDS = ("cfg", "cfg-zero*", "apg")
PAG_LAYER_PREFIXES = {"mid": "mid_block."}  # and down.N / up.N -> down_blocks.N. / up_blocks.N. (_layer_prefix)

# FreeU's published (b1, b2, s1, s2) per family (Si et al. 2023, the authors' README)
FREEU_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "sd1": (1.5, 1.6, 0.9, 0.2),
    "sd2": (1.4, 1.6, 0.9, 0.2),
    "sdxl": (1.3, 1.4, 0.9, 0.2),
}


@dataclass
class Guide:
    """Combines one step's predictions: __call__(eps_u, d, conditional) -> eps, where `conditional()` evaluates
    the conditional branch again (PAG runs it with the `pag` modules' self-attention perturbed)."""

    scale: float
    kind: str = "cfg"
    pag_scale: float = 0.0
    pag: Sequence[Attention] = ()
    apg_eta: float = 1.0
    apg_norm_threshold: float = 15.0
    apg_momentum: float = 0.0
    keep_uncond: bool = False  # CFG++ samplers read the step's unconditional prediction (`last_uncond`)
    last_uncond: Tensor | None = field(default=None, init=False, repr=False)
    _momentum: MomentumBuffer | None = field(default=None, init=False, repr=False)

    def __call__(self, uncond: Tensor, delta: Tensor, conditional: Callable[[], Tensor]) -> Tensor:
        if self.keep_uncond:
            self.last_uncond = uncond
        cond = uncond + delta
        if self.kind == "cfg-zero*":
            alpha = cfg_zero_star_scale(cond.flatten(1), uncond.flatten(1)).view(-1, *(1,) * (cond.ndim - 1))
            out = alpha * uncond + self.scale * (cond - alpha * uncond)
        elif self.kind == "apg":
            if self.apg_momentum and self._momentum is None:
                self._momentum = MomentumBuffer(self.apg_momentum)
            out = normalized_guidance(cond, uncond, self.scale, self._momentum, self.apg_eta,
                                      self.apg_norm_threshold)
        else:
            out = uncond + self.scale * delta
        if self.pag_scale > 0:
            with perturbed_attention(self.pag):
                out = out + self.pag_scale * (cond - conditional())
        return out


def check_guidance(req: GenerationRequest) -> None:
    """The add-on fields of a GenerationRequest, before anything loads."""
    if req.guidance not in GUIDANCE_KINDS:
        raise RequestError(f"guidance must be one of {', '.join(GUIDANCE_KINDS)}, got {req.guidance!r}", "guidance")
    for name, lo, hi in (("apg_eta", -10.0, 10.0), ("apg_norm_threshold", 0.0, 100.0), ("apg_momentum", -1.0, 1.0),
                         ("pag_scale", 0.0, 100.0)):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise RequestError(f"{name} must be a number from {lo:g} to {hi:g}, got {value!r:.60}", name)
    layers = req.pag_layers
    if not isinstance(layers, tuple | list) or not 1 <= len(layers) <= 16 or not all(
            isinstance(layer, str) and _layer_prefix(layer) for layer in layers):
        raise RequestError(f"pag_layers must be 1 to 16 of mid, down.N, up.N (N a block number), got {layers!r:.80}",
                           "pag_layers")
    if req.pag_scale > 0 and req.prompt_syntax == "a1111" and " AND " in req.prompt:
        raise RequestError("perturbed-attention guidance takes one positive prompt; remove AND or set pag_scale "
                           "to 0", "pag_scale")
    value = req.freeu
    if not isinstance(value, bool) and not (isinstance(value, tuple | list) and len(value) == 4 and all(
            not isinstance(v, bool) and isinstance(v, int | float) and 0 <= v <= 4 for v in value)):
        raise RequestError(f"freeu must be true, false or [b1, b2, s1, s2] (each 0 to 4), got {value!r:.80}", "freeu")


def freeu_values(request_value: bool | Sequence[float], family: str) -> tuple[float, float, float, float] | None:
    """The FreeU (b1, b2, s1, s2) a request asks for on a model of `family`; None when off."""
    if request_value is False:
        return None
    if request_value is True:
        return FREEU_PRESETS.get(family.split("-")[0], FREEU_PRESETS["sd1"])
    b1, b2, s1, s2 = (float(v) for v in request_value)
    return b1, b2, s1, s2


def _layer_prefix(layer: str) -> str | None:
    """diffusers' module-name prefix of a PAG layer name, or None when the name is not one."""
    if layer in PAG_LAYER_PREFIXES:
        return PAG_LAYER_PREFIXES[layer]
    kind, _, number = layer.partition(".")
    if kind in ("down", "up") and number.isdigit() and len(number) <= 2:
        return f"{kind}_blocks.{int(number)}."
    return None


class IdentitySelfAttention:
    """An attention processor for PAG's perturbed branch: self-attention as its value path only,
    out = W_o (W_v norm(x)) (+ x with a residual connection) / rescale, as diffusers' PAG processors do."""

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **_: object) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:  # (B, C, H, W) -> (B, HW, C)
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        hidden_states = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
        if image:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def pag_modules(unet: nn.Module, layers: Sequence[str]) -> list[Attention]:
    """The self-attention modules of the named layers ("mid", "down.N", "up.N"); a layer without any is an
    error naming the UNet's blocks."""
    found: list[Attention] = []
    for layer in layers:
        prefix = _layer_prefix(layer)
        modules = [module for name, module in unet.named_modules() if name.startswith(prefix or "\0")
                   and isinstance(module, Attention) and not module.is_cross_attention]
        if not modules:
            raise RequestError(f"pag_layers: this UNet has no self-attention in {layer!r}; use mid, down.N or up.N "
                               f"with N from 0 to {len(unet.down_blocks) - 1}", "pag_layers")
        found += modules
    return found


@contextmanager
def perturbed_attention(modules: Sequence[Attention]) -> Iterator[None]:
    """Within: the modules' self-attention is identity (PAG's perturbed branch); their processors after."""
    saved = [m.processor for m in modules]
    identity = IdentitySelfAttention()
    for module in modules:
        module.processor = identity
    try:
        yield
    finally:
        for module, processor in zip(modules, saved, strict=True):
            module.processor = processor


@contextmanager
def freeu(unet: nn.Module, values: tuple[float, float, float, float] | None) -> Iterator[None]:
    """FreeU (Si et al. 2023) on the UNet for the job, through diffusers' enable_freeu: the decoder's backbone
    features of the first two up stages scaled by b1, b2 and their skip features' low frequencies by s1, s2."""
    if values is None:
        yield
        return
    b1, b2, s1, s2 = values
    unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    try:
        yield
    finally:
        unet.disable_freeu()


def make_guide(req: GenerationRequest, unet: nn.Module, cfg_pp: bool = False) -> Guide | None:
    """The request's add-ons as the loop's Guide; None for plain CFG. cfg_pp: the sampler is a CFG++ one,
    which guides with lambda = cfg_scale / 12.5 and reads the unconditional prediction."""
    if req.guidance == "cfg" and req.pag_scale == 0 and not cfg_pp:
        return None
    scale = req.cfg_scale / CFG_PP_DIVISOR if cfg_pp else req.cfg_scale
    return Guide(float(scale), req.guidance, float(req.pag_scale),
                 pag_modules(unet, req.pag_layers) if req.pag_scale > 0 else (), float(req.apg_eta),
                 float(req.apg_norm_threshold), float(req.apg_momentum), keep_uncond=cfg_pp)
