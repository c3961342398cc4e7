"""The three text passes A1111 makes before encoding, in its order (see `grammar` for the rules):

1. `split_networks`: remove `<kind:args>` tags (modules/extra_networks.py `re_extra_net`).
2. `split_and`: split on the word `AND` and take each part's trailing `:weight`
   (modules/prompt_parser.py `get_multicond_prompt_list`).
3. `parse_schedule`: the scheduling grammar (prompt_parser.py `schedule_parser`, a lark Earley grammar):

       start      := (prompt | stray+)*          stray := one of  ( ) [ ] :
       prompt     := (group | plain | whitespace)*
       group      := "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"          -> Weighted
                   | "[" [prompt ":"] prompt ":" ws? NUMBER ws? "]"                         -> Edit
                   | "[" prompt ("|" prompt?)+ "]"                                          -> Alternate
       plain      := ([^\\()[]:|] | "\\" any-but-newline)+
       NUMBER     := lark's SIGNED_NUMBER: [+-]? (INT exp | (INT "." INT? | "." INT) exp? | INT)

   Inside a group everything must be a group or plain text: a bracket or `:` that cannot be part of a
   group can only be a stray at the top level. The string fails the grammar when a `|` is outside any
   alternation or a backslash ends the text or precedes a newline.

   Written here as a linear pass, not an Earley parser: brackets are paired by depth, each pair is
   checked innermost first (a pair is a group iff its direct contents fit one of the forms and all its
   nested pairs are groups), then the top level takes every group it meets, left to right, and keeps
   the other brackets as strays. Taking a group never makes the rest fail (a `|` inside a group is
   inside an alternation), so this accepts exactly the strings the grammar accepts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from sdstudio.prompts.grammar_nodes import (
    ROUND,
    SQUARE,
    Alternate,
    Break,
    Edit,
    ExtraNetwork,
    Node,
    PromptSyntaxError,
    Text,
    Weighted,
)

MAX_NESTING = 100  # groups deeper than this are an error (A1111's recursive tree transformer overflows)

_NETWORK = re.compile(r"<(\w+):([^>]+)>")                      # A1111 re_extra_net
_AND = re.compile(r"\bAND\b")                                  # A1111 re_AND
_AND_WEIGHT = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")          # the number in A1111 re_weight
_PLAIN = re.compile(r"(?:[^\\()\[\]:|]|\\.)+")                 # lark `plain` (whitespace included)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_BREAK = re.compile(r"\bBREAK\b")
_SPACE = re.compile(r"\s*")
_OPEN, _CLOSE, _STRAY = frozenset("(["), frozenset(")]"), frozenset("()[]:")


@dataclass(frozen=True)
class Stripped:
    """The prompt without its extra-network tags. origins[k]: column in the prompt of text[k]
    (k = len(text) maps past the end); cuts: indices of text where a tag was removed."""

    text: str
    networks: tuple[ExtraNetwork, ...]
    origins: tuple[int, ...]
    cuts: frozenset[int]


def split_networks(prompt: str) -> Stripped:
    """Remove every `<kind:items>` (kind a word, items anything but `>`), A1111's `parse_prompt`."""
    parts, origins, networks, cuts, last = [], [], [], set(), 0
    for m in _NETWORK.finditer(prompt):
        parts.append(prompt[last:m.start()])
        origins.extend(range(last, m.start()))
        cuts.add(len(origins))
        networks.append(ExtraNetwork(m.group(1), tuple(m.group(2).split(":")), m.start()))
        last = m.end()
    parts.append(prompt[last:])
    origins.extend(range(last, len(prompt) + 1))
    return Stripped("".join(parts), tuple(networks), tuple(origins), frozenset(cuts))


@dataclass(frozen=True)
class Part:
    """One `AND` part: text[start:end] of the stripped prompt is its text; weight_at: where its
    `:weight` number starts (-1 when it has none)."""

    start: int
    end: int
    weight: float
    weight_at: int


def split_and(text: str) -> list[Part]:
    """A1111's `get_multicond_prompt_list` for one prompt.

    Parts are split at `\\bAND\\b`. Each part matches `^(.*?)(?:\\s*:\\s*(NUM))?\\s*$` (lazy text, so
    trailing whitespace and a final `:number` are not text), NUM = [-+]?(\\d+\\.?|\\d*\\.\\d+). Computed
    here without the regex's quadratic backtracking.
    """
    bounds = [0, *(x for m in _AND.finditer(text) for x in (m.start(), m.end())), len(text)]
    parts = []
    for start, end in zip(bounds[::2], bounds[1::2], strict=True):
        body_end = start + len(text[start:end].rstrip())  # str.isspace is re's \s for str patterns
        colon = text.rfind(":", start, body_end)
        number = text[colon + 1:body_end].lstrip() if colon >= 0 else ""
        if colon >= 0 and _AND_WEIGHT.fullmatch(number):
            text_end = start + len(text[start:colon].rstrip())
            parts.append(Part(start, text_end, float(number), body_end - len(number)))
        else:
            parts.append(Part(start, body_end, 1.0, -1))
    return parts


@dataclass(frozen=True)
class Schedule:
    """parse_schedule's result. ok=False: the grammar rejects the text (at `failed_at`); A1111 then uses
    it literally at every step and `nodes` is that literal text. strays: columns of stray characters.
    ambiguous: columns of groups A1111 may or may not read as groups (see `grammar`, "Ambiguity")."""

    nodes: tuple[Node, ...]
    ok: bool
    failed_at: int = -1
    strays: tuple[int, ...] = ()
    ambiguous: tuple[int, ...] = ()


def parse_schedule(s: str, origins: Sequence[int], cuts: frozenset[int], prompt: str) -> Schedule:
    """Parse one sub-prompt `s`; origins[k] is the prompt column of s[k], cuts are indices of s where an
    extra-network tag was removed (text is split there so spans stay exact). Raises PromptSyntaxError
    only for nesting deeper than MAX_NESTING or an edit step that is not a finite number."""
    toks = _tokens(s)
    pairs = _pairs(toks)
    built: dict[int, Node | None] = {}
    height: dict[int, int] = {}
    ctx = _Ctx(s, origins, cuts, toks, pairs, built, prompt)
    for o, c in sorted(pairs.items(), key=lambda oc: oc[1]):  # innermost first
        built[o] = _group(ctx, o, c)
        inner = [height[k] for k in _direct(pairs, o + 1, c) if built.get(k) is not None]
        height[o] = 1 + max(inner, default=0)
    nodes: list[Node] = []
    strays: list[int] = []
    ambiguous: list[int] = []
    chain: list[tuple[Node, int]] = []  # adjacent top-level groups (not alternations) just before k
    k = 0
    while k < len(toks):
        kind, a, b = toks[k]
        node = built.get(k)
        if node is not None:
            if height[k] > MAX_NESTING:
                raise PromptSyntaxError(f"brackets nested more than {MAX_NESTING} deep", prompt, origins[a])
            nodes.append(node)
            chain = [] if isinstance(node, Alternate) else [*chain, (node, origins[a])]
            k = pairs[k] + 1
            continue
        if kind in _STRAY:
            ambiguous.extend(col for group, col in chain if _has_edit(group))
        chain = []
        if kind == "t":
            nodes.extend(_text(ctx, a, b))
        elif kind in _STRAY:
            nodes.append(Text(kind, True, (origins[a], origins[a] + 1)))
            strays.append(origins[a])
        else:  # "|" outside an alternation, or a backslash at the end / before a newline
            return Schedule(tuple(_text(ctx, 0, len(s))), False, origins[a])
        k += 1
    return Schedule(tuple(nodes), True, -1, tuple(strays), tuple(ambiguous))


@dataclass(frozen=True)
class _Ctx:
    s: str
    origins: Sequence[int]
    cuts: frozenset[int]
    toks: list[tuple[str, int, int]]
    pairs: dict[int, int]
    built: dict[int, Node | None]
    prompt: str


def _tokens(s: str) -> list[tuple[str, int, int]]:
    """(kind, start, end): kind "t" for plain text, a special character, or "bad" for a lone backslash."""
    toks, i = [], 0
    while i < len(s):
        m = _PLAIN.match(s, i)
        if m:
            toks.append(("t", i, m.end()))
            i = m.end()
        else:
            toks.append(("bad" if s[i] == "\\" else s[i], i, i + 1))
            i += 1
    return toks


def _pairs(toks: list[tuple[str, int, int]]) -> dict[int, int]:
    """Open-bracket token index -> the close bracket at the same depth (either kind; checked later)."""
    stack, pairs = [], {}
    for k, (kind, _, _) in enumerate(toks):
        if kind in _OPEN:
            stack.append(k)
        elif kind in _CLOSE and stack:
            pairs[stack.pop()] = k
    return pairs


def _direct(pairs: dict[int, int], start: int, stop: int) -> list[int]:
    """Token indices in [start, stop) at depth 0, nested pairs skipped (their open index kept)."""
    out, k = [], start
    while k < stop:
        out.append(k)
        k = pairs[k] + 1 if k in pairs else k + 1
    return out


def _group(ctx: _Ctx, o: int, c: int) -> Node | None:
    """The group for the bracket pair (o, c), or None when the pair is not a group."""
    segments: list[list[Node]] = [[]]
    seps: list[str] = []
    starts = [ctx.toks[o][2]]  # source index where each segment starts
    for k in _direct(ctx.pairs, o + 1, c):
        kind, a, b = ctx.toks[k]
        if k in ctx.pairs:
            node = ctx.built[k]
            if node is None:
                return None
            segments[-1].append(node)
        elif kind == "t":
            segments[-1].extend(_text(ctx, a, b))
        elif kind in (":", "|"):
            segments.append([])
            seps.append(kind)
            starts.append(b)
        else:  # "bad"
            return None
    opening, closing = ctx.toks[o][0], ctx.toks[c][0]
    span = (ctx.origins[ctx.toks[o][1]], ctx.origins[ctx.toks[c][1]] + 1)
    parts = tuple(tuple(seg) for seg in segments)
    if opening == "(":
        if closing != ")" or "|" in seps or len(parts) > 2:
            return None
        if len(parts) == 1:
            return Weighted(parts[0], ROUND, "(", None, span)
        return Weighted(parts[0], _round_weight(ctx.s[starts[1]:ctx.toks[c][1]], parts[1]), "(", parts[1], span)
    if closing != "]":
        return None
    if not seps:
        return Weighted(parts[0], SQUARE, "[", None, span)
    if ":" not in seps:
        return Alternate(parts, span)
    if "|" in seps or len(parts) > 3:
        return None
    when_at = _SPACE.match(ctx.s, starts[-1]).end()
    number = _NUMBER.match(ctx.s, when_at)
    if number is None or ctx.s[number.end():ctx.toks[c][1]].strip():
        return None
    when = float(number.group())
    if when in (float("inf"), float("-inf")):
        raise PromptSyntaxError(f"edit step {number.group()} is too large", ctx.prompt, ctx.origins[when_at])
    before = parts[0] if len(parts) == 3 else ()
    return Edit(before, parts[-2], when, "." in number.group(), len(parts) == 3, ctx.origins[when_at], span)


def _round_weight(raw: str, nodes: tuple[Node, ...]) -> float | None:
    """The multiplier of `(x:raw)`: the number when raw is one, None when it is scheduled, else 1.1."""
    if re.fullmatch(r"\s*[+-]?[.\d]+\s*", raw):
        try:
            return float(raw)
        except ValueError:
            return None  # e.g. `1.2.3`: the attention pass reports it
    if any(isinstance(n, Edit | Alternate) for n in nodes):
        return None
    return ROUND


def _has_edit(node: Node) -> bool:
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Edit):
            return True
        if isinstance(n, Weighted):
            stack.extend((*n.children, *(n.weight_nodes or ())))
        # an Edit inside an alternation is not at risk: the alternation's brackets are never strays
    return False


def _text(ctx: _Ctx, a: int, b: int) -> list[Node]:
    """Text and Break nodes for s[a:b]: split at BREAK words, and at removed tags so spans stay exact."""
    out: list[Node] = []
    pos = a
    for m in _BREAK.finditer(ctx.s[a:b]):
        out.extend(_plain(ctx, pos, a + m.start()))
        out.append(Break((ctx.origins[a + m.start()], ctx.origins[a + m.end() - 1] + 1)))
        pos = a + m.end()
    out.extend(_plain(ctx, pos, b))
    return out


def _plain(ctx: _Ctx, a: int, b: int) -> list[Node]:
    bounds = [a, *sorted(x for x in ctx.cuts if a < x < b), b]
    return [Text(ctx.s[x:y], False, (ctx.origins[x], ctx.origins[y - 1] + 1))
            for x, y in pairwise(bounds) if y > x]
