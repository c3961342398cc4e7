"""CLI runs in the server's history, so the web UI's History lists images made on the command line too.

A run is recorded in the default data folder (~/.sdstudio/server) when no server holds it: a running server
owns its history (storage/lock.py), and the CLI never waits for it. Image paths are kept absolute, since the
CLI's outputs folder is its own (-o)."""

from __future__ import annotations

import logging
from typing import Any

from sdstudio.errors import StoreError
from sdstudio.server.payload import encode_request
from sdstudio.settings import Settings
from sdstudio.storage.jobs import JobStore
from sdstudio.storage.lock import FolderLock
from sdstudio.storage.results import SavedImage

log = logging.getLogger(__name__)
SERVER_FOLDER = "server"  # under the sdstudio home: the data folder `sdstudio serve` uses by default


def record_in_history(settings: Settings, result: Any, saved: list[SavedImage]) -> bool:
    """True when the run was recorded; a held or unwritable data folder skips it (logged, never fatal)."""
    data_dir = settings.home / SERVER_FOLDER
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(data_dir)
    except (StoreError, OSError) as e:
        log.info("not recorded in the history: %s", e)
        return False
    try:
        store = JobStore(data_dir / "jobs.sqlite3")
        try:
            store.record_done(f"cli-{result.request.mode}", encode_request(result.request), {
                "images": [str(s.path.resolve()) for s in saved],
                "captures": [str(s.capture_dir.resolve()) if s.capture_dir else None for s in saved],
                "capture_steps": [list(im.capture.steps) if im.capture else [] for im in result.images],
                "seeds": [im.seed for im in result.images], "infotexts": [im.infotext for im in result.images],
                "request": result.request.to_dict(), "warnings": list(result.warnings), "seconds": result.seconds})
        finally:
            store.close()
    except (StoreError, OSError, ValueError) as e:
        log.info("not recorded in the history: %s", e)
        return False
    finally:
        lock.release()
    return True


