"""Checking completions and decoding a model's predictions into grids."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kktrain.tasks.latin.vocab import EMPTY, VALUE_MIN, VALUE_OFFSET, VOCAB_SIZE, allowed_tokens

# ------------------------------------------------------------------------------ checking


def latin_violations(grid: torch.Tensor) -> torch.Tensor:
    """Per grid (B, N, N): repeated symbols summed over rows and columns (0 for a Latin square)."""
    values = F.one_hot(grid, VOCAB_SIZE)[..., VALUE_OFFSET + VALUE_MIN :]  # PAD and EMPTY don't count
    rows = (values.sum(2) - 1).clamp(min=0).sum((1, 2))
    cols = (values.sum(1) - 1).clamp(min=0).sum((1, 2))
    return rows + cols


def is_valid_completion(
    grid: torch.Tensor, clues: torch.Tensor, size: torch.Tensor, mode: torch.Tensor
) -> torch.Tensor:
    """Per grid: a Latin square over the symbols of its n and mode that keeps every clue."""
    big = grid.shape[-1]
    pos = torch.arange(big, device=grid.device)
    inside = (pos[None, :, None] < size[:, None, None]) & (pos[None, None, :] < size[:, None, None])
    allowed = allowed_tokens().to(grid.device)[mode, size]  # (B, V)
    symbol_ok = allowed.gather(1, grid.flatten(1)).view_as(grid) | ~inside
    clue_ok = (clues == EMPTY) | (grid == clues)
    return symbol_ok.all((1, 2)) & clue_ok.all((1, 2)) & (latin_violations(grid) == 0)


Logits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def decode_iterative(
    model: Logits,
    tokens: torch.Tensor,
    size: torch.Tensor,
    mode: torch.Tensor,
    stop_when_valid: bool = True,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill each grid's most confident hidden cell, re-run the model, repeat: at most n_hidden passes.

    With ``stop_when_valid`` a grid stops as soon as its argmax completion is a Latin square that
    keeps the clues, and takes that completion. The check needs no solution (a deployed solver can
    make it too), and once the model is good it saves most of the passes. ``logits``: the model's
    output for ``tokens`` if already computed, used as the first pass.
    """
    tokens = tokens.clone()
    active = torch.nonzero((tokens == EMPTY).any(2).any(1)).flatten()
    while active.numel():
        grid = tokens[active]
        hidden = grid == EMPTY
        out = model(grid, size[active], mode[active]) if logits is None else logits[active]
        logits = None
        confidence, choice = out.softmax(-1).max(-1)
        done = torch.zeros(len(active), dtype=torch.bool, device=tokens.device)
        if stop_when_valid:
            completion = torch.where(hidden, choice, grid)
            done = is_valid_completion(completion, grid, size[active], mode[active])
            tokens[active[done]] = completion[done]
        cell = confidence.masked_fill(~hidden, -1.0).flatten(1).argmax(1)
        rows = torch.arange(len(active), device=tokens.device)
        grid.view(len(active), -1)[rows, cell] = choice.view(len(active), -1)[rows, cell]
        tokens[active[~done]] = grid[~done]
        active = active[~done & (hidden.sum((1, 2)) > 1)]  # a grid whose last cell was filled is done
    return tokens
