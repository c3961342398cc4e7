"""LoRA and textual-inversion add-ons of one request, found, read and applied for its duration.

`<lora:name:weight>` in the prompt (A1111's extra-network syntax, weight 1 when left out) selects a LoRA
file from the LoRA folders; it is removed from the text the encoder sees. An embedding is used by writing
its name (the file stem) in the prompt or negative prompt. Both are undone when the job ends.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdstudio.a1111.extras import addon_params
from sdstudio.errors import RequestError
from sdstudio.models.addons.embeddings import (
    EMBEDDING_SUFFIXES,
    Embedding,
    embedding_fits,
    embeddings_applied,
    expand_prompt,
    name_pattern,
    read_embedding,
)
from sdstudio.models.addons.lora import LoraFile, LoraReport, loras_applied, read_lora
from sdstudio.models.find.catalog import ModelRef, unknown_message
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.load.loader import LoadedModel
from sdstudio.prompts.build import PromptPlan
from sdstudio.prompts.grammar_parse import split_networks

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class AddOns:
    prompt: str            # what the text encoder sees: LoRA tags removed, embeddings expanded
    negative_prompt: str
    loras: tuple[tuple[LoraFile, float], ...] = ()
    embeddings: tuple[Embedding, ...] = ()
    reports: list[LoraReport] = field(default_factory=list, compare=False)

    @property
    def changes_text_encoders(self) -> bool:
        return bool(self.embeddings or self.loras)

    def expand(self, plan: PromptPlan) -> PromptPlan:
        """The parsed prompts with each embedding's name written out as its tokens, as the encoder needs them."""
        return plan.map_texts(lambda text: expand_prompt(text, self.embeddings)) if self.embeddings else plan

    def infotext(self) -> dict[str, Any]:
        return addon_params(((f.name, f.short_hash) for f, w in self.loras if w),
                            ((e.stem, e.short_hash) for e in self.embeddings if e.sha256))

    def record(self) -> dict[str, Any] | None:
        """LoRAs (with what each matched) and embeddings, for the machine-readable record."""
        if not (self.loras or self.embeddings):
            return None
        files = {f.name: f for r in self.reports for f in r.files}
        loras = []
        for f, weight in self.loras:
            report = files.get(f.name)
            loras.append({"name": f.name, "hash": f.short_hash, "weight": weight,
                          "matched_keys": report.matched_keys if report else 0,
                          "dropped": report.dropped_reasons() if report else {}})
        return {"loras": loras, "embeddings": [{"name": e.name, "hash": e.short_hash} for e in self.embeddings]}

    @contextmanager
    def applied(self, model: LoadedModel) -> Iterator[None]:
        tokenizers, encoders = slots(model)
        with ExitStack() as stack:
            if self.embeddings:
                stack.enter_context(embeddings_applied(tokenizers, encoders, list(self.embeddings)))
            if self.loras:
                self.reports.append(stack.enter_context(loras_applied(model.unet, encoders, list(self.loras))))
            yield


def slots(model: LoadedModel) -> tuple[list[Any], list[Any]]:
    """Tokenizers and encoders by slot: te1 (CLIP-L / OpenCLIP-H), te2 (OpenCLIP-G); the refiner has only te2."""
    tokenizers, encoders = list(model.text.tokenizers), list(model.text.encoders)
    if model.family == "sdxl-refiner":
        return [None, *tokenizers], [None, *encoders]
    return tokenizers, encoders


def split_lora_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """("a cat <lora:ink:0.6>", ...) -> ("a cat ", [("ink", 0.6)]). Every `<kind:...>` tag is removed, as
    A1111 does; LoRA (and its alias lyco) tags are kept, others are ignored with a warning."""
    stripped = split_networks(text)
    loras = []
    for tag in stripped.networks:
        if tag.kind.lower() not in ("lora", "lyco"):
            log.warning("ignoring <%s:...>: only LoRA extra networks are supported", tag.kind)
            continue
        te, unet = tag.multipliers(text)
        if te != unet:
            log.warning("<lora:%s>: separate text-encoder and UNet weights are not supported; using %g for both",
                        tag.name, unet)
        loras.append((tag.name, unet))
    return stripped.text, loras


class AddOnLibrary:
    """Finds LoRA and embedding files by name and keeps the last few read."""

    def __init__(self, lora_dirs: Sequence[Path], embedding_dirs: Sequence[Path], hashes: HashCache,
                 capacity: int = 8):
        self.lora_dirs, self.embedding_dirs, self.hashes, self.capacity = lora_dirs, embedding_dirs, hashes, capacity
        self._cache: OrderedDict[tuple[Path, int], Any] = OrderedDict()

    def find_loras(self, prompt: str) -> tuple[str, list[tuple[Path, float]]]:
        """The prompt without tags, and the LoRA files it names (checked before any model is loaded)."""
        prompt, tags = split_lora_tags(prompt)  # A1111 reads tags in the positive prompt only
        return prompt, [(self.find_lora(name), weight) for name, weight in tags]

    def resolve(self, prompt: str, negative_prompt: str, model: LoadedModel) -> AddOns:
        """LoRAs named in the prompt and embeddings named in either prompt that fit this model's encoders
        (an embedding for another family is skipped with a warning, as A1111 does)."""
        prompt, found = self.find_loras(prompt)
        loras = tuple((self._read(path, read_lora), weight) for path, weight in found)
        files = self.embedding_files()
        pattern = name_pattern(files)
        names = [] if pattern is None else dict.fromkeys(m.group(1).lower() for m in
                                                         pattern.finditer(f"{prompt}\n{negative_prompt}"))
        used = [files[n] for n in names]
        embeddings = []
        for path in used:
            embedding = self._read(path, lambda q: read_embedding(q, self.hashes))
            if embedding_fits(embedding, slots(model)[1]):
                embeddings.append(embedding)
            else:
                log.warning("embedding %s is for another model family (widths %s); not used", path.name,
                            embedding.widths)
        if (loras or embeddings) and model.offload == "sequential":
            raise RequestError("LoRAs and embeddings change weights, which sequential offload streams from the CPU; "
                               "use --offload model or none with them", "prompt")
        return AddOns(expand_prompt(prompt, embeddings), expand_prompt(negative_prompt, embeddings), loras,
                      tuple(embeddings))

    def lora_files(self) -> list[Path]:
        """Every LoRA file in the LoRA folders and their subfolders; `<lora:stem>` selects one."""
        return [p for d in self.lora_dirs if d.is_dir() for p in sorted(d.rglob("*")) if p.suffix in LORA_SUFFIXES]

    def find_lora(self, name: str) -> Path:
        files = self.lora_files()
        for p in files:
            if name.lower() in (p.stem.lower(), p.name.lower()):
                return p
        message = unknown_message(name, [ModelRef(p.stem, p) for p in files]).replace("unknown model", "unknown LoRA")
        raise RequestError(f"{message} (LoRA folders: {', '.join(str(d) for d in self.lora_dirs)})", "prompt")

    def embedding_files(self) -> dict[str, Path]:
        """Lowercased name -> file, first folder wins."""
        found: dict[str, Path] = {}
        for d in self.embedding_dirs:
            if d.is_dir():
                for p in sorted(d.rglob("*")):
                    if p.suffix in EMBEDDING_SUFFIXES:
                        found.setdefault(p.stem.lower(), p)
        return found

    def cached(self, path: Path, reader: Any) -> Any:
        """reader(path), kept among the last few files read (another family's LoRA reader, e.g.)."""
        return self._read(path, reader)

    def _read(self, path: Path, reader: Any) -> Any:
        key = (path.resolve(), path.stat().st_mtime_ns)  # a file changed on disk is read again
        if key not in self._cache:
            self._cache[key] = reader(path)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]
