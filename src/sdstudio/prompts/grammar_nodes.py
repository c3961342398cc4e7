"""The prompt AST: typed, frozen nodes for A1111's prompt syntax, and the error its parser raises.

Every node keeps the exact source text it came from (`Text.raw` keeps escapes), so rendering a tree
at a step reproduces, character for character, the text A1111 hands its text encoder at that step.
Spans are columns in the prompt as the user wrote it (before `<lora:...>` tags were removed); they are
left out of equality and repr, so trees compare by meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from sdstudio.errors import RequestError

ROUND = 1.1          # (x): attention x 1.1
SQUARE = 1 / 1.1     # [x]: attention / 1.1
_CONTEXT = 40        # characters shown either side of the caret in an error


class PromptSyntaxError(RequestError):
    """A prompt A1111 could not run (it would crash), with the 0-based `column` of the culprit.

    The message shows the prompt's line with a caret under the column.
    """

    def __init__(self, reason: str, prompt: str, column: int, field: str | None = "prompt"):
        self.reason, self.prompt = reason, prompt
        self.column = max(0, min(column, len(prompt) - 1)) if prompt else 0
        super().__init__(f"{reason} (column {self.column}):\n{caret_view(prompt, self.column)}", field)


def caret_view(text: str, column: int) -> str:
    """Two lines: the line of `text` holding `column` (cut to +-40 characters) and a caret under it."""
    start = text.rfind("\n", 0, column) + 1
    end = text.find("\n", column)
    line, col = text[start:len(text) if end < 0 else end], column - start
    left = max(0, col - _CONTEXT)
    shown = ("..." if left else "") + line[left:col + _CONTEXT] + ("..." if col + _CONTEXT < len(line) else "")
    offset = col - left + (3 if left else 0)
    return "  " + shown.replace("\t", " ") + "\n  " + " " * offset + "^"


def _span() -> tuple[int, int]:
    return field(default=(0, 0), compare=False, repr=False)


@dataclass(frozen=True)
class Text:
    """Literal text as written. `raw` keeps escapes (`\\(`), because the attention pass reads them.

    stray: an unbalanced `(` `)` `[` `]` or a `:` outside any group, kept as text by the scheduling
    grammar; the attention pass still reads it (an unclosed `(` weights the rest of the prompt).
    """

    raw: str
    stray: bool = False
    span: tuple[int, int] = _span()

    @property
    def text(self) -> str:
        """What the attention pass makes of `raw`: `\\x` -> `x` (a backslash before any other
        character is dropped, the character stays). Stray brackets are shown as written."""
        return re.sub(r"\\(.?)", r"\1", self.raw, flags=re.S)


@dataclass(frozen=True)
class Break:
    """`BREAK`: ends the current 75-token window (A1111); the attention pass emits ("BREAK", -1.0)."""

    span: tuple[int, int] = _span()


@dataclass(frozen=True)
class Weighted:
    """An emphasis group: `(x)` x1.1, `[x]` /1.1, `(x:w)` xw; nested groups multiply.

    weight: the group's own multiplier as written. `(x:w)` with w not a number (`(x:cat)`) is A1111's
    `x:cat` at 1.1; a w that is scheduled (`(x:[1.2|0.8])`) has weight None: it is known per step only
    (None also for a malformed number like `1.2.3`, which `parse`/`schedule` report).
    The weights `attention` computes are A1111's; they equal the product of the enclosing groups'
    weights unless stray brackets or an escaped colon (`(x\\:2)` is x2 in A1111) are involved.
    weight_nodes: for `(x:w)`, the nodes after the colon (rendered back verbatim); None without colon.
    """

    children: tuple[Node, ...]
    weight: float | None
    bracket: Literal["(", "["] = "("
    weight_nodes: tuple[Node, ...] | None = None
    span: tuple[int, int] = _span()


@dataclass(frozen=True)
class Edit:
    """Prompt editing `[before:after:when]`: `before` until step `when`, then `after`.

    `[after:when]` adds after `when`; `[before::when]` removes after `when` (before/after may be empty).
    fraction: `when` was written with a decimal point, so it is a fraction of the steps (A1111 >= 1.6;
    see `edit_end_step`). when_column: where the number is, for error messages.
    """

    before: tuple[Node, ...]
    after: tuple[Node, ...]
    when: float
    fraction: bool
    has_before: bool = True
    when_column: int = field(default=0, compare=False, repr=False)
    span: tuple[int, int] = _span()


@dataclass(frozen=True)
class Alternate:
    """Alternation `[a|b|c]`: option (step - 1) % n at A1111 schedule step `step` (1-based)."""

    options: tuple[tuple[Node, ...], ...]
    span: tuple[int, int] = _span()


Node = Text | Break | Weighted | Edit | Alternate


@dataclass(frozen=True)
class ExtraNetwork:
    """`<kind:item:item...>`, e.g. `<lora:name:0.7>` (kind "lora"; "lyco" is A1111's alias for it,
    "hypernet" is a hypernetwork). A1111 removes every such tag before any other parsing, so it applies
    to the whole prompt at every step, wherever it was written (inside `[a|b]` included).

    items: the colon-separated items after the kind, as A1111 splits them.
    """

    kind: str
    items: tuple[str, ...]
    column: int = field(default=0, compare=False)

    @property
    def positional(self) -> tuple[str, ...]:
        """Items that are not `key=value` (A1111: an item splitting on `=` into exactly two parts is named)."""
        return tuple(item for item in self.items if len(item.split("=", 2)) != 2)

    @property
    def named(self) -> dict[str, str]:
        return dict(item.split("=", 2) for item in self.items if len(item.split("=", 2)) == 2)

    @property
    def name(self) -> str:
        return self.positional[0] if self.positional else ""

    @property
    def args(self) -> tuple[str, ...]:
        """Positional items after the name (for LoRA: text-encoder and UNet multipliers)."""
        return self.positional[1:]

    def multipliers(self, prompt: str = "") -> tuple[float, float]:
        """LoRA/LyCORIS (te, unet) multipliers as A1111's Lora extension reads them.

        te = 2nd positional item or `te=`, default 1; unet = 3rd positional item or `unet=`, default te.
        Raises PromptSyntaxError (column of the tag in `prompt`) when one is not a number.
        """
        pos, named = self.positional, self.named
        try:
            te = float(named.get("te", pos[1] if len(pos) > 1 else 1.0))
            unet = float(named.get("unet", pos[2] if len(pos) > 2 else te))
        except ValueError:
            raise PromptSyntaxError(f"<{self.kind}:...> multiplier is not a number: {':'.join(self.items)!r}",
                                    prompt, self.column) from None
        return te, unet
