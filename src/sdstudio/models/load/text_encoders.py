"""A model's tokenizers and text encoders, and how their hidden states are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import CLIPTokenizer

EncoderStyle = Literal["sd", "sdxl"]


@dataclass(frozen=True)
class TextEncoders:
    """A model's tokenizer/text-encoder pairs in order (SDXL: CLIP-L then OpenCLIP-G)."""

    tokenizers: tuple[CLIPTokenizer, ...]
    encoders: tuple[torch.nn.Module, ...]  # CLIPTextModel or CLIPTextModelWithProjection
    style: EncoderStyle = "sd"
