"""Compel's prompt syntax (`word++`, `(word)1.2`, `("a", "b").and()`, `.blend()`) through the compel library.

compel parses and weights; we only choose the embedding it returns so that it matches our encoders:
SD1/SD2 the final-layer-norm last hidden state, SDXL the penultimate layer without the norm plus
OpenCLIP-G's pooled embedding. Long prompts are split into 77-token windows, not cut.
"""

from __future__ import annotations

from sdstudio.errors import RequestError
from sdstudio.models.load.text_encoders import TextEncoders
from sdstudio.prompts.encode import EncodedPrompt


class CompelEncoder:
    def __init__(self, text: TextEncoders, clip_skip: int = 1):
        from compel import Compel, ReturnedEmbeddingsType

        if text.style == "sdxl":
            if clip_skip != 1:
                raise RequestError("clip_skip is not available with the compel prompt syntax on SDXL", "clip_skip")
            kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            pooled = [type(e).__name__ == "CLIPTextModelWithProjection" for e in text.encoders]
        else:
            if clip_skip != 1:
                raise RequestError("clip_skip is not available with the compel prompt syntax", "clip_skip")
            kind, pooled = ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED, [False] * len(text.encoders)
        single = len(text.encoders) == 1
        self.wants_pooled = any(pooled)
        self.compel = Compel(tokenizer=text.tokenizers[0] if single else list(text.tokenizers),
                             text_encoder=text.encoders[0] if single else list(text.encoders),
                             returned_embeddings_type=kind, requires_pooled=pooled[0] if single else pooled,
                             truncate_long_prompts=False)

    def __call__(self, prompt: str) -> EncodedPrompt:
        from pyparsing import ParseBaseException

        try:
            out = self.compel(prompt)
        except (ParseBaseException, ValueError) as e:  # compel's errors for bad syntax
            raise RequestError(f"compel could not parse the prompt {prompt!r}: {e}", "prompt") from None
        if self.wants_pooled:
            embeds, pooled = out
            return EncodedPrompt(embeds, pooled)
        return EncodedPrompt(out)
