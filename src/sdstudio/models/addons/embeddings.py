"""Textual-inversion embeddings: read A1111 / diffusers / SDXL files, add their tokens for one job.

An embedding of n vectors becomes n new tokens, `name name_1 ... name_{n-1}`, whose rows of the text
encoder's token-embedding matrix (V, D) are the vectors (Gal et al. 2022, "An Image is Worth One Word").
`expand_prompt` writes those n tokens where the prompt says `name`.

Names are the file stem lowercased: CLIP's tokenizer lowercases prompts, so `EasyNegative.pt` is used as
"easynegative" (any case in the prompt works). A name is used where it stands as a word, i.e. not next
to a letter, digit or underscore (A1111 matches token sequences instead, which is nearly the same).

Vectors are kept per text-encoder slot, in the model's encoder order: SD1.x/SD2.x files have one (n, D)
tensor, SDXL files two: `clip_l` (n, 768) for te1 and `clip_g` (n, 1280) for te2.

Hashes follow AUTOMATIC1111 (modules/textual_inversion/textual_inversion.py): the sha256 of the whole
file; "TI hashes" in the infotext show its first 12 hex digits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdstudio.errors import ModelError
from sdstudio.models.addons.embedding_tokens import tokens_added
from sdstudio.models.find.hashing import HashCache, sha256_file
from sdstudio.models.load.checkpoint_io import read_pickle, read_state_dict

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
_FAMILY_BY_WIDTHS = {(768,): "SD1.x", (1024,): "SD2.x", (768, 1280): "SDXL", (1280,): "the SDXL refiner"}


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding, read once and reusable across models of its family."""

    name: str                     # the word in prompts: the file stem, lowercased
    stem: str                     # the file stem as written (the name A1111 shows in "TI hashes")
    path: Path | None
    sha256: str                   # of the whole file ("" for embeddings built in memory)
    vectors: tuple[Tensor, ...]   # per text-encoder slot: (n, D_i), float32 on the CPU

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(v.shape[1]) for v in self.vectors)

    @property
    def tokens(self) -> list[str]:
        """`name`, `name_1`, ..., one token per vector."""
        return [self.name] + [f"{self.name}_{i}" for i in range(1, self.num_vectors)]


def read_embedding(path: Path, hash_cache: HashCache | None = None) -> Embedding:
    """Read an A1111 `.pt`/`.safetensors`, a diffusers `learned_embeds`, or an SDXL embedding file.

    Pickles go through torch's weights-only loader, so a file that asks to run code is refused unrun.
    """
    path = Path(path)
    if path.suffix not in EMBEDDING_SUFFIXES:
        raise ModelError(f"{path.name}: an embedding must be one of {', '.join(EMBEDDING_SUFFIXES)}, "
                         f"got {path.suffix!r}")
    data = read_state_dict(path) if path.suffix == ".safetensors" else read_pickle(path)
    digest = hash_cache.file_sha256(path) if hash_cache else sha256_file(path)
    return embedding_from_data(path.stem, data, path=path, sha256=digest)


def embedding_from_data(stem: str, data: object, *, path: Path | None = None, sha256: str = "") -> Embedding:
    """An Embedding from a loaded file's contents (see `read_embedding` for the layouts)."""
    where = path.name if path else stem
    if not isinstance(data, Mapping):
        raise ModelError(f"{where} holds a {type(data).__name__}, not a textual-inversion embedding")
    vectors = tuple(_as_matrix(v, where) for v in _vectors(data, where))
    if len({int(v.shape[0]) for v in vectors}) != 1:
        raise ModelError(f"{where}: its encoders have different vector counts {[int(v.shape[0]) for v in vectors]}")
    return Embedding(stem.lower(), stem, path, sha256, vectors)


def _vectors(data: Mapping, where: str) -> list[object]:
    if "string_to_param" in data:                    # A1111 .pt: {"string_to_param": {"*": (n, D)}, ...}
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise ModelError(f"{where}: string_to_param must hold exactly one tensor")
        return list(params.values())
    if "clip_l" in data and "clip_g" in data:        # SDXL: te1 (n, 768), te2 (n, 1280)
        return [data["clip_l"], data["clip_g"]]
    if "emb_params" in data:                         # A1111 .safetensors
        return [data["emb_params"]]
    tensors = [v for v in data.values() if isinstance(v, Tensor)]
    if len(tensors) == 1 and len(data) == 1:         # diffusers: {"<token>": (D,) or (n, D)}
        return tensors
    raise ModelError(f"{where} is not a textual-inversion embedding (keys: {', '.join(map(str, list(data)[:8]))})")


def _as_matrix(value: object, where: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() not in (1, 2) or value.numel() == 0:
        raise ModelError(f"{where}: expected embedding vectors shaped (n, D), got {getattr(value, 'shape', value)}")
    return (value[None] if value.dim() == 1 else value).detach().to("cpu", torch.float32).contiguous()


def name_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """Any of `names` as a whole word, longest first, any case."""
    ordered = sorted(set(names), key=len, reverse=True)
    if not ordered:
        return None
    return re.compile(r"(?<!\w)(" + "|".join(map(re.escape, ordered)) + r")(?!\w)", re.IGNORECASE)


def used_embeddings(text: str, available: Iterable[Embedding]) -> list[Embedding]:
    """The embeddings whose names appear in `text` as words, in order of first use."""
    by_name = {e.name: e for e in available}
    pattern = name_pattern(by_name)
    if pattern is None:
        return []
    seen = dict.fromkeys(m.group(1).lower() for m in pattern.finditer(text))
    return [by_name[n] for n in seen]


def expand_prompt(text: str, embeddings: Iterable[Embedding]) -> str:
    """Write each embedding's n tokens where `text` uses its name: "a mystyle cat" -> "a mystyle mystyle_1 cat"."""
    by_name = {e.name: e for e in embeddings}
    pattern = name_pattern(by_name)
    if pattern is None:
        return text
    return pattern.sub(lambda m: " ".join(by_name[m.group(1).lower()].tokens), text)


@contextmanager
def embeddings_applied(tokenizers: Sequence[object | None], text_encoders: Sequence[torch.nn.Module | None],
                       embeddings: Sequence[Embedding]) -> Iterator[None]:
    """Add the embeddings' tokens and vectors for the `with` block, then remove them exactly.

    `tokenizers[i]` / `text_encoders[i]` is slot i (SDXL: 0 = CLIP-L, 1 = OpenCLIP-G; the refiner passes
    None for slot 0). On exit every tokenizer and embedding matrix is the original object again, so
    prompts without the embeddings encode bit-exactly as before. Use `expand_prompt` on the prompts.
    """
    if len(tokenizers) != len(text_encoders):
        raise ValueError(f"{len(tokenizers)} tokenizers for {len(text_encoders)} text encoders")
    _check(text_encoders, embeddings)
    with ExitStack() as stack:
        for slot, (tokenizer, encoder) in enumerate(zip(tokenizers, text_encoders, strict=True)):
            if tokenizer is None or encoder is None or not embeddings:
                continue
            rows = [(e.tokens, e.vectors[slot]) for e in embeddings]
            stack.enter_context(tokens_added(tokenizer, encoder, rows))
        yield


def _widths(text_encoders: Sequence[torch.nn.Module | None]) -> tuple[int | None, ...]:
    return tuple(None if te is None else int(te.get_input_embeddings().embedding_dim) for te in text_encoders)


def embedding_fits(e: Embedding, text_encoders: Sequence[torch.nn.Module | None]) -> bool:
    """One (n, D) per encoder slot with D that encoder's width (an empty slot, the refiner's te1, takes any)."""
    widths = _widths(text_encoders)
    return len(e.widths) == len(widths) and all(w is None or w == d for w, d in zip(widths, e.widths, strict=True))


def _check(text_encoders: Sequence[torch.nn.Module | None], embeddings: Sequence[Embedding]) -> None:
    """Each embedding must have one (n, D) per encoder slot, D = that encoder's width; names unique."""
    names = [e.name for e in embeddings]
    if len(set(names)) != len(names):
        raise ModelError(f"two embeddings share a name: {sorted(n for n in set(names) if names.count(n) > 1)}")
    widths = _widths(text_encoders)
    known = tuple(w for w in widths if w is not None)
    for e in embeddings:
        if not embedding_fits(e, text_encoders):
            raise ModelError(
                f"embedding {e.stem!r} has vectors of width {' + '.join(map(str, e.widths))} "
                f"({_FAMILY_BY_WIDTHS.get(e.widths, 'unknown family')}), but this model's text encoders take "
                f"{' + '.join(map(str, known))} ({_FAMILY_BY_WIDTHS.get(known, 'unknown family')})")
