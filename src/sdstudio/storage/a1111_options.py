"""The A1111 options a server was given (POST /sdapi/v1/options), kept in its data folder so they survive a
restart: one JSON object, replaced atomically on each change."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_options(path: Path) -> dict[str, Any]:
    """The stored options ({} when none were stored, or the file is unreadable: logged, never fatal)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable A1111 options file %s: %s", path.name, e)
        return {}
    return data if isinstance(data, dict) else {}


def save_options(path: Path, values: dict[str, Any]) -> None:
    """Write `values` to a temporary file beside `path`, then rename it over `path` (a crash leaves the old
    file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(values, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
