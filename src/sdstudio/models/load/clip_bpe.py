"""OpenAI's CLIP byte-level BPE vocabulary, rebuilt from its merges file (no download at run time).

CLIP's vocabulary is: the 256 byte symbols, the same with "</w>" (end of word), one token per merge
(the pair joined) for the first 49152 - 256 - 2 merges, then <|startoftext|> and <|endoftext|>:
49,408 tokens, the ids of `openai/clip-vit-large-patch14` (SD1.x's tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 49408
START, END = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def clip_vocab(merges: list[tuple[str, str]]) -> list[str]:
    symbols = list(bytes_to_unicode().values())
    return [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START, END]


def read_openai_merges(text: str) -> list[tuple[str, str]]:
    """The merges CLIP uses from OpenAI's bpe_simple_vocab_16e6.txt: lines 1 .. 49152-256-2."""
    lines = text.split("\n")[1: 49152 - 256 - 2 + 1]
    return [tuple(line.split()) for line in lines]  # type: ignore[misc]


def write_tokenizer_files(folder: Path, merges: list[tuple[str, str]]) -> Path:
    """vocab.json, merges.txt and configs in the layout `CLIPTokenizer.from_pretrained` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
