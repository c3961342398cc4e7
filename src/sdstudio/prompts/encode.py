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
from typing import Literal

import torch
from torch import Tensor
from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

EncoderStyle = Literal["sd", "sdxl"]


@dataclass(frozen=True)
class TextEncoders:
    """A model's tokenizer/text-encoder pairs in order (SDXL: CLIP-L then OpenCLIP-G)."""

    tokenizers: tuple[CLIPTokenizer, ...]
    encoders: tuple[torch.nn.Module, ...]  # CLIPTextModel or CLIPTextModelWithProjection
    style: EncoderStyle = "sd"


@dataclass(frozen=True)
class EncodedPrompt:
    embeds: Tensor                # (1, 77, D) cross-attention context
    pooled: Tensor | None = None  # (1, P) SDXL pooled embedding


class PromptEncoder:
    """Encodes prompts, remembering the last `capacity` of them.

    Text longer than the tokenizer's window (75 tokens + start/end) is truncated, as diffusers does,
    with a warning that shows what was cut.
    """

    def __init__(self, text: TextEncoders, clip_skip: int = 1, capacity: int = 64):
        if clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1 (1 = use the last layer), got {clip_skip}")
        self.text, self.clip_skip, self.capacity = text, clip_skip, capacity
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
            ids = self._tokenize(tok, enc, prompt)
            if self.text.style == "sdxl":
                out = enc(ids, output_hidden_states=True)
                states.append(out.hidden_states[-(self.clip_skip + 1)])
                pooled = getattr(out, "text_embeds", pooled)  # only the projecting encoder has one
            else:
                states.append(self._sd_states(tok, enc, ids))
        return EncodedPrompt(torch.cat(states, dim=-1), pooled)

    def _sd_states(self, tok: CLIPTokenizer, enc: torch.nn.Module, ids: Tensor) -> Tensor:
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = (ids != tok.pad_token_id).long().to(ids.device)
        if self.clip_skip == 1:
            return enc(ids, attention_mask=mask).last_hidden_state
        hidden = enc(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-self.clip_skip]
        return getattr(enc, "text_model", enc).final_layer_norm(hidden)

    def _tokenize(self, tok: CLIPTokenizer, enc: torch.nn.Module, prompt: str) -> Tensor:
        window = min(tok.model_max_length, enc.config.max_position_embeddings)  # 77 for CLIP
        ids = tok(prompt, padding="max_length", max_length=window, truncation=True, return_tensors="pt").input_ids
        self._warn_if_truncated(tok, prompt, ids)
        return ids.to(enc.device)

    @staticmethod
    def _warn_if_truncated(tok: CLIPTokenizer, prompt: str, ids: Tensor) -> None:
        full = tok(prompt, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            cut = tok.batch_decode(full[:, ids.shape[-1] - 1: -1])[0]
            log.warning("prompt longer than %d tokens; this part was cut: %r", ids.shape[-1] - 2, cut)
