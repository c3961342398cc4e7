"""One server per data folder: an exclusive lock held for the server's lifetime.

Two servers on one folder would both recover the same "running" jobs and run them twice. `fcntl.flock` on
`<folder>/server.lock` is released by the kernel when the process dies, even by kill -9, so a crashed
server never blocks the next one; the file holds the holder's PID for the message."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO

from sdstudio.errors import StoreError

try:
    import fcntl
except ImportError:  # Windows: no flock; the server runs unlocked (logged)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
LOCK_FILE = "server.lock"


class FolderInUse(StoreError):
    """Another live server holds the data folder."""


class FolderLock:
    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._file: IO[str] | None = None
        if fcntl is None:
            log.warning("no file locking on this system: do not run two servers on %s", folder)
            return
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for the server's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FolderInUse(f"the data folder {folder} is in use by another sdstudio server (PID {holder}); "
                              "stop that server or give this one another --data-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None and not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
