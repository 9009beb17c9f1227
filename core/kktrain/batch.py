"""Batch helpers: a batch is a tensor, or a dict, list, tuple or named tuple of them (nested).

The loop and the plugins (OOM splitting, gradient accumulation, device copies) use these; none of
them knows what the task's batch means.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Copy every tensor in ``batch`` to ``device``; other values are kept as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        out = [to_device(v, device, non_blocking) for v in batch]
        return type(batch)(*out) if hasattr(batch, "_fields") else type(batch)(out)
    return batch


def split_batch(batch: Any, pieces: int) -> list[Any]:
    """Split a batch (tensors, dicts, lists/tuples of them) along dim 0 into ``pieces`` parts."""
    if isinstance(batch, torch.Tensor):
        return list(torch.tensor_split(batch, pieces))
    if isinstance(batch, dict):
        parts = {k: split_batch(v, pieces) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(pieces)]
    if isinstance(batch, (list, tuple)):
        parts_l = [split_batch(v, pieces) for v in batch]
        rebuilt = [[p[i] for p in parts_l] for i in range(pieces)]
        if hasattr(batch, "_fields"):
            return [type(batch)(*r) for r in rebuilt]
        return [type(batch)(r) for r in rebuilt]
    return [batch] * pieces


def batch_size_of(batch: Any) -> int:
    """The leading dimension of the first tensor in a batch (1 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values()))) if batch else 1
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    return 1
