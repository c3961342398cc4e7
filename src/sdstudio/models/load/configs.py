"""The architecture configs shipped with sdstudio: one configs-only diffusers folder per SD family.

`assets/configs/<family>/` holds model_index.json and each component's config (no weights), written by
scripts/build_model_configs.py from the public checkpoints' own configs. Tokenizer folders there hold only
tokenizer_config.json and special_tokens_map.json; the CLIP BPE vocabulary ships once, in
`assets/clip-tokenizer/`, and `load_tokenizer` joins the two.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import CLIPTokenizer

from sdstudio.errors import ModelError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CONFIGS = ASSETS / "configs"
CLIP_TOKENIZER = ASSETS / "clip-tokenizer"
BPE_FILES = ("vocab.json", "merges.txt")  # the slow-tokenizer files; transformers 5 saves tokenizer.json instead

FAMILIES: tuple[str, ...] = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "sdxl-inpaint")


def config_dir(family: str) -> Path:
    """The bundled configs-only diffusers folder of `family` (one of `FAMILIES`)."""
    if family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}; expected one of: {', '.join(FAMILIES)}")
    return CONFIGS / family


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """Load a CLIP tokenizer folder offline.

    A folder with its own vocabulary (tokenizer.json, or vocab.json + merges.txt) loads as is. One without
    (the bundled configs) takes the shared CLIP BPE files from assets/clip-tokenizer and keeps its own
    tokenizer_config.json and special tokens (so SD2's pad token "!", id 0, stays "!"); given no
    vocabulary at all, transformers would quietly build a 3-token one.
    """
    if not folder.is_dir():
        raise ModelError(f"tokenizer folder not found: {folder}")
    if (folder / "tokenizer.json").is_file() or all((folder / name).is_file() for name in BPE_FILES):
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    shared = {"vocab_file": CLIP_TOKENIZER / "vocab.json", "merges_file": CLIP_TOKENIZER / "merges.txt"}
    if not all(path.is_file() for path in shared.values()):
        raise ModelError(f"the shared CLIP vocabulary is missing from {CLIP_TOKENIZER}; reinstall sdstudio")
    log.debug("tokenizer %s: using the shared CLIP BPE files", folder)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, **{k: str(v) for k, v in shared.items()})
