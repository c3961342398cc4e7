"""A1111's long-prompt chunking: weighted text -> 77-token windows of ids and per-token weights.

Each window is [start] + 75 tokens + [end], short windows padded as the tokenizer pads (end, then the
pad id). A window is closed when it holds 75 tokens or at BREAK. When a window fills up in the middle of
a phrase and a comma came within the last 20 tokens, the window ends after that comma and the rest of
the phrase moves to the next window (A1111's `comma_padding_backtrack`, default 20), so phrases are not
cut in half. Start, end and padding tokens have weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CHUNK_TOKENS = 75       # text tokens per window; + start and end = CLIP's 77 positions
COMMA_BACKTRACK = 20    # how far back a comma may be to move the phrase after it to the next window


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TokenIds:
    start: int
    end: int
    pad: int
    comma: int | None


def chunk_tokens(pieces: list[tuple[list[int], float]], ids: TokenIds) -> list[Chunk]:
    """pieces: (token ids without start/end, weight) per parsed span; ([], -1) marks a BREAK."""
    chunks: list[Chunk] = []
    chunk, last_comma = Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(_framed(chunk, ids))
        chunk, last_comma = Chunk(), -1

    for tokens, weight in pieces:
        if weight == -1.0 and tokens == []:
            close()
            continue
        for token in tokens:
            if token == ids.comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1 and \
                    len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK_TOKENS:
                close()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close()
    return chunks


def _framed(chunk: Chunk, ids: TokenIds) -> Chunk:
    """[start] + tokens + [end] + [pad] * rest: 77 ids and 77 weights."""
    rest = CHUNK_TOKENS - len(chunk.tokens)
    tokens = [ids.start, *chunk.tokens, ids.end] + [ids.pad] * rest
    return Chunk(tokens, [1.0, *chunk.weights, 1.0] + [1.0] * rest)
