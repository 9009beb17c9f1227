"""The 35-token vocabulary shared by every size and mode, and the modes' symbols."""

from __future__ import annotations

import functools
from enum import IntEnum
from typing import Literal

import numpy as np
import torch

# ------------------------------------------------------------------------------ vocabulary

PAD, EMPTY = 0, 1
VALUE_MIN, VALUE_MAX = -16, 16
VALUE_OFFSET = EMPTY + 1 - VALUE_MIN  # token = value + 18
VOCAB_SIZE = VALUE_MAX + VALUE_OFFSET + 1  # 35
MIN_SIZE, MAX_SIZE = 3, 16
BATCH_KEYS = ("tokens", "target", "size", "mode")


class Mode(IntEnum):
    """How the n symbols of a grid are written."""

    STANDARD = 0  # 1..n
    ZERO_INCLUSIVE = 1  # 0..n-1
    NEGATIVE = 2  # -(n//2)..n//2, skipping 0 for even n


ModeName = Literal["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]


def symbol_values(n: int, mode: Mode | int) -> list[int]:
    """The n symbol values of an n x n grid in ``mode``, in symbol-index order."""
    mode = Mode(mode)
    if mode is Mode.STANDARD:
        return list(range(1, n + 1))
    if mode is Mode.ZERO_INCLUSIVE:
        return list(range(n))
    half = n // 2
    return [v for v in range(-half, half + 1) if n % 2 or v != 0]


def _symbol_token_table() -> np.ndarray:
    """``table[mode, n, i]``: the token of symbol index i of an n x n grid (PAD for i >= n)."""
    table = np.full((len(Mode), MAX_SIZE + 1, MAX_SIZE), PAD, np.int64)
    for mode in Mode:
        for n in range(MIN_SIZE, MAX_SIZE + 1):
            table[mode, n, :n] = np.array(symbol_values(n, mode)) + VALUE_OFFSET
    return table


SYMBOL_TOKENS = _symbol_token_table()


@functools.cache
def symbol_token_table() -> torch.Tensor:
    """``SYMBOL_TOKENS`` as a tensor (shared: read only)."""
    return torch.from_numpy(SYMBOL_TOKENS)


@functools.cache
def allowed_tokens() -> torch.Tensor:
    """``allowed[mode, n, token]``: may a cell of an n x n grid in ``mode`` hold ``token`` (shared: read only)."""
    allowed = torch.zeros(len(Mode), MAX_SIZE + 1, VOCAB_SIZE, dtype=torch.bool)
    for mode in Mode:
        for n in range(MIN_SIZE, MAX_SIZE + 1):
            allowed[mode, n, torch.from_numpy(SYMBOL_TOKENS[mode, n, :n])] = True
    return allowed
