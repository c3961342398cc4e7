"""Rebuild the shipped CLIP tokenizer (src/sdstudio/assets/clip-tokenizer) from the open_clip_torch wheel.

OpenAI's BPE merges ship inside the `open_clip_torch` wheel on PyPI (open_clip/bpe_simple_vocab_16e6.txt.gz).
This downloads the wheel without dependencies (or takes a local one), reads the merges and writes
vocab.json/merges.txt. Run: python scripts/build_clip_tokenizer.py [path/to/open_clip_torch-*.whl]
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sdstudio.models.load.clip_bpe import read_openai_merges, write_tokenizer_files

OUT = Path(__file__).resolve().parents[1] / "src" / "sdstudio" / "assets" / "clip-tokenizer"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def fetch_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "open_clip_torch", "-d",
                    str(folder)], check=True)
    return next(folder.glob("open_clip_torch-*.whl"))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(sys.argv[1]) if len(sys.argv) > 1 else fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            text = gzip.decompress(z.read(MEMBER)).decode("utf-8")
    write_tokenizer_files(OUT, read_openai_merges(text))
    print(f"wrote {OUT} from {wheel.name}")


if __name__ == "__main__":
    main()
