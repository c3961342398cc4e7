"""Prompt conditioning for the flow families, as their reference pipelines build it.

SD3 (StableDiffusion3Pipeline.encode_prompt):
    CLIP-L, OpenCLIP-G: 77 tokens padded; hidden state -(clip_skip + 1) (the penultimate at clip_skip 1),
                        pooled = the projected end-of-text feature
    context  (B, 77 + T, D) = cat(pad(cat(h_L, h_G), to D), T5(prompt, T tokens))   D = T5's width (4096)
             without T5: cat(pad(cat(h_L, h_G)), zeros(B, T, D)) (diffusers' choice; ComfyUI pads 77 zeros)
    pooled   (B, P_L + P_G) = cat(pooled_L, pooled_G)
Flux (FluxPipeline.encode_prompt):
    pooled   (B, 768) = CLIP-L's pooler output (77 tokens); context (B, T, 4096) = T5(prompt, T tokens)

A1111 weighting has no agreed meaning on T5 (docs/flow.md): the text reaches every encoder with the
weight syntax removed, and only CLIP-L/G's hidden states are scaled by the weights, as A1111 scales
its CLIP embeddings (each token's vector times its weight, then the mean restored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sdstudio.models.load.flow import FlowModel
from sdstudio.models.load.flow_text import TextEncoder
from sdstudio.models.load.memory import device_of

CLIP_TOKENS = 77
T5_TOKENS = {"sd3": 256, "flux": 512}  # the reference pipelines' max_sequence_length


@dataclass(frozen=True)
class FlowConditioning:
    context: Tensor  # (1, L, D) encoder_hidden_states
    pooled: Tensor   # (1, P) pooled_projections

    def repeat(self, n: int) -> FlowConditioning:
        return FlowConditioning(self.context.expand(n, -1, -1), self.pooled.expand(n, -1))


@dataclass(frozen=True)
class WeightedText:
    """A prompt as the encoders read it: the plain text, and (chunk, weight) pairs for CLIP's weighting."""

    text: str
    chunks: tuple[tuple[str, float], ...] = ()

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for _, w in self.chunks)


def _clip_ids_and_weights(tokenizer, prompt: WeightedText) -> tuple[Tensor, Tensor]:
    """(1, 77) ids padded as the pipelines pad, and (1, 77) per-token weights (1 for start, end and padding)."""
    ids = tokenizer(prompt.text, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    weights = torch.ones(ids.shape, dtype=torch.float32)
    if prompt.weighted:
        position = 1
        for chunk, weight in prompt.chunks:
            n = len(tokenizer(chunk, add_special_tokens=False).input_ids)
            weights[0, position: min(position + n, CLIP_TOKENS - 1)] = weight
            position += n
    return ids, weights


@torch.inference_mode()
def clip_states(te: TextEncoder, prompt: WeightedText, skip: int) -> tuple[Tensor, Tensor]:
    """(1, 77, W) hidden states -(skip + 1) with A1111's weighting, and (1, P) pooled (the model's output 0)."""
    ids, weights = _clip_ids_and_weights(te.tokenizer, prompt)
    out = te.encoder(ids.to(device_of(te.encoder)), output_hidden_states=True)
    hidden = out.hidden_states[-(skip + 1)]
    if prompt.weighted:  # A1111: z * w, then rescaled so the mean over the prompt stays the same
        before = hidden.float().mean()
        hidden = hidden * weights.to(hidden)[..., None]
        hidden = hidden * (before / hidden.float().mean())
    return hidden, out[0]


@torch.inference_mode()
def t5_states(te: TextEncoder, text: str, tokens: int) -> Tensor:
    """(1, tokens, D): T5's last hidden state of the text padded (or cut) to `tokens`."""
    ids = te.tokenizer(text, padding="max_length", max_length=tokens, truncation=True, add_special_tokens=True,
                       return_tensors="pt").input_ids
    return te.encoder(ids.to(device_of(te.encoder)))[0]


def t5_token_count(te: TextEncoder, text: str) -> int:
    """How many T5 tokens the text makes, with its end token."""
    return len(te.tokenizer(text, add_special_tokens=True).input_ids)


@torch.inference_mode()
def encode(model: FlowModel, prompt: WeightedText, clip_skip: int = 1, t5_tokens: int | None = None
           ) -> FlowConditioning:
    """The prompt's conditioning for `model`, on the transformer's device and dtype."""
    tokens = t5_tokens or T5_TOKENS[model.family]
    dtype, device = model.transformer.dtype, device_of(model.transformer)
    if model.family == "flux":  # Flux reads CLIP-L's pooler output (the end token's final state) only
        clip = model.clip[0]
        ids = clip.tokenizer(prompt.text, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
        pooled = clip.encoder(ids.to(device_of(clip.encoder))).pooler_output
        context = t5_states(model.t5, prompt.text, tokens)
        return FlowConditioning(context.to(device, dtype), pooled.to(device, dtype))
    width = int(model.transformer.config.joint_attention_dim)
    states = [clip_states(te, prompt, clip_skip) for te in model.clip]
    clip = torch.cat([h.to(device, dtype) for h, _ in states], dim=-1)        # (1, 77, W_L + W_G)
    clip = F.pad(clip, (0, width - clip.shape[-1]))                           # (1, 77, D)
    if model.t5 is None:
        t5 = torch.zeros((1, tokens, width), device=device, dtype=dtype)
    else:
        t5 = t5_states(model.t5, prompt.text, tokens).to(device, dtype)
    pooled = torch.cat([p.to(device, dtype) for _, p in states], dim=-1)      # (1, P_L + P_G)
    return FlowConditioning(torch.cat([clip, t5], dim=-2), pooled)
