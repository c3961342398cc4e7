"""Model-like fields from the network take names, never paths (Settings.names_only, set by the server).

A name is matched against what the catalog lists in the configured folders, by its last path component (an
A1111 title may carry a subfolder: "SDXL/model.safetensors [hash]"); the filesystem is never asked about the
string itself, so "/etc/shadow" and "/nonexistent/x" get the same "unknown model" answer. What a name finds
must lie inside those folders once links are resolved: a link to elsewhere is refused until the operator
allows its folder (`sdstudio serve --allow-folder`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from sdstudio.errors import ModelError


def leaf(name: str) -> str:
    """The last component of a name written with / or \\ ("SDXL/a.safetensors" -> "a.safetensors")."""
    return re.split(r"[\\/]", name.strip())[-1]


def check_inside(path: Path, roots: Iterable[Path], what: str = "model") -> Path:
    """`path` when, links resolved, it lies in one of `roots`; else a ModelError."""
    real = path.resolve()
    if any(real.is_relative_to(root.resolve()) for root in roots):
        return path
    raise ModelError(f"the {what} {path.name!r} links to a folder outside the model folders; the server's operator "
                     "can allow that folder with `sdstudio serve --allow-folder`")
