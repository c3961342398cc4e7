"""From prompt text to what the loop consumes: the conditioning of every sampling step.

a1111: parse (AND, prompt editing, alternation), schedule over the request's steps, encode each distinct
text once, and hand the loop a ScheduledCond (a StaticCond when nothing changes). Within one step the
negative and every AND part are padded to the same number of 77-token windows with the encoding of an
empty window (A1111 pads the shorter side with its empty chunk).
compel: the compel library's syntax and encoder; plain: the text as it is (diffusers' behaviour).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdstudio.prompts.conditioning import CondProvider, GuidedConditioning, ScheduledCond, StaticCond, TextConditioning
from sdstudio.prompts.encode import EncodedPrompt
from sdstudio.prompts.grammar import PromptSchedule, StepText, SubSchedule, parse, schedule

PROMPT_SYNTAXES = ("a1111", "compel", "plain")
Finish = Callable[[EncodedPrompt, bool], TextConditioning]  # (encoded, is_negative) -> placed, with time ids


@dataclass(frozen=True)
class PromptPlan:
    """The positive and negative schedules of one request."""

    positive: PromptSchedule
    negative: SubSchedule

    @property
    def ends(self) -> tuple[int, ...]:
        """Steps after which some text changes (sorted): the segments of the schedule."""
        return tuple(sorted({s.end_step for sub in (*self.positive.subprompts, self.negative) for s in sub.steps}))

    def map_texts(self, change: Callable[[str], str]) -> PromptPlan:
        """The same schedule with every text changed (e.g. embedding names written out as their tokens)."""
        def sub(s: SubSchedule) -> SubSchedule:
            return SubSchedule(s.weight, tuple(StepText(t.end_step, change(t.text)) for t in s.steps))

        return PromptPlan(PromptSchedule(tuple(sub(s) for s in self.positive.subprompts)), sub(self.negative))


def plan_prompts(prompt: str, negative: str, steps: int, syntax: str) -> PromptPlan:
    if syntax != "a1111":  # compel and plain texts are encoded whole, at every step
        return PromptPlan(PromptSchedule((SubSchedule(1.0, (StepText(steps, prompt),)),)),
                          SubSchedule(1.0, (StepText(steps, negative),)))
    positive = schedule(parse(prompt), steps)
    negative_schedule = schedule(parse(negative, negative=True), steps).subprompts[0]
    return PromptPlan(positive, negative_schedule)


def build_conditioning(plan: PromptPlan, steps: int, evaluations: int, encode: Callable[[str], EncodedPrompt],
                       finish: Finish, zero_negative: bool = False) -> CondProvider:
    """zero_negative: an empty negative prompt is all zeros (SDXL's force_zeros_for_empty_prompt)."""
    empty = encode("")
    conds = []
    for end in plan.ends:
        positives = [(encode(text), weight) for text, weight in plan.positive.at(end)]
        negative_text = plan.negative.text_at(end)
        negative = encode(negative_text)
        if zero_negative and not negative_text:
            negative = EncodedPrompt(torch.zeros_like(negative.embeds), _zeros(negative.pooled))
        windows = max(e.embeds.shape[1] for e in [negative, *(p for p, _ in positives)])
        filler = EncodedPrompt(torch.zeros_like(empty.embeds)) if zero_negative and not negative_text else empty
        conds.append(GuidedConditioning(
            finish(pad(negative, windows, filler), True),
            tuple(finish(pad(p, windows, empty), False) for p, _ in positives),
            tuple(w for _, w in positives)))
    if len(conds) == 1:
        return StaticCond(conds[0])
    return ScheduledCond(plan.ends, tuple(conds), steps, evaluations)


def pad(encoded: EncodedPrompt, tokens: int, empty: EncodedPrompt) -> EncodedPrompt:
    """Append empty-window encodings until `encoded` has `tokens` positions: (1, 77k, D) -> (1, tokens, D)."""
    missing = (tokens - encoded.embeds.shape[1]) // empty.embeds.shape[1]
    if missing <= 0:
        return encoded
    return EncodedPrompt(torch.cat([encoded.embeds, *[empty.embeds] * missing], dim=1), encoded.pooled)


def _zeros(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.zeros_like(t)
