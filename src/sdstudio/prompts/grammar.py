"""A1111 prompt syntax: parse a prompt into a typed AST, then into per-step texts and attention weights.

Pipeline, in A1111's order (modules/extra_networks.py, modules/prompt_parser.py, AUTOMATIC1111 >= 1.6):

1. `<kind:name:args>` tags (`<lora:x:0.7>`, `<lyco:...>`, `<hypernet:...>`) are cut out of the prompt
   first, wherever they are (inside `[a|b]` too), and apply to the whole generation.
2. The rest is split on the word `AND` into sub-prompts (composable diffusion); a sub-prompt ending in
   `:number` has that weight (`a cat AND a dog :0.5`; `a cat:2` alone also has weight 2), else 1.
   Negative prompts take neither step: A1111 encodes them whole, `<lora:...>` and `AND` as text.
3. Each sub-prompt goes through the scheduling grammar (`grammar_parse`): prompt editing
   `[from:to:when]`, `[to:when]`, `[from::when]`, alternation `[a|b|c]`, emphasis groups.
4. For each step of its schedule, the flattened text goes through the attention pass
   (`grammar_attention.attention`): `(x)` x1.1, `((x))` x1.21, `(x:1.3)`, `[x]` /1.1, escapes, BREAK.

Schedules (`schedule`), A1111's `get_learned_conditioning_prompt_schedules`:
- An edit's step from its number n: written with a `.` it is a fraction, int(n * steps); else the step
  int(n). Either is capped at steps. (`[a:b:0.5]` at 10 steps: a through step 5; `[a:b:1.5]` is never
  b; `[a:b:3]` switches after step 3.) With `old_scheduling` (A1111's compatibility option), n < 1 is a
  fraction and n >= 1 a step. For a hires pass (`hires_steps`), fractions count from 1.0 and step
  numbers from the first pass's steps: `[a:b:1.5]` switches half-way through the hires steps.
- The schedule is a list of (end_step, text): the text is used while the sampler's step index
  (0-based, counted per model call) is <= end_step. Boundaries: `steps`, every edit step >= 1, and
  every step 1..steps when the sub-prompt has an alternation. Edit: `from` if boundary <= its step,
  else `to`. Alternation: option (boundary - 1) % n. Consecutive equal texts are not merged (A1111).
  So with 10 steps `a [b:3]` is [(3, "a "), (10, "a b")] and `[a|b]` is a, b, a, ... from boundary 1;
  the first two sampler steps (index 0 and 1) both use boundary 1's text, as in A1111.

Unbalanced and odd syntax, as A1111 does it:
- `(` or `[` without its partner is literal for scheduling, but the attention pass still weights
  everything after it (x1.1 or /1.1) to its partner or to the end: `(unbalanced` -> [("unbalanced", 1.1)].
- A `)` or `]` with no open bracket of its kind is literal text: `a)` -> [("a)", 1.0)].
- Round and square brackets pair separately: `(a [b) c]` gives a x1.1, b x1, c /1.1.
- `(x:w)` with w not a number (`(x:cat)`) is the text `x:cat` at 1.1; `(x:1.2.3)` makes A1111 crash:
  PromptSyntaxError here. A weight may be scheduled: `(x:[1.2|0.8])` alternates the weight.
- `[a:b]`, `[a:b:c:3]`, `[a:1e]`, `[a|b:c]`: not groups; `[`, `:` and `]` are literal for scheduling
  (and the `[` still divides the attention of what follows by 1.1).
- A `|` outside any `[...|...]`, a backslash at the very end, or a backslash before a newline make the
  scheduling grammar reject the sub-prompt: no editing or alternation anywhere in it; the text is used
  as written at every step (`ParsedPrompt.notes` says so).
- Escapes: `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters. A backslash before anything else is
  dropped by the attention pass (so `\\:1.5)` after a `(` is still a weight), but it does stop `|` and
  `:` from being syntax for scheduling.
- BREAK is a word: `a BREAK b` -> [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)] (the spaces around it go).
  Inside brackets A1111 multiplies the marker too: `(a BREAK b)` has ("BREAK", -1.1), which its text
  encoder then reads as the word; we return the same list.
- Brackets nested more than 100 deep: PromptSyntaxError (A1111's tree transformer overflows the stack).

Ambiguity: A1111 parses with lark's Earley parser, which picks among equally ranked parses in set
order, so for a top-level edit immediately followed by a stray `)` `]` `:` `(` `[` (`[a:b:3]:`,
`([a:3]))`) A1111 applies the edit or not depending on Python's hash seed (checked with lark 1.1.2 under
PYTHONHASHSEED 0..9). We always apply it, and `notes` mentions it. Every other case we checked is
deterministic in A1111 and matches ours.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from sdstudio.errors import RequestError
from sdstudio.prompts.grammar_attention import BREAK_MARK, attention
from sdstudio.prompts.grammar_nodes import (
    Alternate,
    Break,
    Edit,
    ExtraNetwork,
    Node,
    PromptSyntaxError,
    Text,
    Weighted,
)
from sdstudio.prompts.grammar_parse import Schedule, parse_schedule, split_and, split_networks

__all__ = [
    "BREAK_MARK", "Alternate", "Break", "Edit", "ExtraNetwork", "Node", "ParsedPrompt", "PromptNote",
    "PromptSchedule", "PromptSyntaxError", "StepText", "SubPrompt", "SubSchedule", "Text", "Weighted",
    "attention", "edit_end_step", "explain", "parse", "render", "schedule",
]


@dataclass(frozen=True)
class SubPrompt:
    """One `AND` part. text: what A1111 schedules and encodes (weight and trailing spaces removed).
    literal: the scheduling grammar rejects `text`, so it is used as written at every step.
    origins[k]: column in the prompt of text[k]."""

    text: str
    weight: float
    nodes: tuple[Node, ...]
    literal: bool = False
    origins: tuple[int, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class PromptNote:
    """Something the user may not expect, at `column` of the prompt."""

    column: int
    message: str


@dataclass(frozen=True)
class ParsedPrompt:
    prompt: str
    subprompts: tuple[SubPrompt, ...]
    extra_networks: tuple[ExtraNetwork, ...]
    text_without_networks: str
    notes: tuple[PromptNote, ...] = ()

    @property
    def is_scheduled(self) -> bool:
        """Whether any sub-prompt changes during sampling (an edit or an alternation)."""
        return any(_dynamic(sub.nodes) for sub in self.subprompts)


def parse(prompt: str, *, negative: bool = False) -> ParsedPrompt:
    """Parse an A1111 prompt. negative=True: a negative prompt (no `<...>` tags or `AND`, as A1111).

    Raises PromptSyntaxError, and nothing else, for any string: where A1111 would crash (a weight like
    `(x:1.2.3)`, nesting deeper than 100) or produce non-finite numbers. Errors that depend on the step
    count (a scheduled weight `(x:[1.2|1..2])`) are raised by `schedule`.
    """
    if negative:
        result = parse_schedule(prompt, range(len(prompt) + 1), frozenset(), prompt)
        sub = SubPrompt(prompt, 1.0, result.nodes, not result.ok, tuple(range(len(prompt) + 1)))
        notes = [*_notes(prompt, result)]
        if "<" in prompt and split_networks(prompt).networks:
            notes.append(PromptNote(prompt.index("<"), "A1111 does not apply <...> tags in a negative prompt: "
                                                        "they are encoded as text"))
        _check_static(sub, prompt)
        return ParsedPrompt(prompt, (sub,), (), prompt, tuple(notes))
    stripped = split_networks(prompt)
    subs, notes = [], []
    for part in split_and(stripped.text):
        origins = stripped.origins[part.start:part.end + 1]
        cuts = frozenset(c - part.start for c in stripped.cuts if part.start < c < part.end)
        if not math.isfinite(part.weight):
            raise PromptSyntaxError("AND weight is too large", prompt, stripped.origins[part.weight_at])
        result = parse_schedule(stripped.text[part.start:part.end], origins, cuts, prompt)
        sub = SubPrompt(stripped.text[part.start:part.end], part.weight, result.nodes, not result.ok, origins)
        _check_static(sub, prompt)
        subs.append(sub)
        notes.extend(_notes(prompt, result))
    return ParsedPrompt(prompt, tuple(subs), stripped.networks, stripped.text, tuple(notes))


def _notes(prompt: str, result: Schedule) -> Iterator[PromptNote]:
    if not result.ok:
        bad = "`|` outside [a|b]" if prompt[result.failed_at:result.failed_at + 1] == "|" else "a lone backslash"
        yield PromptNote(result.failed_at, f"{bad}: A1111 ignores all editing and alternation in this part "
                                           "and uses its text as written")
    for col in result.strays:
        char = prompt[col]
        if char in "([":
            yield PromptNote(col, f"unbalanced `{char}`: it weights the text after it "
                                  f"({'x1.1' if char == '(' else '/1.1'}) up to a free `{')' if char == '(' else ']'}` "
                                  "or to the end")
        elif char in ")]":
            yield PromptNote(col, f"unbalanced `{char}`: it closes an earlier unbalanced bracket, or is text")
    for col in result.ambiguous:
        yield PromptNote(col, "this group holds an edit and is directly followed (after any adjacent groups) by "
                              "a stray bracket or colon: A1111 may read it as plain text, depending on its hash "
                              "seed; sdstudio applies the edit (a space before the stray makes A1111 agree)")


def _check_static(sub: SubPrompt, prompt: str) -> None:
    """A sub-prompt without edits or alternation is one text at every step: check its weights now."""
    if sub.literal or not _dynamic(sub.nodes):
        try:
            attention(sub.text)
        except PromptSyntaxError as e:
            raise PromptSyntaxError(e.reason, prompt, sub.origins[e.column]) from None


# ---- schedules ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepText:
    """A1111's ScheduledPromptConditioning without the tensor: `text` is used while step <= end_step."""

    end_step: int
    text: str


@dataclass(frozen=True)
class SubSchedule:
    weight: float
    steps: tuple[StepText, ...]

    def text_at(self, step: int) -> str:
        """The text for sampler step index `step` (0-based), A1111's `reconstruct_cond_batch`: the first
        entry with step <= end_step; past the last one, the first entry (as A1111)."""
        return next((s.text for s in self.steps if step <= s.end_step), self.steps[0].text)


@dataclass(frozen=True)
class PromptSchedule:
    subprompts: tuple[SubSchedule, ...]

    @property
    def texts(self) -> tuple[str, ...]:
        """Every distinct text, in order of first use: encode each once."""
        return tuple(dict.fromkeys(s.text for sub in self.subprompts for s in sub.steps))

    def at(self, step: int) -> tuple[tuple[str, float], ...]:
        """(text, AND weight) of each sub-prompt at sampler step index `step` (0-based)."""
        return tuple((sub.text_at(step), sub.weight) for sub in self.subprompts)


@dataclass(frozen=True)
class _Timing:
    steps: int            # the steps edits are counted in
    int_offset: int       # subtracted from step numbers (hires pass: the first pass's steps)
    frac_offset: float    # subtracted from fractions (hires pass: 1.0)
    old: bool


def _timing(steps: int, hires_steps: int | None, old_scheduling: bool) -> _Timing:
    for name, value in (("steps", steps), ("hires_steps", hires_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise RequestError(f"{name} must be a whole number >= 1, got {value!r}", name)
    if hires_steps is None or old_scheduling:
        return _Timing(steps, 0, 0.0, old_scheduling)
    return _Timing(hires_steps, steps, 1.0, False)


def edit_end_step(edit: Edit, steps: int, hires_steps: int | None = None, old_scheduling: bool = False,
                  prompt: str = "") -> int:
    """The last step of `edit.before`: min(steps, int(v)) with v as in the module docstring (may be < 1:
    then `after` from the start). Raises PromptSyntaxError when v overflows."""
    return _end(edit, _timing(steps, hires_steps, old_scheduling), prompt)


def _end(edit: Edit, t: _Timing, prompt: str) -> int:
    n = edit.when
    if t.old:
        v = n * t.steps if n < 1 else n
    elif edit.fraction:
        v = (n - t.frac_offset) * t.steps
    else:
        v = n - t.int_offset
    if not math.isfinite(v):
        raise PromptSyntaxError(f"edit step {n} is too large", prompt, edit.when_column)
    return min(t.steps, int(v))


def schedule(parsed: ParsedPrompt, steps: int, *, hires_steps: int | None = None,
             old_scheduling: bool = False) -> PromptSchedule:
    """Each sub-prompt's (end_step, text) list, A1111's schedules (see module docstring); every text is
    checked with `attention` (PromptSyntaxError at the prompt column where A1111 would crash)."""
    timing = _timing(steps, hires_steps, old_scheduling)
    subs = []
    for sub in parsed.subprompts:
        edits, alternates = _walk(sub.nodes)
        bounds = {timing.steps, *(e for e in (_end(x, timing, parsed.prompt) for x in edits) if e >= 1)}
        if alternates:
            bounds.update(range(1, timing.steps + 1))
        entries = []
        for b in sorted(bounds):
            pieces = list(_render(sub.nodes, b, timing, parsed.prompt))
            text = "".join(p for p, _, _ in pieces)
            _check(text, pieces, parsed.prompt)
            entries.append(StepText(b, text))
        subs.append(SubSchedule(sub.weight, tuple(entries)))
    return PromptSchedule(tuple(subs))


def render(nodes: tuple[Node, ...], step: int, steps: int, *, hires_steps: int | None = None,
           old_scheduling: bool = False) -> str:
    """The flat text of `nodes` at schedule boundary `step` (1-based, as A1111's at_step)."""
    return "".join(p for p, _, _ in _render(nodes, step, _timing(steps, hires_steps, old_scheduling), ""))


def _render(nodes: tuple[Node, ...], step: int, t: _Timing, prompt: str) -> Iterator[tuple[str, int, bool]]:
    """(piece, prompt column, piece is contiguous in the prompt) in order; the pieces joined are the
    text A1111's `at_step` produces (every token verbatim, edits and alternations resolved)."""
    for n in nodes:
        if isinstance(n, Text):
            yield n.raw, n.span[0], True
        elif isinstance(n, Break):
            yield "BREAK", n.span[0], True
        elif isinstance(n, Weighted):
            yield n.bracket, n.span[0], False
            yield from _render(n.children, step, t, prompt)
            if n.weight_nodes is not None:
                colon = n.weight_nodes[0].span[0] - 1 if n.weight_nodes else n.span[1] - 2
                yield ":", colon, False
                yield from _render(n.weight_nodes, step, t, prompt)
            yield ")" if n.bracket == "(" else "]", n.span[1] - 1, False
        elif isinstance(n, Edit):
            yield from _render(n.before if step <= _end(n, t, prompt) else n.after, step, t, prompt)
        else:
            yield from _render(n.options[(step - 1) % len(n.options)], step, t, prompt)


def _check(text: str, pieces: list[tuple[str, int, bool]], prompt: str) -> None:
    try:
        attention(text)
    except PromptSyntaxError as e:
        at = 0
        for piece, column, contiguous in pieces:
            if at + len(piece) > e.column:
                raise PromptSyntaxError(e.reason, prompt, column + (e.column - at if contiguous else 0)) from None
            at += len(piece)
        raise PromptSyntaxError(e.reason, prompt, len(prompt) - 1) from None


def _walk(nodes: tuple[Node, ...]) -> tuple[list[Edit], bool]:
    """Every Edit in the tree (all branches, as A1111's CollectSteps) and whether any Alternate exists."""
    edits: list[Edit] = []
    alternates = False
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if isinstance(n, Weighted):
            stack.extend((*n.children, *(n.weight_nodes or ())))
        elif isinstance(n, Edit):
            edits.append(n)
            stack.extend((*n.before, *n.after))
        elif isinstance(n, Alternate):
            alternates = True
            stack.extend(x for option in n.options for x in option)
    return edits, alternates


def _dynamic(nodes: tuple[Node, ...]) -> bool:
    edits, alternates = _walk(nodes)
    return alternates or bool(edits)


# ---- explain -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExplainedStep:
    end_step: int
    text: str
    attention: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class ExplainedSubPrompt:
    text: str
    weight: float
    literal: bool
    steps: tuple[ExplainedStep, ...]


@dataclass(frozen=True)
class Explanation:
    """What a prompt does at `steps`: per sub-prompt, its schedule and each text's attention list."""

    steps: int
    subprompts: tuple[ExplainedSubPrompt, ...]
    extra_networks: tuple[ExtraNetwork, ...]
    notes: tuple[PromptNote, ...]

    def to_text(self) -> str:
        lines = [f"<{n.kind}:{':'.join(n.items)}>" for n in self.extra_networks]
        for i, sub in enumerate(self.subprompts):
            lines.append(f"sub-prompt {i + 1}, weight {sub.weight:g}: {sub.text!r}"
                         + (" (used as written: scheduling syntax rejected)" if sub.literal else ""))
            for s in sub.steps:
                chunks = " ".join(_chunk(t, w) for t, w in s.attention)
                lines.append(f"  steps ..{s.end_step}: {chunks}")
        lines.extend(f"note at column {n.column}: {n.message}" for n in self.notes)
        return "\n".join(lines)


def _chunk(text: str, weight: float) -> str:
    """One attention span for `prompt explain`: 'text', 'text'x1.1, or BREAK (a weight below 0 marks it)."""
    if weight < 0:
        return "BREAK"
    return f"{text!r}" if weight == 1.0 else f"{text!r}x{weight:.4g}"


def explain(parsed: ParsedPrompt, steps: int, *, hires_steps: int | None = None,
            old_scheduling: bool = False) -> Explanation:
    """The schedule of every sub-prompt at `steps` with each text's attention list (data, not printing)."""
    plan = schedule(parsed, steps, hires_steps=hires_steps, old_scheduling=old_scheduling)
    subs = tuple(
        ExplainedSubPrompt(sub.text, sched.weight, sub.literal,
                           tuple(ExplainedStep(s.end_step, s.text, tuple(attention(s.text))) for s in sched.steps))
        for sub, sched in zip(parsed.subprompts, plan.subprompts, strict=True))
    return Explanation(steps, subs, parsed.extra_networks, parsed.notes)
