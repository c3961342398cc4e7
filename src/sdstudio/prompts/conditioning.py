"""Conditioning types consumed by the one denoising loop.

SD1.x/SD2.x condition the UNet on CLIP hidden states (B, 77k, D); SDXL adds a pooled text embedding
(B, 1280) and six micro-conditioning time ids (B, 6) through `added_cond_kwargs`. IP-Adapter image prompts
ride along as `added_cond_kwargs["image_embeds"]`, one tensor per adapter (engine/sd/ip_adapter.py).
Conditioning may change per step (prompt editing, alternation): the loop asks a CondProvider for step i.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class TextConditioning:
    embeds: Tensor                 # (B, T, D) cross-attention context
    pooled: Tensor | None = None   # (B, P) SDXL pooled text embedding
    time_ids: Tensor | None = None  # (B, 6) SDXL original size, crop, target size; (B, 5) refiner
    image_embeds: tuple[Tensor, ...] = ()  # per IP-Adapter: (B, n, D) or (B, n, tokens, D) for n images

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def repeat(self, n: int) -> TextConditioning:
        """Each row repeated n times along the batch: (B, ...) -> (B*n, ...)."""
        return TextConditioning(*(None if t is None else t.repeat_interleave(n, 0) for t in self._parts()),
                                tuple(t.repeat_interleave(n, 0) for t in self.image_embeds))

    def cat(self, other: TextConditioning) -> TextConditioning:
        return TextConditioning(*(None if a is None else torch.cat([a, b]) for a, b in
                                  zip(self._parts(), other._parts(), strict=True)),
                                tuple(torch.cat([a, b]) for a, b in zip(self.image_embeds, other.image_embeds,
                                                                        strict=True)))

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        added: dict[str, Any] = {}
        if self.pooled is not None:
            added = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        if self.image_embeds:
            added["image_embeds"] = list(self.image_embeds)
        if added:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    def _parts(self) -> tuple[Tensor | None, ...]:
        return self.embeds, self.pooled, self.time_ids


@dataclass(frozen=True)
class GuidedConditioning:
    """One step's conditioning, all (B, ...): the negative and one or more weighted positives.

    Several positives are A1111's composable `AND` (Liu et al. 2022, "Compositional Visual Generation
    with Composable Diffusion Models"): eps = eps_u + s * sum_j w_j (eps_j - eps_u).
    """

    negative: TextConditioning
    positives: tuple[TextConditioning, ...]
    weights: tuple[float, ...] = (1.0,)

    @property
    def positive(self) -> TextConditioning:
        return self.positives[0]

    @cached_property
    def cfg_batch(self) -> TextConditioning:
        """The guidance batch ((k+1)B, ...): negative rows first, then each positive's."""
        out = self.negative
        for p in self.positives:
            out = out.cat(p)
        return out

    def repeat(self, n: int) -> GuidedConditioning:
        return GuidedConditioning(self.negative.repeat(n), tuple(p.repeat(n) for p in self.positives), self.weights)


class CondProvider(Protocol):
    def at(self, step: int) -> GuidedConditioning: ...

    def repeat(self, n: int) -> CondProvider: ...


@dataclass(frozen=True)
class StaticCond:
    """The same conditioning at every step."""

    cond: GuidedConditioning

    def at(self, step: int) -> GuidedConditioning:
        return self.cond

    def repeat(self, n: int) -> StaticCond:
        return StaticCond(self.cond.repeat(n))


@dataclass(frozen=True)
class ScheduledCond:
    """Conditioning that changes during sampling (prompt editing, alternation), as A1111 schedules it.

    Entry j applies while the sampling step (0-based, out of `steps`) is <= ends[j]. The loop counts
    model evaluations, which second-order samplers make about twice per step: evaluation i of
    `evaluations` is step i * steps // evaluations.
    """

    ends: tuple[int, ...]
    conds: tuple[GuidedConditioning, ...]
    steps: int
    evaluations: int

    def at(self, step: int) -> GuidedConditioning:
        sampling_step = step * self.steps // max(self.evaluations, 1)
        index = bisect_left(self.ends, sampling_step)
        return self.conds[min(index, len(self.conds) - 1)]

    def repeat(self, n: int) -> ScheduledCond:
        return ScheduledCond(self.ends, tuple(c.repeat(n) for c in self.conds), self.steps, self.evaluations)


def xl_time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int],
                count: int, aesthetic_score: float) -> Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2), one row (1, count):

    base (6):    [orig_h, orig_w, crop_top, crop_left, target_h, target_w]
    refiner (5): [orig_h, orig_w, crop_top, crop_left, aesthetic_score]
    Each value is embedded sinusoidally by the UNet and concatenated with the pooled text embedding.
    """
    head = [*original_hw, *crop_top_left]
    if count == 6:
        return torch.tensor([[*head, *target_hw]], dtype=torch.float32)
    if count == 5:
        return torch.tensor([[*head, aesthetic_score]], dtype=torch.float32)
    raise ValueError(f"SDXL UNets take 5 or 6 time ids, this one takes {count}")
