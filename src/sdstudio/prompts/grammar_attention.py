"""A1111's attention pass (`parse_prompt_attention`): flat prompt text -> [(text, weight)].

It runs on the text of one step, after editing and alternation are resolved, and reads brackets with
two stacks, not a tree:

    token        effect
    \\( \\) \\[ \\] \\\\   the character itself, weight 1
    \\ (other)    dropped (the next character is then read normally)
    (  [         push the index of the next output chunk on the round / square stack
    :w)          w = [+-]?[.\\d]+ (spaces allowed around it): if a ( is open, pop it and multiply
                 every chunk since it by float(w); else literal text
    )  ]         pop the matching stack and multiply the chunks since by 1.1 / (1/1.1); a close
                 with its stack empty is literal text
    text, :      literal; BREAK (as a word, with the spaces around it) becomes ("BREAK", -1.0)

At the end every bracket still open multiplies the chunks after it (round ones first, in order of
opening, then square ones), and neighbouring chunks of equal weight are merged. The multiplications
happen in this order so the floats equal A1111's to the last bit (e.g. 1.1**4 * 1.3 = 1.5730000000000004).
"""

from __future__ import annotations

import math
import re

from sdstudio.prompts.grammar_nodes import ROUND, SQUARE, PromptSyntaxError

BREAK_MARK = ("BREAK", -1.0)

_TOKEN = re.compile(
    r"""\\[()\[\]\\]            # escaped bracket or backslash
      | \\                      # any other backslash
      | [(\[]
      | :\s*([+-]?[.\d]+)\s*\)  # explicit weight closing a round bracket
      | [)\]]
      | [^\\()\[\]:]+           # text
      | :
    """,
    re.X,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")


def attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] for one flat prompt, exactly A1111's `parse_prompt_attention`.

    Raises PromptSyntaxError (column in `text`) where A1111 raises: a weight that is not a number,
    e.g. `(x:1.2.3)`; and, unlike A1111 (which would produce NaN images), a weight too large to be finite.
    """
    chunks: list[str] = []
    weights: list[float] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:  # weights[start:] *= factor, one by one as A1111
        for p in range(start, len(weights)):
            weights[p] *= factor

    for m in _TOKEN.finditer(text):
        token, number = m.group(0), m.group(1)
        if token.startswith("\\"):
            chunks.append(token[1:])
            weights.append(1.0)
        elif token == "(":
            round_open.append(len(chunks))
        elif token == "[":
            square_open.append(len(chunks))
        elif number is not None and round_open:
            scale(round_open.pop(), _weight(number, text, m.start(1)))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_split_break(token)):
                if i > 0:
                    chunks.append(BREAK_MARK[0])
                    weights.append(BREAK_MARK[1])
                chunks.append(part)
                weights.append(1.0)
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    return _merge(chunks, weights) if chunks else [("", 1.0)]


def _split_break(text: str) -> list[str]:
    """`re.split(r"\\s*\\bBREAK\\b\\s*", text)` (A1111's re_break) without its quadratic backtracking
    on long runs of spaces: each BREAK word takes the whitespace on both sides with it."""
    parts, last = [], 0
    for m in _BREAK_WORD.finditer(text):
        start, end = m.start(), m.end()
        while start > last and text[start - 1].isspace():
            start -= 1
        while end < len(text) and text[end].isspace():
            end += 1
        parts.append(text[last:start])
        last = end
    parts.append(text[last:])
    return parts


def _weight(number: str, text: str, column: int) -> float:
    try:
        w = float(number)
    except ValueError:
        raise PromptSyntaxError(f"attention weight {number!r} is not a number", text, column) from None
    if not math.isfinite(w):
        raise PromptSyntaxError(f"attention weight {number!r} is too large", text, column)
    return w


def _merge(chunks: list[str], weights: list[float]) -> list[tuple[str, float]]:
    """Join neighbours of equal weight (a BREAK mark included, as A1111 does)."""
    out = [(chunks[0], weights[0])]
    for chunk, w in zip(chunks[1:], weights[1:], strict=True):
        if w == out[-1][1]:
            out[-1] = (out[-1][0] + chunk, w)
        else:
            out.append((chunk, w))
    return out
