"""Rebuild the shipped T5 tokenizer (src/sdstudio/assets/t5-tokenizer/tokenizer.json.gz) from a PyPI wheel.

SD3 and Flux read prompts with T5-v1.1's SentencePiece vocabulary (32,000 pieces + 100 <extra_id_N>). The
`diffsynth` 1.1.x wheels on PyPI carry it for Flux (diffsynth/tokenizer_configs/flux/tokenizer_2/):
`spiece.model` and the same vocabulary as a `tokenizers` file, tokenizer.json. This downloads the wheel
without dependencies (or takes a local one), checks that spiece.model is the published T5 file (its sha256)
and that tokenizer.json lists exactly its pieces and scores, and writes tokenizer.json gzipped.
Run: python scripts/build_t5_tokenizer.py [path/to/diffsynth-1.1.7-py3-none-any.whl]
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "sdstudio" / "assets" / "t5-tokenizer" / "tokenizer.json.gz"
FOLDER = "diffsynth/tokenizer_configs/flux/tokenizer_2/"
# google/t5-v1_1-xxl's spiece.model (the file every T5-v1.1 checkpoint and SD3/Flux repository ships)
SPIECE_SHA256 = "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86"


def fetch_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "diffsynth==1.1.7", "-d",
                    str(folder)], check=True)
    return next(folder.glob("diffsynth-*.whl"))


def check_pieces(spiece: bytes, tokenizer: dict) -> None:
    """tokenizer.json's unigram vocabulary starts with spiece.model's pieces and scores, in order."""
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    from transformers.utils import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(spiece)
    vocab = tokenizer["model"]["vocab"]
    assert len(vocab) == len(model.pieces) + 100, (len(vocab), len(model.pieces))
    for piece, (text, score) in zip(model.pieces, vocab, strict=False):
        assert piece.piece == text and abs(piece.score - score) < 1e-6, (piece.piece, text)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(sys.argv[1]) if len(sys.argv) > 1 else fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            spiece, text = z.read(FOLDER + "spiece.model"), z.read(FOLDER + "tokenizer.json")
    if hashlib.sha256(spiece).hexdigest() != SPIECE_SHA256:
        raise SystemExit("spiece.model in the wheel is not T5-v1.1's: refusing to ship it")
    check_pieces(spiece, json.loads(text))
    OUT.write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) from {wheel.name}")


if __name__ == "__main__":
    main()
