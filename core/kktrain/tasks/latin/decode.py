"""Checking completions and decoding a model's predictions into grids."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from kktrain.tasks.latin.generator import _ISOTOPY, _grid_draws
from kktrain.tasks.latin.vocab import EMPTY, VALUE_MIN, VALUE_OFFSET, VOCAB_SIZE, allowed_tokens, symbol_token_table

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


def cannot_complete(grid: torch.Tensor, size: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """Per grid (B, N, N, EMPTY for open cells): True where no Latin square can keep its filled cells.

    Checks that prove it: a symbol repeated in a row or column; an open cell every symbol of whose
    row and column is taken; a row (column) missing a symbol that none of its open cells can take.
    False does not promise a completion exists.
    """
    values = slice(VALUE_OFFSET + VALUE_MIN, None)
    held = F.one_hot(grid, VOCAB_SIZE)[..., values].bool()  # (B, N, N, S): cell holds symbol
    in_row, in_col = held.any(2), held.any(1)  # (B, N, S)
    repeated = (held.sum(2) > 1).any((1, 2)) | (held.sum(1) > 1).any((1, 2))
    allowed = allowed_tokens().to(grid.device)[mode, size][:, values]  # (B, S)
    open_ = grid == EMPTY
    free = open_[..., None] & allowed[:, None, None] & ~in_row[:, :, None] & ~in_col[:, None, :]  # (B, N, N, S)
    stuck_cell = (open_ & ~free.any(-1)).any((1, 2))
    inside = torch.arange(grid.shape[1], device=grid.device) < size[:, None]  # rows (and columns) of the grid
    missing_row = (allowed[:, None] & ~in_row & ~free.any(2) & inside[..., None]).any((1, 2))
    missing_col = (allowed[:, None] & ~in_col & ~free.any(1) & inside[..., None]).any((1, 2))
    return repeated | stuck_cell | missing_row | missing_col


Logits = Callable[..., torch.Tensor]
"""``model(tokens, size, mode, **extra)`` -> logits (B, N, N, VOCAB_SIZE); ``extra``: per-grid tensors."""


@torch.no_grad()
def decode_iterative(
    model: Logits,
    tokens: torch.Tensor,
    size: torch.Tensor,
    mode: torch.Tensor,
    stop_when_valid: bool = True,
    logits: torch.Tensor | None = None,
    give_up: bool = False,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fill each grid's most confident hidden cell, re-run the model, repeat: at most n_hidden passes.

    With ``stop_when_valid`` a grid stops as soon as its argmax completion is a Latin square that
    keeps the clues, and takes that completion. The check needs no solution (a deployed solver can
    make it too), and once the model is good it saves most of the passes. ``logits``: the model's
    output for ``tokens`` if already computed, used as the first pass. With ``give_up`` a grid
    also stops once its filled cells have no Latin completion (:func:`cannot_complete`): every
    grid it could still reach keeps them, so it cannot end valid (it is returned with cells still
    EMPTY, never valid), and ``valid`` of the result is as without it. ``extra``: per-grid tensors passed
    on to ``model`` as keyword arguments, row for row with the grids it is given.
    """
    tokens = tokens.clone()
    extra = extra or {}
    active = torch.nonzero((tokens == EMPTY).any(2).any(1)).flatten()
    while active.numel():
        grid = tokens[active]
        hidden = grid == EMPTY
        if logits is None:
            out = model(grid, size[active], mode[active], **{k: v[active] for k, v in extra.items()})
        else:
            out = logits[active]
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
        going = ~done & (hidden.sum((1, 2)) > 1)  # a grid whose last cell was filled is done
        if give_up:
            going &= ~cannot_complete(grid, size[active], mode[active])
        active = active[going]
    return tokens


def _line_counts(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid, how often each token (B, N, N, V one-hot) occurs in each row (B, N, V) and column."""
    return values.sum(2), values.sum(1)


@torch.no_grad()
def decode_fast(
    model: Logits,
    tokens: torch.Tensor,
    size: torch.Tensor,
    mode: torch.Tensor,
    logits: torch.Tensor | None = None,
    confidence_min: float = 0.9,
    share: float = 0.0,
) -> torch.Tensor:
    """Like :func:`decode_iterative` (``give_up``), but a pass fills several cells, not one.

    A pass fills the most confident hidden cell and, with it, every other hidden cell whose
    prediction has probability >= ``confidence_min`` or is among the ``share`` most confident of
    the grid's hidden cells, unless it repeats a symbol: one already in its row or column (clues,
    filled cells, the most confident cell) or one another such cell of its row or column
    predicts. Stops like ``decode_iterative(stop_when_valid=True, give_up=True)``.
    """
    tokens = tokens.clone()
    active = torch.nonzero((tokens == EMPTY).any(2).any(1)).flatten()
    while active.numel():
        grid = tokens[active]
        hidden = grid == EMPTY
        out = model(grid, size[active], mode[active]) if logits is None else logits[active]
        logits = None
        confidence, choice = out.softmax(-1).max(-1)
        completion = torch.where(hidden, choice, grid)
        done = is_valid_completion(completion, grid, size[active], mode[active])
        tokens[active[done]] = completion[done]
        count = len(active)
        cell = confidence.masked_fill(~hidden, -1.0).flatten(1).argmax(1)
        first = torch.zeros_like(hidden).view(count, -1)
        first[torch.arange(count, device=tokens.device), cell] = True
        first = first.view_as(hidden)
        grid = torch.where(first, choice, grid)
        fixed_rows, fixed_cols = _line_counts(F.one_hot(grid, VOCAB_SIZE) * (grid != EMPTY).unsqueeze(-1))
        sure = confidence >= confidence_min
        if share > 0.0:
            masked = confidence.masked_fill(~hidden, -1.0).flatten(1)
            rank = masked.argsort(1, descending=True).argsort(1).view_as(hidden)
            quota = torch.ceil(share * hidden.sum((1, 2)).double()).long()
            sure |= rank < quota[:, None, None]
        sure &= hidden & ~first
        proposed = F.one_hot(choice, VOCAB_SIZE) * sure.unsqueeze(-1)
        proposed_rows, proposed_cols = _line_counts(proposed)
        # For each cell: the count of its predicted symbol in its row and column.
        pick = choice.unsqueeze(-1)
        in_row = (fixed_rows + proposed_rows).unsqueeze(2).expand(-1, -1, grid.shape[2], -1).gather(3, pick)
        in_col = (fixed_cols + proposed_cols).unsqueeze(1).expand(-1, grid.shape[1], -1, -1).gather(3, pick)
        sure &= (in_row.squeeze(-1) == 1) & (in_col.squeeze(-1) == 1)  # itself only
        grid = torch.where(sure, choice, grid)
        tokens[active[~done]] = grid[~done]
        going = ~done & (grid == EMPTY).any(2).any(1) & ~cannot_complete(grid, size[active], mode[active])
        active = active[going]
    return tokens


# ------------------------------------------------------------------------------ test-time augmentation

_TTA_SEED = 0x7E57A1A5  # the views of held-out puzzle i are the same at every validation


def tta_views(count: int, size: torch.Tensor, big: int, views: int, seed: int = _TTA_SEED) -> torch.Tensor:
    """(count, views, 3, N): per grid, ``views`` random isotopisms (row, column, symbol permutations).

    View v of grid i depends on (seed, i, v) alone; positions from a grid's n on map to themselves.
    """
    seeds = np.uint64(seed) + np.arange(count * views, dtype=np.uint64)
    sizes = np.repeat(size.cpu().numpy().astype(np.int64), views)
    perms = np.argsort(_grid_draws(seeds, _ISOTOPY, sizes, 3, big), axis=2)
    pos = np.arange(big)
    perms = np.where(pos < sizes[:, None, None], perms, pos)
    return torch.from_numpy(perms.reshape(count, views, 3, big)).to(size.device)


def _token_maps(perm: torch.Tensor, size: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """(B, V): the token each token becomes under the symbol permutations ``perm`` (B, N); PAD, EMPTY stay."""
    count, big = perm.shape
    table = symbol_token_table().to(perm.device)[mode, size][:, :big]  # (B, N): token of symbol k
    maps = torch.arange(VOCAB_SIZE, device=perm.device).repeat(count, 1)
    inside = torch.arange(big, device=perm.device) < size[:, None]
    source = torch.where(inside, table, 0)  # PAD -> PAD for symbols beyond n
    target = torch.where(inside, table.gather(1, perm), 0)
    return maps.scatter(1, source, target)


def tta_logits(
    model: Logits, tokens: torch.Tensor, size: torch.Tensor, mode: torch.Tensor, views: torch.Tensor
) -> torch.Tensor:
    """The mean of the model's logits over the grid and its isotopes ``views`` (B, k, 3, N), mapped back."""
    count, k, _, big = views.shape
    batch = torch.arange(count, device=tokens.device)[:, None, None]
    grids, back = [tokens], []
    for v in range(k):
        rows, cols, syms = views[:, v].unbind(1)
        maps = _token_maps(syms, size, mode)
        moved = tokens[batch, rows[:, :, None], cols[:, None, :]]
        grids.append(maps.gather(1, moved.flatten(1)).view_as(moved))
        back.append((rows.argsort(1), cols.argsort(1), maps))
    out = model(torch.cat(grids), size.repeat(k + 1), mode.repeat(k + 1)).view(k + 1, count, big, big, VOCAB_SIZE)
    total = out[0].clone()
    for v, (inv_rows, inv_cols, maps) in enumerate(back):
        # Cell (r, c) of the grid is cell (inv_rows[r], inv_cols[c]) of the view, its token t is maps[t].
        view = out[v + 1][batch, inv_rows[:, :, None], inv_cols[:, None, :]]
        total += view.gather(3, maps[:, None, None, :].expand(-1, big, big, -1))
    return total / (k + 1)
