"""CLIP prompt encoding with diffusers' `encode_prompt` semantics, for SD1/SD2 and SDXL, cached.

SD1.x/SD2.x ("sd" style): the last hidden state after the final layer norm, (1, 77, D). Clip skip n
(A1111's "Clip skip", 1 = no skip) takes hidden_states[-n] and applies the final layer norm, as A1111
and diffusers do.

SDXL ("sdxl" style): each encoder's hidden_states[-(n + 1)] (the penultimate layer at n = 1, no final
layer norm), concatenated along the feature axis: CLIP-L 768 + OpenCLIP-G 1280 = (1, 77, 2048); the
refiner has only G, (1, 77, 1280). The pooled embedding (1, 1280) is G's projected end-of-text state.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import CLIPTokenizer

from sdstudio.models.load.memory import device_of
from sdstudio.models.load.text_encoders import TextEncoders
from sdstudio.prompts.chunks import Chunk, TokenIds, chunk_tokens
from sdstudio.prompts.grammar import BREAK_MARK, attention

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EncodedPrompt:
    embeds: Tensor                # (1, 77, D) cross-attention context
    pooled: Tensor | None = None  # (1, P) SDXL pooled embedding


class PromptEncoder:
    """Encodes one flat prompt (no scheduling syntax left), remembering the last `capacity` of them.

    syntax "a1111": attention weights, BREAK and A1111's 75-token windows (prompts of any length); the
    windows' encodings are concatenated, (1, 77k, D). Weighting as A1111's "Original" emphasis: scale
    each token's embedding by its weight, then rescale the window so its mean is what it was.
    syntax "plain": the text as it is, cut at 75 tokens with a warning (diffusers' behaviour).
    """

    def __init__(self, text: TextEncoders, clip_skip: int = 1, syntax: str = "a1111", capacity: int = 64):
        if clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1 (1 = use the last layer), got {clip_skip}")
        self.text, self.clip_skip, self.syntax, self.capacity = text, clip_skip, syntax, capacity
        self._cache: OrderedDict[str, EncodedPrompt] = OrderedDict()

    def __call__(self, prompt: str) -> EncodedPrompt:
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        encoded = self._encode(prompt)
        self._cache[prompt] = encoded
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return encoded

    @torch.inference_mode()
    def _encode(self, prompt: str) -> EncodedPrompt:
        states, pooled = [], None
        for tok, enc in zip(self.text.tokenizers, self.text.encoders, strict=True):
            windows = []
            for k, chunk in enumerate(prompt_chunks(prompt, tok, self.syntax)):
                ids = torch.tensor([chunk.tokens], device=device_of(enc))
                hidden, chunk_pooled = self._hidden(tok, enc, ids)
                windows.append(emphasis(hidden, chunk.weights))
                pooled = chunk_pooled if k == 0 and chunk_pooled is not None else pooled
            states.append(torch.cat(windows, dim=1))
        return EncodedPrompt(torch.cat(states, dim=-1), pooled)

    def _hidden(self, tok: CLIPTokenizer, enc: torch.nn.Module, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """(1, 77, D) hidden states per the style and clip skip, and the pooled embedding if any."""
        if self.text.style == "sdxl":
            out = enc(ids, output_hidden_states=True)
            return out.hidden_states[-(self.clip_skip + 1)], getattr(out, "text_embeds", None)
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = (ids != tok.pad_token_id).long()
        if self.clip_skip == 1:
            return enc(ids, attention_mask=mask).last_hidden_state, None
        hidden = enc(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-self.clip_skip]
        return getattr(enc, "text_model", enc).final_layer_norm(hidden), None



def emphasis(hidden: Tensor, weights: list[float]) -> Tensor:
    """A1111's "Original" emphasis: z' = z * w (per token), then z' * mean(z) / mean(z'). All 1: z."""
    if all(w == 1.0 for w in weights):
        return hidden
    w = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device)[None, :, None]  # (1, 77, 1)
    original = hidden.mean()
    weighted = hidden * w
    return weighted * (original / weighted.mean())


def prompt_chunks(prompt: str, tok: CLIPTokenizer, syntax: str = "a1111") -> list[Chunk]:
    """The 77-token windows (ids and weights) one tokenizer makes of a flat prompt."""
    if syntax == "plain":
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        full = tok(prompt).input_ids
        if len(full) > 77:
            log.warning("prompt longer than 75 tokens; this part was cut: %r", tok.decode(full[76:-1]))
        return [Chunk(list(ids), [1.0] * len(ids))]
    pieces = attention(prompt)
    texts = [t for t, _ in pieces]
    tokenized = tok(texts, add_special_tokens=False, verbose=False).input_ids if texts else []
    marked = [([] if (t, w) == BREAK_MARK else ids, w) for ids, (t, w) in zip(tokenized, pieces, strict=True)]
    comma = tok.convert_tokens_to_ids(",</w>")
    ids = TokenIds(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, comma if comma != tok.unk_token_id else None)
    return chunk_tokens(marked, ids)


def tokens_per_window(prompt: str, tok: CLIPTokenizer) -> list[int]:
    """Tokens each 75-token window of a flat A1111 prompt holds (what A1111's counter shows as 12/75)."""
    return [sum(1 for t in w.tokens[1:-1] if t != tok.pad_token_id) for w in prompt_chunks(prompt, tok)]
