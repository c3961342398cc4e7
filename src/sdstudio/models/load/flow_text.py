"""The text side of the flow families' loading: a tokenizer/encoder pair, and T5-v1.1's shipped vocabulary."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from sdstudio.errors import ModelError
from sdstudio.models.load.configs import ASSETS

T5_TOKENIZER = ASSETS / "t5-tokenizer" / "tokenizer.json.gz"


@dataclass(frozen=True)
class TextEncoder:
    tokenizer: Any             # CLIPTokenizer or T5TokenizerFast
    encoder: torch.nn.Module   # CLIPTextModel(WithProjection) or T5EncoderModel


@cache
def _t5_json() -> str:
    if not T5_TOKENIZER.is_file():
        raise ModelError(f"the shipped T5 vocabulary is missing ({T5_TOKENIZER.name}); reinstall sdstudio")
    return gzip.decompress(T5_TOKENIZER.read_bytes()).decode("utf-8")


def t5_tokenizer(folder: Path | None = None) -> Any:
    """The folder's own T5 tokenizer when it has tokenizer.json, else T5-v1.1's shipped vocabulary."""
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast

    if folder is not None and (folder / "tokenizer.json").is_file():
        return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    return T5TokenizerFast(tokenizer_object=Tokenizer.from_str(_t5_json()), eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=512)
