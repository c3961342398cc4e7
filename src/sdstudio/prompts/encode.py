"""Plain CLIP prompt encoding (diffusers' `encode_prompt` semantics), with a per-model cache."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)


class PromptEncoder:
    """Encodes prompts to CLIP last hidden states (1, 77, D), remembering the last `capacity` ones.

    Text longer than the tokenizer's window (75 tokens + start/end) is truncated, as diffusers does,
    with a warning that shows what was cut.
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, capacity: int = 64):
        self.tokenizer, self.text_encoder, self.capacity = tokenizer, text_encoder, capacity
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def __call__(self, text: str) -> Tensor:
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        embeds = self._encode(text)
        self._cache[text] = embeds
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return embeds

    @torch.inference_mode()
    def _encode(self, text: str) -> Tensor:
        tok, enc = self.tokenizer, self.text_encoder
        window = min(tok.model_max_length, enc.config.max_position_embeddings)  # 77 for CLIP
        ids = tok(text, padding="max_length", max_length=window, truncation=True, return_tensors="pt").input_ids
        self._warn_if_truncated(text, ids)
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = (ids != tok.pad_token_id).long().to(enc.device)
        return enc(ids.to(enc.device), attention_mask=mask)[0]  # (1, 77, D)

    def _warn_if_truncated(self, text: str, ids: Tensor) -> None:
        full = self.tokenizer(text, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            cut = self.tokenizer.batch_decode(full[:, ids.shape[-1] - 1: -1])[0]
            log.warning("prompt longer than %d tokens; this part was cut: %r", ids.shape[-1] - 2, cut)
