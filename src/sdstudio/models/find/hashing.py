"""Model hashes as AUTOMATIC1111 shows them: the first 10 hex digits of a sha256.

A single file hashes its bytes (A1111's "Model hash"). A diffusers folder has no single file, so its
hash is the sha256 of "relative path NUL file sha256 LF" over its weight files in sorted order: stable
across copies and machines, and it changes when any weight changes. Full hashes are cached in
cache/hashes.json keyed by (path, size, mtime), as A1111 does, because hashing gigabytes takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def legacy_hash(path: Path) -> str:
    """A1111's old "model hash": sha256 of the 64 KiB at offset 1 MiB, 8 hex digits."""
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


TINY_VAE_FOLDERS = ("taesd", "taesdxl")  # a model's own tiny VAE: previews and an opt-in decoder, not its output


def weight_files(folder: Path) -> list[Path]:
    """The weights a folder model's hash covers: every weight file but its tiny VAE's, so adding one (as the demo
    did) keeps the hash its images carry."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and p.relative_to(folder).parts[0] not in TINY_VAE_FOLDERS)


class HashCache:
    """Full sha256 digests of files, remembered across runs; `None` for no cache (always recompute)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, dict] | None = None
        self._lock = threading.RLock()  # the server hashes from request threads and its worker at once

    def file_sha256(self, path: Path) -> str:
        with self._lock:  # one hashing at a time: a file two threads ask for is read once
            return self._file_sha256(path)

    def _file_sha256(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        entry = self._load().get(key)
        if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return entry["sha256"]
        log.info("hashing %s (%.1f MB)", path.name, st.st_size / 1e6)
        digest = sha256_file(path)
        self._load()[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._save()
        return digest

    def known(self) -> dict[str, str]:
        """Resolved file path -> full sha256, for everything hashed so far."""
        with self._lock:
            return {path: entry["sha256"] for path, entry in self._load().items()}

    def model_sha256(self, path: Path) -> str:
        if path.is_file():
            return self.file_sha256(path)
        h = hashlib.sha256()
        for file in weight_files(path):
            h.update(f"{file.relative_to(path).as_posix()}\0{self.file_sha256(file)}\n".encode())
        return h.hexdigest()

    def quick_sha256(self, path: Path, max_bytes: int = 64 << 20) -> str | None:
        """The model's sha256 when it costs little: every weight file already hashed, or `max_bytes` or less of
        them to read (the bundled models); else None (A1111 too lists a hash only once it has computed it)."""
        files = [path] if path.is_file() else weight_files(path)
        known = self._load()
        unread = sum(f.stat().st_size for f in files if str(f.resolve()) not in known)
        return self.model_sha256(path) if files and unread <= max_bytes else None

    def _load(self) -> dict[str, dict]:
        with self._lock:
            return self._loaded()

    def _loaded(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path and self.path.is_file():
                try:
                    self._entries = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    log.warning("ignoring unreadable hash cache %s", self.path)
        return self._entries

    def _save(self) -> None:
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._entries, indent=1))
        os.replace(tmp, self.path)


def short_hash(sha256: str) -> str:
    return sha256[:10]
