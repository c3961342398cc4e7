"""The server's AUTOMATIC1111 options: read from the data folder at start, saved there on each change, so
what a client writes with POST /sdapi/v1/options it reads back, after a restart too."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdstudio.a1111.options import A1111Options
from sdstudio.storage.a1111_options import load_options, save_options

OPTIONS_FILE = "a1111-options.json"


class A1111Settings:
    def __init__(self, data_dir: Path):
        self.path = data_dir / OPTIONS_FILE
        self.current = A1111Options.restored(load_options(self.path))
        self._lock = threading.Lock()  # POST /options runs on the thread pool

    def update(self, settings: Mapping[str, Any]) -> A1111Options:
        """Apply `settings` (all or nothing: a bad value raises RequestError and changes nothing) and store."""
        with self._lock:
            updated = self.current.updated(settings)
            save_options(self.path, dict(updated.values))
            self.current = updated
            return updated
