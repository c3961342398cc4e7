"""Adding tokens to one CLIP tokenizer / text encoder pair for a while, and taking them out exactly.

The tokenizer: transformers 5 keeps all of a tokenizer's vocabulary in its Rust backend
(`tokenizer.backend_tokenizer`). We put a copy of that backend in place, add the tokens to the copy, and
put the original object back on exit, so nothing of the original is ever modified. That swap writes the
tokenizer's `_tokenizer` attribute, the one transformers' API offers no setter for (diffusers'
`unload_textual_inversion` rewrites the same attribute).

The text encoder: a new (V + k, D) embedding module holds the original rows and the k new vectors; on exit
the original module (same object, same tensor) is set back.

Pooling: CLIP configs from before transformers PR #24773 say eos_token_id = 2, and then the pooled output
is taken at argmax(input_ids), which was the end-of-text token only while it had the highest id. New
tokens have higher ids, so while they exist the encoder pools at the first end-of-text id instead (the
same position for every prompt of the original vocabulary).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer
from torch import Tensor, nn

from sdstudio.errors import ModelError

LEGACY_EOS_ID = 2


@contextmanager
def tokens_added(tokenizer: Any, encoder: nn.Module, rows: Sequence[tuple[list[str], Tensor]]) -> Iterator[None]:
    """Tokens `rows[i][0]` with vectors `rows[i][1]` (n_i, D) exist in the tokenizer/encoder meanwhile."""
    original_backend: Tokenizer = tokenizer.backend_tokenizer
    original_embedding: nn.Embedding = encoder.get_input_embeddings()
    tokens = [t for names, _ in rows for t in names]
    clashes = [t for t in tokens if original_backend.token_to_id(t) is not None]
    if clashes:
        raise ModelError(f"embedding token(s) {clashes} are already words of the tokenizer's vocabulary; "
                         "rename the embedding file")
    tokenizer._tokenizer = Tokenizer.from_str(original_backend.to_str())  # a copy; the original stays untouched
    try:
        # single_word: "mystyle" never matches inside "mystyles"; normalized: matched after lowercasing
        tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=True) for t in tokens])
        ids = tokenizer.convert_tokens_to_ids(tokens)
        vectors = torch.cat([v for _, v in rows])  # (k, D)
        encoder.set_input_embeddings(_extended(original_embedding, ids, vectors))
        with _pool_at_eos(encoder, tokenizer.eos_token_id):
            yield
    finally:
        encoder.set_input_embeddings(original_embedding)
        tokenizer._tokenizer = original_backend


def _extended(embedding: nn.Embedding, ids: list[int], vectors: Tensor) -> nn.Embedding:
    """(V, D) + rows `ids` set to `vectors` (k, D) -> (max(V, max id + 1), D); the original is not modified."""
    weight = embedding.weight
    rows = max(weight.shape[0], max(ids) + 1)
    table = torch.empty((rows, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        table[: weight.shape[0]] = weight
        table[torch.tensor(ids, device=weight.device)] = vectors.to(weight.device, weight.dtype)
    return nn.Embedding.from_pretrained(table, freeze=not weight.requires_grad, padding_idx=embedding.padding_idx)


@contextmanager
def _pool_at_eos(encoder: nn.Module, eos_id: int | None) -> Iterator[None]:
    owner = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection wraps a CLIPTextModel
    legacy = getattr(owner, "eos_token_id", None) == LEGACY_EOS_ID and eos_id is not None
    if legacy:
        owner.eos_token_id = eos_id
    try:
        yield
    finally:
        if legacy:
            owner.eos_token_id = LEGACY_EOS_ID
