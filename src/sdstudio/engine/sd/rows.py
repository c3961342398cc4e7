"""Batch invariance: run a network image by image so that an image never depends on its batch.

CPU kernels pick their blocking (and so their summation order) by tensor shape: the same image computed in a
batch of 4 and alone can differ in the last bits on some CPUs. Called per image, every image of every batch
size goes through calls of one shape, so image k of a batch equals the same seed made alone, bit for bit, on
any CPU (and a re-run of any saved image reproduces it, whatever its position in its batch).

Rows are group-major, as the loop builds them: ((k+1)B, ...) = [uncond rows of the B images, then each
positive's]. Image b owns rows b, B + b, ..., kB + b of every batched tensor (dim 0 == the row count)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def per_image(fn: Callable[..., Any], x: Tensor, kwargs: dict[str, Any], batch: int,
              between: Callable[[], None] | None = None) -> Any:
    """fn(x, **kwargs) computed image by image and put back in row order; fn(x, **kwargs) when batch is 1.
    `between` runs before each image after the first (a cancel check: a long step stops within one image)."""
    total = x.shape[0]
    if batch <= 1 or total % batch:
        return fn(x, **kwargs)
    parts = []
    for b in range(batch):
        if b and between is not None:
            between()
        rows = torch.arange(b, total, batch, device=x.device)
        parts.append(fn(x[rows], **_take(kwargs, rows, total)))
    return _join(parts, batch)


def _take(value: Any, rows: Tensor, total: int) -> Any:
    if isinstance(value, Tensor):
        return value[rows] if value.ndim and value.shape[0] == total else value
    if isinstance(value, dict):
        return {k: _take(v, rows, total) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_take(v, rows, total) for v in value)
    return value


def _join(parts: list[Any], batch: int) -> Any:
    """Per-image results (groups rows each) -> one result in group-major row order."""
    first = parts[0]
    if isinstance(first, Tensor):
        stacked = torch.stack(parts, dim=1)                 # (groups, B, ...)
        return stacked.reshape(-1, *first.shape[1:])       # (groups * B, ...), row g * B + b
    if isinstance(first, dict):
        return {k: _join([p[k] for p in parts], batch) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(_join([p[i] for p in parts], batch) for i in range(len(first)))
    return first
